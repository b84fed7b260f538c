"""Layers both model families build from: RMSNorm and merged projections, with their checkpoint names.

A stage holds ONE layout on every device: q/k/v and gate/up are single matmuls (`MergedLinear`),
a MoE's experts are stacked tensors. The checkpoint keeps its own names and shapes
(`q_proj.weight`, `experts.3.up_proj.weight`, ...), so `checkpoint_tensors` maps each checkpoint
name to the *view* of the stage's tensor it fills; the loader copies into those views (the load
hook of gpt-fast's `wqkv`, done on the loader's side so nothing is concatenated or held twice).
"""

from __future__ import annotations

import torch
from torch import nn

from stage_worker.kernels import fused_ops
from stage_worker.kernels.fp8_act import Fp8Act
from stage_worker.models.quant import Fp8Linear, input_quant


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, quant: str | None = None) -> torch.Tensor | Fp8Act:  # x: [T, H]
        """weight * norm(x) with float32 statistics (transformers' formula): one Triton kernel on
        CUDA, fused_ops.rms_norm_torch elsewhere; quant as add_and_norm's."""
        return fused_ops.rms_norm(x, self.weight, self.eps, quant=quant)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor | None,
                     quant: str | None = None) -> tuple[torch.Tensor | Fp8Act, torch.Tensor]:
        """The residual stream carried beside the hidden states (vLLM's layout): (norm(x + residual),
        x + residual), one kernel on CUDA (fused_ops); residual None (a stage's first layer):
        (norm(x), x). quant: the norm comes out quantized for the FP8 GEMM after it, in the same
        kernel (quant.input_quant says which form)."""
        if residual is None:
            return fused_ops.rms_norm(x, self.weight, self.eps, quant=quant), x
        return fused_ops.fused_add_rms_norm(x, residual, self.weight, self.eps, quant=quant)


class MergedLinear(nn.Linear):
    """Several projections of one input as one matmul: the output rows are `parts` in order.

    parts: checkpoint name (a sibling of this module, e.g. "q_proj") -> its output rows. The
    checkpoint's tensors land in row slices (`checkpoint_views`); a column-parallel shard keeps
    each part's slice of rows (`shard_rows`), so a fused layout splits by heads like the separate one.
    """

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool):
        super().__init__(in_features, sum(parts.values()), bias=bias)
        self.parts = dict(parts)

    def split(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """t: [out, ...] (weight or bias) -> one view per part, along dim 0."""
        return t.split(list(self.parts.values()))

    def checkpoint_views(self, path: str) -> dict[str, torch.Tensor]:
        parent = path.rpartition(".")[0]
        prefix = parent + "." if parent else ""
        views = {}
        for name, w in zip(self.parts, self.split(self.weight)):
            views[f"{prefix}{name}.weight"] = w
        if self.bias is not None:
            for name, b in zip(self.parts, self.split(self.bias)):
                views[f"{prefix}{name}.bias"] = b
        return views

    @torch.no_grad()
    def shard_rows(self, rank: int, world: int) -> None:
        """Keep rows [rank/world, (rank+1)/world) of every part (tensor parallelism), re-merged."""
        def keep(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([p[rank * (p.shape[0] // world):(rank + 1) * (p.shape[0] // world)]
                              for p in self.split(t)])

        w = keep(self.weight.data)
        b = keep(self.bias.data) if self.bias is not None else None
        self.parts = {name: rows // world for name, rows in self.parts.items()}
        self.weight = nn.Parameter(w, requires_grad=False)
        if b is not None:
            self.bias = nn.Parameter(b, requires_grad=False)
        self.out_features = w.shape[0]


class GatedMLP(nn.Module):
    """down_proj(act(gate) * up) with gate/up as one matmul (`gate_up_proj`): the dense MLP of both
    families (DeepSeek's shared experts too). With FP8 projections each takes its input in the form
    its GEMM wants: the block's input from the norm before it (`input_quant`), the product from
    the activation kernel."""

    def __init__(self, hidden: int, inter: int, bias: bool = False, fp8: bool | str | None = False,
                 act_and_mul=fused_ops.silu_and_mul):
        super().__init__()
        self.gate_up_proj = make_merged_linear(hidden, {"gate_proj": inter, "up_proj": inter}, bias, fp8)
        self.down_proj = make_linear(inter, hidden, bias, fp8)
        self.act_and_mul = act_and_mul  # fused_ops.silu_and_mul or gelu_tanh_and_mul

    def input_quant(self, m: int) -> str | None:
        return input_quant(self.gate_up_proj, m)

    def forward(self, x: torch.Tensor | Fp8Act) -> torch.Tensor:  # x: [T, H], or quantized (input_quant)
        gate_up = self.gate_up_proj(x)  # [T, 2I]
        return self.down_proj(self.act_and_mul(gate_up, quant=input_quant(self.down_proj, gate_up.shape[0])))


def make_linear(in_features: int, out_features: int, bias: bool, fp8: bool | str | None = False) -> nn.Module:
    """A projection of the stage: nn.Linear, or Fp8Linear when the stage's weights are FP8
    (an FP8 checkpoint, or `--quantization fp8`; models/quant.py). fp8: True or "block"
    (128x128 scales), "channel" (one per output row, quant.fp8_scheme)."""
    if fp8:
        return Fp8Linear(in_features, out_features, bias=bias, channel=fp8 == "channel")
    return nn.Linear(in_features, out_features, bias=bias)


def make_merged_linear(in_features: int, parts: dict[str, int], bias: bool,
                       fp8: bool | str | None = False) -> nn.Module:
    """MergedLinear, or its FP8 form (same checkpoint names, one FP8 GEMM; fp8 as make_linear)."""
    if fp8:
        return Fp8Linear(in_features, bias=bias, parts=parts, channel=fp8 == "channel")
    return MergedLinear(in_features, parts, bias=bias)


def checkpoint_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint-layout name (module-relative, global layer indices) -> the tensor it fills.

    A module with `checkpoint_views(path)` names its own parameters; every other parameter keeps
    its name. A tied parameter appears once, under the first module that holds it.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for path, m in module.named_modules():
        own = list(m.named_parameters(recurse=False))
        if hasattr(m, "checkpoint_views"):
            out.update(m.checkpoint_views(path))
            seen.update(id(p) for _, p in own)
            continue
        for name, p in own:
            if id(p) not in seen:
                seen.add(id(p))
                out[f"{path}.{name}" if path else name] = p
    return out
