"""The model's shape, read from a Hugging Face `config.json` (no torch import).

Both transformers 4.x (`rope_theta`, `rope_scaling`) and 5.x (`rope_parameters`) layouts are
accepted and normalised into one `rope` dict, so model code reads a single place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from stagemesh.errors import CheckpointError

# Architectures whose decoder layers are Llama-shaped (RMSNorm, rotary, GQA, gated MLP); the
# newer ones with small hooks (stage_worker/models/qwen3.py (and Qwen3-MoE), gemma2.py, phi3.py, mixtral.py).
LLAMA_FAMILY = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                "Qwen3MoeForCausalLM", "Gemma2ForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM"}
# Multi-head Latent Attention + mixture of experts (stage_worker/models/deepseek.py reads the
# DeepSeek-specific keys from `raw`).
DEEPSEEK_FAMILY = {"DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"}
SUPPORTED_ARCHITECTURES = LLAMA_FAMILY | DEEPSEEK_FAMILY

# Tokens per KV block, the mesh's one default: the coordinator plans with it (the plan hands it
# to the gateway) and every worker sizes its cache by it, so the two must agree.
KV_BLOCK_SIZE = 16


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only checkpoint; one per served model."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    torch_dtype: str
    # Normalised rope settings: {"rope_type": str, "rope_theta": float, ...scaling keys}.
    rope: dict = field(default_factory=dict)
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        """From `model_dir`/config.json, or from the metadata of a .gguf file (stagemesh/gguf_file.py)."""
        if str(model_dir).lower().endswith(".gguf"):
            from stagemesh.gguf_file import gguf_config

            return cls.from_dict(gguf_config(model_dir), source=str(model_dir))
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: no config.json in the checkpoint directory")
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else _arch_from_model_type(raw.get("model_type", ""))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"{source}: architecture {arch!r} is not supported "
                f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
            )
        try:
            hidden = int(raw["hidden_size"])
            n_heads = int(raw["num_attention_heads"])
            n_kv, head_dim = int(raw.get("num_key_value_heads") or n_heads), raw.get("head_dim")
            if arch in DEEPSEEK_FAMILY:
                # MLA: every query head has its own K/V once expanded (no GQA), of the q/k width;
                # config.json's head_dim (transformers writes qk_rope_head_dim) is not a head size.
                n_kv = n_heads
                head_dim = int(raw["qk_nope_head_dim"]) + int(raw["qk_rope_head_dim"])
            cfg = cls(
                architecture=arch,
                model_type=raw.get("model_type", ""),
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=n_heads,
                num_key_value_heads=n_kv,
                head_dim=int(head_dim or hidden // n_heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                # Qwen2 has biases on q/k/v but writes no attention_bias key.
                attention_bias=bool(raw.get("attention_bias", arch == "Qwen2ForCausalLM")),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
                rope=_normalise_rope(raw),
                eos_token_ids=_as_ids(raw.get("eos_token_id")),
                bos_token_id=raw.get("bos_token_id"),
                raw=raw,
            )
        except KeyError as exc:
            raise CheckpointError(f"{source}: missing required key {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: malformed value ({exc})") from exc
        return cfg


def _arch_from_model_type(model_type: str) -> str:
    return {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "qwen3_moe": "Qwen3MoeForCausalLM",
        "gemma2": "Gemma2ForCausalLM",
        "phi3": "Phi3ForCausalLM",
        "mixtral": "MixtralForCausalLM",
        "deepseek_v2": "DeepseekV2ForCausalLM",
        "deepseek_v3": "DeepseekV3ForCausalLM",
    }.get(model_type, model_type or "<none>")


def _normalise_rope(raw: dict) -> dict:
    """One dict for 4.x `rope_theta`+`rope_scaling` and 5.x `rope_parameters`."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and params:
        rope = dict(params)
    else:
        rope = dict(raw.get("rope_scaling") or {})
        rope.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = rope.pop("type", None) or rope.get("rope_type") or "default"
    rope["rope_type"] = rope_type
    rope["rope_theta"] = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
    return rope


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)
