"""Random bf16 checkpoints drawn on the GPU (no hub access on the device machine), written as a
real checkpoint: config.json, sharded safetensors and their index."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.gpu.common import log


class ShardWriter:
    """Tensors set by name go into the current shard; `flush(file)` writes it (in the background,
    once copied off the GPU); `close()` writes the index."""

    def __init__(self, path: Path, seed: int = 0):
        import torch

        self.path = path
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.weight_map: dict[str, str] = {}
        self.shard: dict = {}
        self._pool, self._futures = ThreadPoolExecutor(4), []

    def rnd(self, *shape, std: float = 0.02):
        import torch

        return (torch.randn(*shape, generator=self.gen, device=self.device, dtype=torch.float32) * std).to(
            torch.bfloat16)

    def norm(self, n: int):
        """An RMSNorm weight: 1 + N(0, 0.05)."""
        return (1 + self.rnd(n, std=0.05)).contiguous()

    def __setitem__(self, name: str, tensor) -> None:
        self.shard[name] = tensor

    def flush(self, file: str) -> None:
        from safetensors.torch import save_file

        if self.shard:
            host = {k: t.cpu() for k, t in self.shard.items()}
            self._futures.append(self._pool.submit(save_file, host, str(self.path / file), {"format": "pt"}))
            self.weight_map.update({k: file for k in host})
            self.shard.clear()

    def close(self) -> None:
        import torch

        for f in self._futures:
            f.result()
        self._pool.shutdown()
        index = {"metadata": {}, "weight_map": self.weight_map}
        (self.path / "model.safetensors.index.json").write_text(json.dumps(index))
        if self.device == "cuda":
            torch.cuda.empty_cache()


def llama8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000,
        eos_token_id=128001, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        torch_dtype="bfloat16",
    )


def write_llama8b(path: Path) -> Path:
    """A Llama-3.1-8B-shaped checkpoint of random weights (std 0.02), unless path holds one."""
    if (path / "config.json").is_file():
        return path
    t0 = time.time()
    path.mkdir(parents=True, exist_ok=True)
    cfg = llama8b_config()
    cfg.save_pretrained(path)
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size // cfg.num_attention_heads
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    w = ShardWriter(path)
    w["model.embed_tokens.weight"] = w.rnd(cfg.vocab_size, h)
    w.flush("model-embed.safetensors")
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = w.norm(h)
        w[p + "post_attention_layernorm.weight"] = w.norm(h)
        w[p + "self_attn.q_proj.weight"] = w.rnd(hq * d, h)
        w[p + "self_attn.k_proj.weight"] = w.rnd(hkv * d, h)
        w[p + "self_attn.v_proj.weight"] = w.rnd(hkv * d, h)
        w[p + "self_attn.o_proj.weight"] = w.rnd(h, hq * d)
        w[p + "mlp.gate_proj.weight"] = w.rnd(i, h)
        w[p + "mlp.up_proj.weight"] = w.rnd(i, h)
        w[p + "mlp.down_proj.weight"] = w.rnd(h, i)
        if layer % 4 == 3:
            w.flush(f"model-layers-{layer // 4}.safetensors")
    w["model.norm.weight"] = w.norm(h)
    w["lm_head.weight"] = w.rnd(cfg.vocab_size, h)
    w.flush("model-head.safetensors")
    w.close()
    log(f"checkpoint written to {path} in {time.time() - t0:.1f}s")
    return path


# -- DeepSeek-V3 at its real shapes, config.json alone (served with --load-format dummy) ------------------
# config.json of DeepSeek-V3 cut to 2 layers (1 dense, 1 MoE)
V3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
      "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
      "num_hidden_layers": 2, "num_attention_heads": 128, "num_key_value_heads": 128,
      "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
      "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
      "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
      "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
      "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
      "rms_norm_eps": 1e-6, "rope_theta": 10000, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
      "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                       "original_max_position_embeddings": 4096, "type": "yarn"},
      "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                              "weight_block_size": [128, 128]}}
# One PP-8 stage's share (BENCHMARKS.md's "8 layers": 3 dense + 5 MoE, with embeddings and lm_head;
# 58.8 GiB in FP8, which fits an 80 GB H100 only in FP8): `bench_gpu.py --model v3-stage`.
V3_STAGE = {**V3, "num_hidden_layers": 8, "first_k_dense_replace": 3}
V3_TINY = dict(vocab_size=2048, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
               num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=128,
               qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=16, n_group=4,
               topk_group=2, num_experts_per_tok=4, num_hidden_layers=4, first_k_dense_replace=1)


def write_v3_stage_config(path: Path, tiny: bool = False) -> Path:
    """config.json of the V3 stage (tiny: CPU-sized, a smoke test of the scripts), nothing else;
    unless path holds a config.json."""
    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**V3_STAGE, **(V3_TINY if tiny else {})}, indent=1))
    return path
