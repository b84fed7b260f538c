"""Tiny random Hugging Face checkpoints for tests, written by transformers itself.

Shared by every test that needs a real checkpoint on disk: `make_hf_checkpoint(tmp, kind)`
returns a directory that both transformers and our loader read. Sizes are tiny (hidden 64,
vocab 320) so a checkpoint is written in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch

KINDS = ("llama", "tied", "qwen2", "llama3", "sharded", "mistral", "qwen3", "gemma2", "phi3", "phi4", "mixtral",
         "qwen3moe")
# Kinds whose norm weights are randomised after init (transformers inits them to 1, or Gemma's to 0),
# so that a norm applied in the wrong place, or Gemma's 1 + w read as w, changes the logits.
NOISY_NORMS = ("qwen3", "gemma2", "phi3", "phi4", "mixtral", "qwen3moe")


def _config(kind: str, num_layers: int):
    from transformers import (Gemma2Config, LlamaConfig, MistralConfig, MixtralConfig, Phi3Config, Qwen2Config,
                              Qwen3Config, Qwen3MoeConfig)

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                  initializer_range=0.1)
    if kind in ("llama", "sharded"):
        return LlamaConfig(**common, rope_theta=10000.0)
    if kind == "tied":
        return LlamaConfig(**{**common, "tie_word_embeddings": True}, rope_theta=500000.0)
    if kind == "llama3":
        return LlamaConfig(**common, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    if kind == "qwen2":
        return Qwen2Config(**common, rope_theta=1000000.0)
    if kind == "mistral":
        return MistralConfig(**common, rope_theta=10000.0, sliding_window=None)
    if kind == "qwen3":
        return Qwen3Config(**common, head_dim=24, rope_theta=1000000.0)
    if kind == "gemma2":  # window 6 < the test prompts; caps small enough to bite on random weights
        return Gemma2Config(**{**common, "tie_word_embeddings": True}, head_dim=16, query_pre_attn_scalar=24,
                            sliding_window=6, attn_logit_softcapping=3.0, final_logit_softcapping=2.0,
                            rope_theta=10000.0)
    if kind == "phi3":  # LongRoPE with short factors only inside 32 positions; a window on every layer
        short, long = _longrope_factors(8, seed=1)
        return Phi3Config(**{**common, "max_position_embeddings": 512}, original_max_position_embeddings=32,
                          sliding_window=10, rope_scaling={"rope_type": "longrope", "rope_theta": 10000.0,
                                                            "short_factor": short, "long_factor": long})
    if kind == "phi4":  # Phi-4-mini's shape: partial rotary (half of each head), tied head, LongRoPE
        short, long = _longrope_factors(4, seed=2)
        return Phi3Config(**{**common, "max_position_embeddings": 512, "tie_word_embeddings": True},
                          original_max_position_embeddings=32, partial_rotary_factor=0.5,
                          rope_scaling={"rope_type": "longrope", "rope_theta": 10000.0,
                                        "partial_rotary_factor": 0.5, "short_factor": short, "long_factor": long})
    if kind == "mixtral":  # 4 experts, top 2, of width 64
        return MixtralConfig(**{**common, "intermediate_size": 64}, num_local_experts=4, num_experts_per_tok=2,
                             rope_theta=1000000.0, sliding_window=None)
    if kind == "qwen3moe":  # layer 1 dense (mlp_only_layers), the others 4 experts top-2 renormalised
        return Qwen3MoeConfig(**common, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                              norm_topk_prob=True, mlp_only_layers=[1], rope_theta=1000000.0)
    raise ValueError(f"unknown checkpoint kind {kind!r} (known: {', '.join(KINDS)})")


def _longrope_factors(n: int, seed: int) -> tuple[list[float], list[float]]:
    """Random LongRoPE short factors in [1, 4) and long factors in [4, 12), n of each."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=gen) * 3 + 1).tolist(), (torch.rand(n, generator=gen) * 8 + 4).tolist()


def make_hf_model(kind: str = "llama", num_layers: int = 4, seed: int = 0):
    """A random fp32 transformers model (eager attention) of the given kind."""
    from transformers import AutoModelForCausalLM

    cfg = _config(kind, num_layers)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if kind == "qwen2":  # biases init to zero: make them matter so a dropped bias is caught
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    if kind in NOISY_NORMS:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def make_hf_checkpoint(tmp_dir, kind: str = "llama", num_layers: int = 4, seed: int = 0) -> Path:
    """Write a checkpoint of `kind` under tmp_dir/kind and return that directory.

    "sharded" writes several safetensors files plus model.safetensors.index.json.
    """
    out = Path(tmp_dir) / f"{kind}-{num_layers}-{seed}"
    if (out / "config.json").is_file():
        return out
    model = make_hf_model(kind, num_layers, seed)
    shard = "100KB" if kind == "sharded" else "10GB"
    model.save_pretrained(out, safe_serialization=True, max_shard_size=shard)
    return out


DEEPSEEK_KINDS = ("v3", "v2")


def _deepseek_config(kind: str, num_layers: int):
    """Tiny DeepSeek configs: V3 (q LoRA, sigmoid + correction bias, group top-2 sums) and
    V2-Lite style (no q LoRA, softmax, group-limited greedy); both YaRN past position 64."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
                  kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                  n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                  first_k_dense_replace=1, max_position_embeddings=256, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                  initializer_range=0.1,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 64, "mscale": 1.0,
                                   "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1})
    if kind == "v3":
        return DeepseekV3Config(**common, q_lora_rank=32, n_shared_experts=1, norm_topk_prob=True,
                                routed_scaling_factor=2.5, rope_interleave=True)
    if kind == "v2":
        return DeepseekV2Config(**common, q_lora_rank=None, n_shared_experts=2, norm_topk_prob=False,
                                routed_scaling_factor=1.5, topk_method="group_limited_greedy")
    raise ValueError(f"unknown DeepSeek kind {kind!r} (known: {', '.join(DEEPSEEK_KINDS)})")


def make_deepseek_model(kind: str = "v3", num_layers: int = 3, seed: int = 0):
    """A random fp32 transformers DeepSeek model; V3's router correction bias is made non-zero."""
    from transformers import AutoModelForCausalLM

    cfg = _deepseek_config(kind, num_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                p.normal_(0, 0.1)
    return model.eval()


def make_deepseek_checkpoint(tmp_dir, kind: str = "v3", num_layers: int = 3, seed: int = 0) -> Path:
    """Write a tiny DeepSeek checkpoint (transformers' own save_pretrained) and return its dir."""
    out = Path(tmp_dir) / f"deepseek-{kind}-{num_layers}-{seed}"
    if (out / "config.json").is_file():
        return out
    make_deepseek_model(kind, num_layers, seed).save_pretrained(out, safe_serialization=True)
    return out
