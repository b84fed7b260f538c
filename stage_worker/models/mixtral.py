"""Mixtral (8x7B, 8x22B): the Llama-family layer with its MLP replaced by a sparse mixture of
experts, run by the same fused-MoE layer as DeepSeek's (models/moe.py: stacked experts, grouped
GEMMs on the CPU, the Triton fused-MoE kernels on CUDA).

Routing as transformers' MixtralSparseMoeBlock: router logits x @ gate.T in the model dtype,
softmax in float32, top-k (`num_experts_per_tok`, 2) renormalised to sum 1 (no epsilon), no
shared experts, no scaling. Experts are SwiGLU MLPs of width `intermediate_size`, whose
checkpoint tensors are `block_sparse_moe.experts.{e}.w1` (gate), `w3` (up), `w2` (down); the
stage names the block `mlp` like every Llama-shaped layer and maps the checkpoint's names to it.
"""

from __future__ import annotations

from stage_worker.models import quant
from stage_worker.models.llama import LayerTraits, LlamaStage
from stage_worker.models.moe import MoESpec, RouterSpec, SparseMoE
from stagemesh.errors import CheckpointError
from stagemesh.model_config import ModelConfig


def softmax_topk_moe(cfg: ModelConfig, inter: int, renormalize: bool,
                     names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> SparseMoE:
    """A sparse MoE block routed as Mixtral and Qwen3-MoE route: logits in the model dtype, softmax
    in float32, sorted top-k (`num_experts_per_tok`), renormalised to sum 1 (no epsilon) or not."""
    raw = cfg.raw
    try:
        n_experts = raw.get("num_experts") or raw["num_local_experts"]
        router = RouterSpec(n_experts=int(n_experts), top_k=int(raw["num_experts_per_tok"]),
                            norm_topk_prob=renormalize, norm_eps=0.0, logits_fp32=False, sorted_topk=True)
    except KeyError as exc:
        raise CheckpointError(f"config.json: missing required key {exc.args[0]!r}") from exc
    except ValueError as exc:
        raise CheckpointError(f"config.json: {exc}") from exc
    spec = MoESpec(hidden=cfg.hidden_size, inter=inter, router=router, bias=cfg.mlp_bias, names=names)
    return SparseMoE(spec, fp8=quant.is_fp8(cfg))


def mixtral_moe(cfg: ModelConfig, layer: int) -> SparseMoE:
    """Every Mixtral layer's MLP: experts of width intermediate_size (w1/w3/w2), top-k renormalised."""
    return softmax_topk_moe(cfg, cfg.intermediate_size, renormalize=True, names=("w1", "w3", "w2"))


class MixtralStage(LlamaStage):
    """Layers [layer_start, layer_end) of a Mixtral model (same contract as LlamaStage)."""

    traits = LayerTraits(mlp=mixtral_moe)

    def checkpoint_tensors(self) -> dict:
        """The checkpoint calls each layer's MoE block `block_sparse_moe`; the stage calls it `mlp`."""
        return {name.replace(".mlp.", ".block_sparse_moe.", 1): t for name, t in super().checkpoint_tensors().items()}
