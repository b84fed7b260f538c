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


def mixtral_moe(cfg: ModelConfig) -> SparseMoE:
    """One layer's sparse MoE block from config.json (num_local_experts, num_experts_per_tok)."""
    raw = cfg.raw
    try:
        router = RouterSpec(n_experts=int(raw["num_local_experts"]), top_k=int(raw["num_experts_per_tok"]),
                            norm_topk_prob=True, norm_eps=0.0, logits_fp32=False, sorted_topk=True)
    except KeyError as exc:
        raise CheckpointError(f"config.json: missing required key {exc.args[0]!r}") from exc
    except ValueError as exc:
        raise CheckpointError(f"config.json: {exc}") from exc
    spec = MoESpec(hidden=cfg.hidden_size, inter=cfg.intermediate_size, router=router, bias=cfg.mlp_bias,
                   names=("w1", "w3", "w2"))
    return SparseMoE(spec, fp8=quant.is_fp8(cfg))


class MixtralStage(LlamaStage):
    """Layers [layer_start, layer_end) of a Mixtral model (same contract as LlamaStage)."""

    traits = LayerTraits(mlp=mixtral_moe)

    def checkpoint_tensors(self) -> dict:
        """The checkpoint calls each layer's MoE block `block_sparse_moe`; the stage calls it `mlp`."""
        return {name.replace(".mlp.", ".block_sparse_moe.", 1): t for name, t in super().checkpoint_tensors().items()}
