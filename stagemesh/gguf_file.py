"""A GGUF file (llama.cpp's one-file checkpoint) as the mesh reads it: no config.json, no
tokenizer.json; the metadata is the config, the tokenizer and the chat template, under llama.cpp's
key names, and the tensors have llama.cpp's names.

This module reads the metadata only, through the `gguf` package's reader (llama.cpp's own; numpy,
the file memory-mapped): `gguf_config(path)` is the Hugging Face config dict the file describes
(what transformers' `from_pretrained(..., gguf_file=...)` builds, for the architectures below),
`hf_tensor_names(path)` maps Hugging Face tensor names to the file's. The stage worker reads and
dequantizes its own layers' tensors (stage_worker/gguf.py); the gateway builds the tokenizer
(stagemesh/gguf_tokenizer.py). No torch here.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from stagemesh.errors import CheckpointError

# llama.cpp's `general.architecture` -> the transformers class whose layers it holds. llama.cpp
# writes Mistral checkpoints as "llama" too (same layers, same Q/K row permutation).
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Architectures whose converter (convert_hf_to_gguf.py, LlamaModel.modify_tensors) permutes the
# rows of q_proj/k_proj (weight and bias) for llama.cpp's rotary layout; the loader undoes it.
PERMUTED_QK = {"llama"}

_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",  # Qwen3's per-head norms
}
_GGUF_TOP = {v: k for k, v in _TOP.items()}
_GGUF_LAYER = {v: k for k, v in _LAYER.items()}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def is_gguf(path: str | Path) -> bool:
    """A --model argument naming a GGUF file (not a checkpoint directory)."""
    return str(path).lower().endswith(".gguf")


@functools.lru_cache(maxsize=4)
def open_gguf(path: str):
    """The file's GGUFReader (memory-mapped; parsing the metadata takes ~2 s for a 49k vocabulary,
    hence one per process and path). CheckpointError when it is missing or not a GGUF file."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise CheckpointError(f"{path}: reading GGUF files needs the `gguf` package (pip install gguf)") from exc
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        return GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError/struct errors on a bad header
        raise CheckpointError(f"{path}: not a readable GGUF file ({exc})") from exc


def field(reader, key: str, default=None):
    """One metadata value as Python (str, int, float, bool, list), or `default`."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_architecture(path: str | Path) -> tuple[str, str]:
    """(llama.cpp's architecture name, the transformers class); CheckpointError naming the
    supported ones when the file holds another."""
    reader = open_gguf(str(path))
    arch = field(reader, "general.architecture", "<none>")
    if arch not in GGUF_ARCHITECTURES:
        from stagemesh.model_config import SUPPORTED_ARCHITECTURES

        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported (GGUF: {', '.join(sorted(GGUF_ARCHITECTURES))}; "
            f"checkpoint directories: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
    return arch, GGUF_ARCHITECTURES[arch]


def gguf_config(path: str | Path) -> dict:
    """The Hugging Face config.json the file describes (transformers' GGUF_CONFIG_MAPPING)."""
    arch, cls = gguf_architecture(path)
    reader = open_gguf(str(path))

    def key(name, default=None):
        return field(reader, f"{arch}.{name}", default)

    try:
        n_heads = int(key("attention.head_count"))
        hidden = int(key("embedding_length"))
        vocab = key("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
        raw = {
            "architectures": [cls], "model_type": arch,
            "vocab_size": int(vocab), "hidden_size": hidden,
            "intermediate_size": int(key("feed_forward_length")),
            "num_hidden_layers": int(key("block_count")),
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(key("attention.head_count_kv", n_heads)),
            "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            "max_position_embeddings": int(key("context_length", 2048)),
            "rope_theta": float(key("rope.freq_base", 10000.0)),
            # llama.cpp writes the output projection only when it is not the embedding matrix
            "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
            "attention_bias": "blk.0.attn_q.bias" in {t.name for t in reader.tensors},
            # dequantized at load; the stage computes in float32 as transformers' GGUF loader does
            "torch_dtype": "float32",
            "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
            "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: GGUF metadata lacks or garbles a model key ({exc!r})") from exc
    if key("rope.dimension_count") is not None and arch == "llama":
        raw["head_dim"] = int(key("rope.dimension_count"))
    if key("attention.key_length") is not None and arch == "qwen3":
        # Qwen3's heads are not hidden/heads wide (Qwen3-0.6B: 1024 / 16 heads of 128); llama.cpp
        # writes the width here (transformers' GGUF loader takes Qwen3Config's default, 128).
        raw["head_dim"] = int(key("attention.key_length"))
    return raw


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name of a Hugging Face tensor name (None: not one the file format has)."""
    base, _, suffix = hf_name.rpartition(".")
    if base in _TOP:
        return f"{_TOP[base]}.{suffix}"
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", base)
    if m and m.group(2) in _LAYER:
        return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.{suffix}"
    return None


def hf_tensor_names(path: str | Path) -> dict[str, str]:
    """Hugging Face tensor name -> the file's tensor name, for every tensor the mesh reads."""
    out = {}
    for t in open_gguf(str(path)).tensors:
        base, _, suffix = t.name.rpartition(".")
        if base in _GGUF_TOP:
            out[f"{_GGUF_TOP[base]}.{suffix}"] = t.name
            continue
        m = _BLOCK.match(t.name)
        if m and m.group(2) in _GGUF_LAYER:
            out[f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.{m.group(3)}"] = t.name
    return out


def gguf_chat_template(path: str | Path) -> tuple[str | None, dict[str, str]]:
    """(the chat template or None, the special tokens it sees: bos_token, eos_token, ...)."""
    reader = open_gguf(str(path))
    template = field(reader, "tokenizer.chat_template")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    special = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = field(reader, f"tokenizer.ggml.{key}")
        if tokens is not None and token_id is not None and 0 <= token_id < len(tokens.data):
            special[name] = tokens.contents(token_id)
    return template, special
