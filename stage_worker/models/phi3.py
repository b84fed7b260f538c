"""Phi-3 (mini/small/medium, 4k and 128k LongRoPE variants) and Phi-4-mini (same architecture,
partial rotary): the Llama-family layer, with

- q/k/v and gate/up already fused in the checkpoint (`self_attn.qkv_proj.weight`,
  `mlp.gate_up_proj.weight`): each fused tensor is split along its rows into the stage's parts
  (`FusedParts`), so the stage keeps the one merged layout (and TP, FP8 quantization) of Llama;
- LongRoPE (`rope_scaling.type` "longrope", formerly "su"): per-dimension `short_factor`s inside
  the original context, `long_factor`s beyond it, cos/sin scaled by
  sqrt(1 + ln(factor) / ln(original_max_position_embeddings)). transformers picks short or long
  for a whole forward call by its longest position, and its `generate` re-encodes the whole
  sequence when it crosses the original context; a stage picks per token by its own position
  (what transformers' forward does for one new token over a KV cache). Equal to transformers
  whenever prompt and continuation fit the original context; past it, earlier tokens keep their
  short-factor KV, so tokens may differ from `generate`'s. A prefix's KV never depends on what
  follows it, as prefix caching and chunked prefill need;
- partial rotary (`partial_rotary_factor`, Phi-4-mini 0.75) by a permutation of q/k head dims at
  load (`rotary_layout`), so the shared rotary kernel runs unchanged;
- a sliding window on every layer when config.json sets `sliding_window` (Phi-3-mini-4k: 2047).
"""

from __future__ import annotations

import math

import torch

from stage_worker.models import quant
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


def rotary_dim(cfg: ModelConfig) -> int:
    """Leading dims of a head that rotate (`partial_rotary_factor`, Phi-4-mini: 0.75); the rest pass."""
    partial = float(cfg.rope.get("partial_rotary_factor", cfg.raw.get("partial_rotary_factor", 1.0)))
    r = int(cfg.head_dim * partial)
    if not 0 < r <= cfg.head_dim or r % 2:
        raise CheckpointError(f"config.json: partial_rotary_factor={partial} gives {r} rotary dims of "
                              f"head_dim={cfg.head_dim} (an even number in [2, head_dim] is needed)")
    return r


def rotary_layout(d: int, r: int) -> torch.Tensor:
    """perm [D]: head dim i of the checkpoint (rotate_half over its first r dims, as transformers'
    partial rotary) -> its dim on the stage, where rotate_half spans the whole head: rotated pair
    (i, i + r/2) -> (i, i + D/2), the D - r passed dims -> the slots left, [r/2, D/2) and
    [D/2 + r/2, D), whose rotary frequency is 0 and cos 1 (`Phi3Stage.rotary`). q and k are
    permuted alike, so q . k and the attention are unchanged."""
    half, rh = d // 2, r // 2
    passed = list(range(rh, half)) + list(range(half + rh, d))
    return torch.tensor(list(range(rh)) + list(range(half, half + rh)) + passed)


class Phi3Stage(LlamaStage):
    """Layers [layer_start, layer_end) of a Phi-3 model (same contract as LlamaStage).

    Partial rotary (Phi-4-mini): the shared rotary kernel rotates whole heads (rotate_half over D),
    so q and k rows are permuted at load (`rotary_layout`) to put the checkpoint's rotated pairs on
    its pairs, and the passed dims get frequency 0 and cos 1.
    """

    long_inv_freq: torch.Tensor | None = None  # [D/2] float32: LongRoPE past the original context
    original_max_position_embeddings: int = 0

    def __init__(self, cfg: ModelConfig, layer_start: int, layer_end: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        r = rotary_dim(cfg)
        if r < cfg.head_dim and quant.is_fp8(cfg):
            raise CheckpointError("config.json: partial rotary with FP8 weights is not supported "
                                  "(its q/k rows are permuted at load, across FP8 scale blocks)")
        super().__init__(cfg, layer_start, layer_end, dtype=dtype, device=device)
        self.rotary_dim = r
        if self.long_inv_freq is not None:
            self.long_inv_freq = self.long_inv_freq.to(device)
        half = cfg.head_dim // 2  # [D] the stage's passed dims (partial rotary): see rotary_layout
        self._passed = (torch.arange(cfg.head_dim) % half >= r // 2).to(device)

    def rope_init(self, cfg: ModelConfig) -> tuple[torch.Tensor, float]:
        """(inv_freq [D/2], cos/sin scaling) over the rotated dims, 0 on the passed ones."""
        kind, d, r = cfg.rope.get("rope_type", "default"), cfg.head_dim, rotary_dim(cfg)
        if kind not in ("longrope", "su", "yarn"):  # transformers reads Phi-3's su / yarn as longrope
            if r == d:
                return rope_inv_freq(cfg)
            if kind != "default":
                raise CheckpointError(f"config.json: rope_type {kind!r} with partial rotary is not supported")
            base = float(cfg.rope["rope_theta"])
            return _padded(1.0 / (base ** (torch.arange(0, r, 2, dtype=torch.int64).float() / r)), d), 1.0
        rope = cfg.rope
        try:
            old_ctx = int(rope.get("original_max_position_embeddings")
                          or cfg.raw["original_max_position_embeddings"])
            short, long = rope["short_factor"], rope["long_factor"]
        except KeyError as exc:
            raise CheckpointError(f"config.json: longrope scaling lacks {exc.args[0]!r}") from exc
        if len(short) != r // 2 or len(long) != r // 2:
            raise CheckpointError(f"config.json: longrope short_factor/long_factor must have "
                                  f"{r // 2} entries (rotary dims / 2)")
        factor = rope.get("factor") or cfg.max_position_embeddings / old_ctx
        scaling = rope.get("attention_factor")
        if scaling is None:
            scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_ctx))
        base = float(rope["rope_theta"])
        exponent = torch.arange(0, r, 2, dtype=torch.int64).float() / r
        self.original_max_position_embeddings = old_ctx
        self.long_inv_freq = _padded(1.0 / (torch.tensor(long, dtype=torch.float32) * base ** exponent), d)
        return _padded(1.0 / (torch.tensor(short, dtype=torch.float32) * base ** exponent), d), float(scaling)

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype):
        cos, sin = super().rotary(positions, dtype)
        if self.rotary_dim < self.cfg.head_dim:  # passed dims: x * 1 + rotate_half(x) * 0
            cos = cos.masked_fill(self._passed, 1.0)
        return cos, sin

    @torch.no_grad()
    def after_load(self) -> None:
        """Partial rotary: permute each head's q and k rows into the stage's layout (rotary_layout)."""
        d = self.cfg.head_dim
        if self.rotary_dim == d:
            return
        perm = rotary_layout(d, self.rotary_dim).to(self.inv_freq.device)
        for layer in self.layers.values():
            attn = layer.self_attn
            for t in (attn.qkv_proj.weight, attn.qkv_proj.bias):
                if t is None:
                    continue
                heads = t[: (attn.n_heads + attn.n_kv) * d].view(attn.n_heads + attn.n_kv, d, -1)
                heads[:, perm] = heads.clone()

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


def _padded(inv_freq: torch.Tensor, d: int) -> torch.Tensor:
    """[r/2] -> [D/2] with zeros for the passed dims (frequency 0: no rotation)."""
    return torch.cat([inv_freq, inv_freq.new_zeros(d // 2 - inv_freq.shape[0])])
