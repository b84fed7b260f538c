"""Qwen3 (dense): the Llama-family layer with an RMSNorm over head_dim of every query and key
head, after the q/k/v projection and before rotary (`self_attn.q_norm` / `k_norm` in the
checkpoint: one [D] weight each, shared by the heads). No q/k/v biases (unlike Qwen2); a sliding
window only where config.json asks for one (`use_sliding_window`, `layer_types`).
"""

from __future__ import annotations

from stage_worker.models.llama import LayerTraits, LlamaStage


class Qwen3Stage(LlamaStage):
    """Layers [layer_start, layer_end) of a Qwen3 model (same contract as LlamaStage)."""

    traits = LayerTraits(qk_norm=True)
