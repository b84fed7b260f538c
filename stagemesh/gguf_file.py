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
from typing import NamedTuple

from stagemesh.errors import CheckpointError

# llama.cpp's `general.architecture` -> the transformers class whose layers it holds. llama.cpp
# writes Mistral checkpoints as "llama" too (same layers, same Q/K row permutation), and Mixtral as
# "llama" with experts (`llama.expert_count`; see `gguf_architecture`).
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM", "gemma2": "Gemma2ForCausalLM", "phi3": "Phi3ForCausalLM",
}
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MixtralForCausalLM": "mixtral", "Qwen2ForCausalLM": "qwen2",
                "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe", "Gemma2ForCausalLM": "gemma2",
                "Phi3ForCausalLM": "phi3"}
# Architectures whose converter (convert_hf_to_gguf.py, LlamaModel.modify_tensors) permutes the
# rows of q_proj/k_proj (weight and bias) for llama.cpp's rotary layout; the loader undoes it.
PERMUTED_QK = {"llama"}
# Gemma 2's converter stores each RMSNorm weight w as 1 + w, the value the stage holds after its
# `after_load` (models/gemma2.py): this config key tells the stage not to add 1 again.
NORMS_HOLD_ONE_PLUS_W = "stagemesh_norms_hold_one_plus_w"

_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_GGUF_TOP = {v: k for k, v in _TOP.items()}
_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",  # Qwen3's per-head norms
}
# Where a family's llama.cpp names depart from Llama's (gguf's TensorNameMap for that architecture).
_LAYER_BY_ARCH = {
    "gemma2": {**_LAYER, "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"},
    # Phi-3's fused q/k/v and gate/up, split into the merged layout by the stage (models/phi3.py)
    "phi3": {k: v for k, v in _LAYER.items() if not k.startswith("mlp.")}
    | {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"},
}
# MoE layers: the router and the experts, (HF module, per-expert names gate/up/down) by class.
_MOE = {"MixtralForCausalLM": ("block_sparse_moe", ("w1", "w3", "w2")),
        "Qwen3MoeForCausalLM": ("mlp", ("gate_proj", "up_proj", "down_proj"))}
_EXPERT_ROLES = ("ffn_gate", "ffn_up", "ffn_down")
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_OLD_EXPERT = re.compile(r"^blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)\.(\d+)\.weight$")  # pre-2024 Mixtral GGUFs
_SPLIT = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


class GGUFRef(NamedTuple):
    """Where one Hugging Face tensor lies: a file of the set, its tensor, and for a stacked expert
    tensor ([n_experts, ...], `ffn_*_exps`) the expert's index."""

    file: str
    name: str
    expert: int | None = None


def is_gguf(path: str | Path) -> bool:
    """A --model argument naming a GGUF file (not a checkpoint directory)."""
    return str(path).lower().endswith(".gguf")


@functools.lru_cache(maxsize=8)
def open_gguf(path: str):
    """The file's GGUFReader (memory-mapped; parsing the metadata takes ~2 s for a 49k vocabulary,
    hence one per process and path). For a split set (`name-00002-of-00003.gguf`), the first
    file's: it holds the metadata. CheckpointError when it is missing or not a GGUF file."""
    return file_reader(str(gguf_files(path)[0]))


@functools.lru_cache(maxsize=16)
def file_reader(path: str):
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


@functools.lru_cache(maxsize=8)
def gguf_files(path: str | Path) -> tuple[Path, ...]:
    """Every file of the checkpoint: the path itself, or all files of a llama.cpp split set
    (gguf-split's `name-0000k-of-0000N.gguf`, any of them named), first to last."""
    path = Path(path)
    m = _SPLIT.match(path.name)
    if not m:
        return (path,)
    count = int(m.group(3))
    files = tuple(path.with_name(f"{m.group(1)}-{i:05d}-of-{m.group(3)}.gguf") for i in range(1, count + 1))
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{path}: file {f.name} of this {count}-file split GGUF is missing")
    declared = field(file_reader(str(files[0])), "split.count", 1)
    if declared != count:
        raise CheckpointError(f"{files[0]}: split.count is {declared}, its name says {count}")
    return files


def field(reader, key: str, default=None):
    """One metadata value as Python (str, int, float, bool, list), or `default`."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _tensor_names(path) -> set[str]:
    return {t.name for f in gguf_files(path) for t in file_reader(str(f)).tensors}


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
    if arch == "llama" and field(reader, "llama.expert_count", 0):
        return arch, "MixtralForCausalLM"
    return arch, GGUF_ARCHITECTURES[arch]


def gguf_config(path: str | Path) -> dict:
    """The Hugging Face config.json the file describes (transformers' GGUF_CONFIG_MAPPING, plus
    what llama.cpp's converter writes and transformers drops: Gemma 2's caps, Phi-3's window and
    LongRoPE factors, experts of a llama-architecture file)."""
    arch, cls = gguf_architecture(path)
    reader = open_gguf(str(path))
    names = _tensor_names(path)

    def key(name, default=None):
        return field(reader, f"{arch}.{name}", default)

    try:
        n_heads = int(key("attention.head_count"))
        hidden = int(key("embedding_length"))
        vocab = key("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
        raw = {
            "architectures": [cls], "model_type": _MODEL_TYPES[cls],
            "vocab_size": int(vocab), "hidden_size": hidden,
            "intermediate_size": int(key("feed_forward_length")),
            "num_hidden_layers": int(key("block_count")),
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(key("attention.head_count_kv", n_heads)),
            "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            "max_position_embeddings": int(key("context_length", 2048)),
            "rope_theta": float(key("rope.freq_base", 10000.0)),
            # llama.cpp writes the output projection only when it is not the embedding matrix
            "tie_word_embeddings": "output.weight" not in names,
            "attention_bias": "blk.0.attn_q.bias" in names,
            # dequantized at load; the stage computes in float32 as transformers' GGUF loader does
            "torch_dtype": "float32",
            "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
            "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
        }
        _FAMILY_KEYS.get(arch, _no_keys)(raw, key, names, path)
        if cls in _MOE:
            _moe_keys(raw, key, names, path)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: GGUF metadata lacks or garbles a model key ({exc!r})") from exc
    return raw


def _no_keys(raw, key, names, path) -> None:
    pass


def _llama_keys(raw, key, names, path) -> None:
    if key("rope.dimension_count") is not None:
        raw["head_dim"] = int(key("rope.dimension_count"))


def _qwen3_keys(raw, key, names, path) -> None:
    if key("attention.key_length") is not None:
        # Qwen3's heads are not hidden/heads wide (Qwen3-0.6B: 1024 / 16 heads of 128); llama.cpp
        # writes the width here (transformers' GGUF loader takes Qwen3Config's default, 128).
        raw["head_dim"] = int(key("attention.key_length"))


# Gemma 2 27B trains with query_pre_attn_scalar = hidden / heads (4608 / 32 = 144, not its head
# width of 128; gemma_pytorch config.py), the 2B and 9B with the head width. No converter writes
# that value into a GGUF file, so llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA2) tells the 27B by
# its layer count alone (`case 46: type = LLM_TYPE_27B`) and scales by it; we follow the same rule.
_GEMMA2_27B_LAYERS = 46


def _gemma2_keys(raw, key, names, path) -> None:
    """llama.cpp's Gemma 2 keys; the attention scale as llama.cpp's (see _GEMMA2_27B_LAYERS)."""
    head_dim = int(key("attention.key_length", raw["hidden_size"] // raw["num_attention_heads"]))
    raw.update(head_dim=head_dim, hidden_activation="gelu_pytorch_tanh",
               attn_logit_softcapping=float(key("attn_logit_softcapping", 50.0)),
               final_logit_softcapping=float(key("final_logit_softcapping", 30.0)),
               sliding_window=int(key("attention.sliding_window", 4096)),
               query_pre_attn_scalar=(raw["hidden_size"] // raw["num_attention_heads"]
                                      if raw["num_hidden_layers"] == _GEMMA2_27B_LAYERS else head_dim))
    raw[NORMS_HOLD_ONE_PLUS_W] = True


def _phi3_keys(raw, key, names, path) -> None:
    """Phi-3's window, partial rotary and LongRoPE factors (stored as tensors
    `rope_factors_long/short.weight`, the original context as `rope.scaling.original_context_length`)."""
    head_dim = raw["hidden_size"] // raw["num_attention_heads"]
    rope_dims = int(key("rope.dimension_count", head_dim))
    if key("attention.sliding_window") is not None:
        raw["sliding_window"] = int(key("attention.sliding_window"))
    rope = {"rope_type": "default", "rope_theta": raw["rope_theta"]}
    if "rope_factors_long.weight" in names:
        orig = int(key("rope.scaling.original_context_length", raw["max_position_embeddings"]))
        rope.update(rope_type="longrope", original_max_position_embeddings=orig,
                    long_factor=_vector(path, "rope_factors_long.weight"),
                    short_factor=_vector(path, "rope_factors_short.weight"))
        raw["original_max_position_embeddings"] = orig
    if rope_dims != head_dim:
        rope["partial_rotary_factor"] = rope_dims / head_dim
    raw["rope_parameters"] = rope


def _moe_keys(raw, key, names, path) -> None:
    """Experts of a Mixtral (llama) or Qwen3-MoE file; a layer with no router is dense."""
    raw["num_local_experts"] = int(key("expert_count"))
    raw["num_experts_per_tok"] = int(key("expert_used_count"))
    if raw["model_type"] == "qwen3_moe":
        raw["moe_intermediate_size"] = int(key("expert_feed_forward_length", raw["intermediate_size"]))
        raw["norm_topk_prob"] = True  # llama.cpp's qwen3moe always renormalises (as transformers' loader)
        raw["mlp_only_layers"] = [i for i in range(raw["num_hidden_layers"])
                                  if f"blk.{i}.ffn_gate_inp.weight" not in names]
        raw["decoder_sparse_step"] = 1
        _qwen3_keys(raw, key, names, path)
    else:
        raw["sliding_window"] = None


_FAMILY_KEYS = {"llama": _llama_keys, "qwen3": _qwen3_keys, "gemma2": _gemma2_keys, "phi3": _phi3_keys}


def _vector(path, name: str) -> list[float]:
    """A small float32 tensor of the file as a list (Phi-3's rope factors)."""
    for f in gguf_files(path):
        for t in file_reader(str(f)).tensors:
            if t.name == name:
                return [float(x) for x in t.data.reshape(-1)]
    raise KeyError(name)


def gguf_name(hf_name: str, arch: str = "llama") -> str | None:
    """llama.cpp's name of a Hugging Face tensor name (None: not one the file format has; experts
    are stacked in the file, see `hf_tensor_names`)."""
    base, _, suffix = hf_name.rpartition(".")
    if base in _TOP:
        return f"{_TOP[base]}.{suffix}"
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", base)
    layer = _LAYER_BY_ARCH.get(arch, _LAYER)
    if m and m.group(2) in layer:
        return f"blk.{m.group(1)}.{layer[m.group(2)]}.{suffix}"
    if m and m.group(2).endswith(".gate") and m.group(2)[:-5] in {"mlp", "block_sparse_moe"}:
        return f"blk.{m.group(1)}.ffn_gate_inp.{suffix}"
    return None


def hf_tensor_names(path: str | Path) -> dict[str, GGUFRef]:
    """Hugging Face tensor name -> where it lies, for every tensor the mesh reads (all files of a
    split set; each expert of a stacked `ffn_*_exps` tensor under its own name)."""
    arch, cls = gguf_architecture(path)
    back = {v: k for k, v in _LAYER_BY_ARCH.get(arch, _LAYER).items()}
    moe, experts = _MOE.get(cls, (None, ()))
    if moe:
        back["ffn_gate_inp"] = f"{moe}.gate"
    n_experts = int(field(open_gguf(str(path)), f"{arch}.expert_count", 0) or 0)
    out = {}
    for f in gguf_files(path):
        for t in file_reader(str(f)).tensors:
            out.update(_hf_names(t.name, str(f), back, moe, experts, n_experts))
    return out


def _hf_names(name: str, file: str, back: dict, moe, experts, n_experts: int) -> dict[str, GGUFRef]:
    base, _, suffix = name.rpartition(".")
    if base in _GGUF_TOP:
        return {f"{_GGUF_TOP[base]}.{suffix}": GGUFRef(file, name)}
    m = _BLOCK.match(name)
    if m and moe and m.group(2).endswith("_exps") and m.group(2)[:-5] in _EXPERT_ROLES:
        part = experts[_EXPERT_ROLES.index(m.group(2)[:-5])]
        return {f"model.layers.{m.group(1)}.{moe}.experts.{e}.{part}.{m.group(3)}": GGUFRef(file, name, e)
                for e in range(n_experts)}
    if m and m.group(2) in back:
        return {f"model.layers.{m.group(1)}.{back[m.group(2)]}.{m.group(3)}": GGUFRef(file, name)}
    m = _OLD_EXPERT.match(name)
    if m and moe:
        part = experts[_EXPERT_ROLES.index(m.group(2))]
        return {f"model.layers.{m.group(1)}.{moe}.experts.{m.group(3)}.{part}.weight": GGUFRef(file, name)}
    return {}


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
