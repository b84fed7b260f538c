"""Phi-3 (mini / small-context and 128k LongRoPE variants): the Llama-family layer, with

- q/k/v and gate/up already fused in the checkpoint (`self_attn.qkv_proj.weight`,
  `mlp.gate_up_proj.weight`): each fused tensor is split along its rows into the stage's parts
  (`FusedParts`), so the stage keeps the one merged layout (and TP, FP8 quantization) of Llama;
- LongRoPE (`rope_scaling.type` "longrope", formerly "su"): per-dimension `short_factor`s inside
  the original context, `long_factor`s beyond it, cos/sin scaled by
  sqrt(1 + ln(factor) / ln(original_max_position_embeddings)).

transformers picks short or long for a whole forward call by its longest position (so a prompt
longer than the original context is encoded with long factors throughout); a stage picks per
token by its own position, which equals transformers whenever the prompt fits the original
context (then every decode step agrees) and keeps a prefix's KV independent of what follows it,
as prefix caching and chunked prefill need.
- a sliding window on every layer when config.json sets `sliding_window` (Phi-3-mini-4k: 2047).
"""

from __future__ import annotations

import math

import torch

from stage_worker.models.llama import LlamaStage, rope_inv_freq
from stagemesh.errors import CheckpointError
from stagemesh.model_config import ModelConfig

FUSED = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")}


class FusedParts:
    """A checkpoint tensor that is several of the stage's parts stacked along dim 0: the loader's
    `copy_` lands each row range in its part's view (a tensor view, or any target with shape/copy_)."""

    def __init__(self, parts: list):
        self.parts = parts
        self.shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])

    def copy_(self, tensor: torch.Tensor) -> None:
        for part, rows in zip(self.parts, tensor.split([p.shape[0] for p in self.parts])):
            part.copy_(rows)


class Phi3Stage(LlamaStage):
    """Layers [layer_start, layer_end) of a Phi-3 model (same contract as LlamaStage)."""

    long_inv_freq: torch.Tensor | None = None  # [D/2] float32: LongRoPE past the original context
    original_max_position_embeddings: int = 0

    def __init__(self, cfg: ModelConfig, layer_start: int, layer_end: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        partial = float(cfg.rope.get("partial_rotary_factor", cfg.raw.get("partial_rotary_factor", 1.0)))
        if partial != 1.0:
            raise CheckpointError(f"config.json: partial_rotary_factor={partial} is not supported "
                                  f"for Phi3ForCausalLM (rotary over the whole head only)")
        super().__init__(cfg, layer_start, layer_end, dtype=dtype, device=device)
        if self.long_inv_freq is not None:
            self.long_inv_freq = self.long_inv_freq.to(device)

    def rope_init(self, cfg: ModelConfig) -> tuple[torch.Tensor, float]:
        kind = cfg.rope.get("rope_type", "default")
        if kind not in ("longrope", "su", "yarn"):  # transformers reads Phi-3's su / yarn as longrope
            return rope_inv_freq(cfg)
        rope = cfg.rope
        try:
            old_ctx = int(rope.get("original_max_position_embeddings")
                          or cfg.raw["original_max_position_embeddings"])
            short, long = rope["short_factor"], rope["long_factor"]
        except KeyError as exc:
            raise CheckpointError(f"config.json: longrope scaling lacks {exc.args[0]!r}") from exc
        d = cfg.head_dim
        if len(short) != d // 2 or len(long) != d // 2:
            raise CheckpointError(f"config.json: longrope short_factor/long_factor must have "
                                  f"{d // 2} entries (head_dim / 2)")
        factor = rope.get("factor") or cfg.max_position_embeddings / old_ctx
        scaling = rope.get("attention_factor")
        if scaling is None:
            scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_ctx))
        base = float(rope["rope_theta"])
        exponent = torch.arange(0, d, 2, dtype=torch.int64).float() / d
        self.original_max_position_embeddings = old_ctx
        self.long_inv_freq = 1.0 / (torch.tensor(long, dtype=torch.float32) * base ** exponent)
        return 1.0 / (torch.tensor(short, dtype=torch.float32) * base ** exponent), float(scaling)

    def inv_freq_at(self, positions: torch.Tensor) -> torch.Tensor:
        if self.long_inv_freq is None:
            return super().inv_freq_at(positions)
        beyond = (positions >= self.original_max_position_embeddings)[:, None]  # [T, 1]
        return torch.where(beyond, self.long_inv_freq[None, :], self.inv_freq[None, :])  # [T, D/2]

    def checkpoint_tensors(self) -> dict:
        """Llama's names, with each merged projection's parts read from the checkpoint's fused tensor."""
        out = super().checkpoint_tensors()
        for i in self.layers:
            for fused, parts in FUSED.items():
                for kind in ("weight", "bias"):
                    names = [f"layers.{i}.{fused.split('.')[0]}.{p}.{kind}" for p in parts]
                    if names[0] in out:
                        out[f"layers.{i}.{fused}.{kind}"] = FusedParts([out.pop(n) for n in names])
        return out
