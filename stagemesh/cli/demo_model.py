"""A tiny random Llama checkpoint in Hugging Face layout, written without transformers.

Used by demos, the CLI and end-to-end tests: it loads in transformers (`AutoModelForCausalLM`,
`AutoTokenizer`) and in our stage loader, so both can be compared token for token. The tokenizer
is a byte-level BPE trained on `stagemesh/data/corpus.txt`, so prompts in English tokenize to
realistic lengths. Everything is deterministic for a given seed and takes well under 5 s.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
BOS, EOS = "<s>", "</s>"


def train_tokenizer(vocab_size: int = 768):
    """Byte-level BPE over the shipped corpus; ids 0 and 1 are <s> and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train([str(CORPUS)], trainer)
    # Prepend <s> as Llama tokenizers do, so HF and stagemesh prompts agree.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)])
    return tok


def demo_config(vocab_size: int, num_layers: int, hidden_size: int, num_heads: int,
                num_kv_heads: int, intermediate_size: int, max_positions: int) -> dict:
    """config.json in transformers-5 layout, plus the 4.x rope keys for older readers."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab_size, "hidden_size": hidden_size,
        "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads, "hidden_act": "silu",
        "max_position_embeddings": max_positions, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "rope_theta": 10000.0, "rope_scaling": None,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32", "dtype": "float32",
        "use_cache": True, "initializer_range": 0.02,
    }


def random_weights(cfg: dict, seed: int, std: float) -> dict[str, torch.Tensor]:
    """HF-named float32 tensors; norms at 1, everything else N(0, std)."""
    gen = torch.Generator().manual_seed(seed)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d, hq, hkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def rnd(*shape):
        return torch.randn(*shape, generator=gen) * std

    w = {"model.embed_tokens.weight": rnd(v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        w[p + "input_layernorm.weight"] = torch.ones(h)
        w[p + "post_attention_layernorm.weight"] = torch.ones(h)
        w[p + "self_attn.q_proj.weight"] = rnd(hq * d, h)
        w[p + "self_attn.k_proj.weight"] = rnd(hkv * d, h)
        w[p + "self_attn.v_proj.weight"] = rnd(hkv * d, h)
        w[p + "self_attn.o_proj.weight"] = rnd(h, hq * d)
        w[p + "mlp.gate_proj.weight"] = rnd(i, h)
        w[p + "mlp.up_proj.weight"] = rnd(i, h)
        w[p + "mlp.down_proj.weight"] = rnd(h, i)
    w["model.norm.weight"] = torch.ones(h)
    w["lm_head.weight"] = rnd(v, h)
    return w


def write_demo_model(out_dir, *, num_layers: int = 4, hidden_size: int = 64, num_heads: int = 4,
                     num_kv_heads: int = 2, intermediate_size: int = 128,
                     max_positions: int = 2048, vocab_size: int = 768, std: float = 0.2,
                     seed: int = 0) -> Path:
    """Write config, weights, tokenizer and generation config into out_dir; return it.

    vocab_size is the BPE target; the written vocab is what the corpus yields (at most that).
    std 0.2 keeps greedy continuations varied rather than one token repeated.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(vocab_size)
    cfg = demo_config(tok.get_vocab_size(), num_layers, hidden_size, num_heads, num_kv_heads,
                      intermediate_size, max_positions)
    tok.save(str(out / "tokenizer.json"))
    _write_json(out / "config.json", cfg)
    _write_json(out / "generation_config.json",
                {"bos_token_id": 0, "eos_token_id": 1, "do_sample": False})
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "model_max_length": max_positions, "add_bos_token": True, "clean_up_tokenization_spaces": False,
    })
    save_file(random_weights(cfg, seed, std), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
