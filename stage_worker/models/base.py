"""What every model family's stage shares: the embed -> layers -> (norm, head) walk.

A family's stage class builds `embed_tokens` (first stage), `layers` (a ModuleDict keyed by the
global layer index), `norm` and `lm_head` (last stage), and supplies `rotary(positions, dtype)`
and `make_kv_cache(...)`; the data flow through a stage is the same for every family.
"""

from __future__ import annotations

import torch
from torch import nn

from stage_worker.attention import AttnMetadata


class PipelineStage(nn.Module):
    """Layers [layer_start, layer_end) of a decoder-only model; one per stage worker.

    Stateless between calls except through the KV pool it is handed (forward writes the new
    tokens' K/V there). Not thread-safe: run one micro-batch at a time.
    """

    layer_start: int
    layer_end: int
    is_first: bool
    is_last: bool

    # Query tokens per tile of unified_attention for mixed micro-batches on a GPU; None: this
    # family's attention has no unified kernel (mixed micro-batches use its own paged path).
    attention_tile_q: int | None = None

    @property
    def num_local_layers(self) -> int:
        return self.layer_end - self.layer_start

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor | None, hidden: torch.Tensor | None,
                meta: AttnMetadata, kv) -> torch.Tensor:
        """input_ids: [T] (first stage) or hidden: [T, H] -> hidden [T, H] before final norm."""
        if self.is_first:
            if input_ids is None:
                raise ValueError("the first stage takes input_ids")
            x = self.embed_tokens(input_ids)  # [T, H]
        else:
            if hidden is None:
                raise ValueError("a non-first stage takes hidden states")
            x = hidden.to(self.dtype)  # [T, H]
        cos, sin = self.rotary(meta.positions, x.dtype)
        return self.run_layers(x, cos, sin, meta, kv)

    def run_layers(self, x: torch.Tensor, cos, sin, meta: AttnMetadata, kv) -> torch.Tensor:
        """x: [T, H] -> [T, H] through every local layer (a family may override the walk)."""
        for local, layer in enumerate(self.layers.values()):
            x = layer(x, cos, sin, meta, kv.layer(local))
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [S, H] (rows to sample, pre-norm) -> logits [S, V] float32. Last stage only."""
        if not self.is_last:
            raise ValueError("compute_logits is only available on the last stage")
        return self.lm_head(self.norm(hidden.to(self.dtype))).float()
