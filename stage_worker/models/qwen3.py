"""Qwen3 and Qwen3-MoE: the Llama-family layer with an RMSNorm over head_dim of every query and
key head, after the q/k/v projection and before rotary (`self_attn.q_norm` / `k_norm` in the
checkpoint: one [D] weight each, shared by the heads). No q/k/v biases (unlike Qwen2); a sliding
window only where config.json asks for one (`use_sliding_window`, `layer_types`).

Qwen3-MoE (30B-A3B, 235B-A22B): layer i's MLP is a sparse MoE block unless i is in
`mlp_only_layers` or (i + 1) is not a multiple of `decoder_sparse_step`, routed as Mixtral
(softmax top-k, renormalised when `norm_topk_prob`), experts of width `moe_intermediate_size`
(`mlp.experts.{e}.gate_proj/up_proj/down_proj`), on models/moe.py's fused-MoE layer.
"""

from __future__ import annotations

from torch import nn

from stage_worker.models.llama import LayerTraits, LlamaMLP, LlamaStage
from stage_worker.models.mixtral import softmax_topk_moe
from stagemesh.model_config import ModelConfig


class Qwen3Stage(LlamaStage):
    """Layers [layer_start, layer_end) of a Qwen3 model (same contract as LlamaStage)."""

    traits = LayerTraits(qk_norm=True)


def qwen3_moe_mlp(cfg: ModelConfig, layer: int) -> nn.Module:
    """Layer `layer`'s MLP: the sparse MoE block, or the dense one (mlp_only_layers, decoder_sparse_step)."""
    raw = cfg.raw
    sparse = (layer not in (raw.get("mlp_only_layers") or [])
              and (layer + 1) % int(raw.get("decoder_sparse_step") or 1) == 0)
    if not sparse:
        return LlamaMLP(cfg)
    return softmax_topk_moe(cfg, int(raw["moe_intermediate_size"]), renormalize=bool(raw.get("norm_topk_prob")))


class Qwen3MoeStage(LlamaStage):
    """Layers [layer_start, layer_end) of a Qwen3-MoE model (same contract as LlamaStage)."""

    traits = LayerTraits(qk_norm=True, mlp=qwen3_moe_mlp)
