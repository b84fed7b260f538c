"""One sparse mixture-of-experts layer for every family (DeepSeek V2/V3, Mixtral-style top-k).

Data flow for T tokens (H hidden, E experts, k experts per token, I expert intermediate):

  x [T, H] --Router (F.linear, float32 unless the family routes in its dtype)--> logits [T, E]
           --route(): scores, (group-limited) top-k, weights--> weights [T, k] fp32, ids [T, k]
             (CUDA + Triton: kernels/moe_route.py, the same routing in one launch)
  routed:  CUDA + Triton: kernels/fused_moe.py (align by expert on device, two grouped GEMM
           launches, routed weight in the epilogue); elsewhere: sort by expert, two grouped GEMMs
           (torch._grouped_mm, or one mm per expert), weights, back to token order, sum over k
  out = routed + shared(x)  (shared experts: a dense MLP the family builds, e.g. DeepSeek's)

Routing variants (`RouterSpec`, from config.json by each family):
  - softmax top-k, optionally renormalised (Mixtral: renormalised, no eps, logits in the model
    dtype; DeepSeek-V2 "greedy": not renormalised, times routed_scaling_factor);
  - V2 "group_limited_greedy": softmax, groups ranked by their max, top `topk_group` groups kept;
  - V3 "noaux_tc": sigmoid scores; experts *chosen* on score + e_score_correction_bias, groups
    ranked by the sum of their top-2 biased scores; weights are the unbiased scores of the chosen
    experts, renormalised (+1e-20) and times routed_scaling_factor.
Every step is a batched torch op (no host sync): the CUDA path is CUDA-graph capturable.

The routed experts are held stacked, w_gate_up [E, 2I, H] (gate rows then up rows) and w_down
[E, H, I], or FP8 in models/quant.py's stacked layout (e4m3 + dequant scales [E, ceil(N/gn),
ceil(K/128)]) when the stage is FP8; `checkpoint_views` maps each expert's checkpoint tensors
(experts.{e}.gate_proj.weight, ...) to its slices (FP8: quant.Fp8Slot), so the loader fills them
in place. Off FP8 hardware the FP8 stacks are dequantized once (`fp8_prepare`).

Shared experts are a separate dense MLP (on CUDA, for small batches, run on a side stream beside
the router and the routed experts: `_forward_overlapped`), not fused into the routed launch: they
keep the checkpoint's layout (one MLP of width n_shared*I that the family's linear layers, FP8 or
not, already handle), the CPU path stays transformers' exact sum order, and their GEMMs are dense
(no alignment padding); in decode they are 1/(k+1) of the weight bytes read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stage_worker.kernels import fused_moe, moe_route
from stage_worker.models import quant

SCORING = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(frozen=True)
class RouterSpec:
    """How a token picks its experts and weighs them (see the module docstring)."""

    n_experts: int
    top_k: int
    scoring: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    norm_eps: float = 1e-20  # DeepSeek adds 1e-20 to the sum; Mixtral divides by the plain sum (0.0)
    scaling: float = 1.0  # routed_scaling_factor
    logits_fp32: bool = True  # DeepSeek routes in float32; Mixtral computes logits in the model dtype
    sorted_topk: bool = False  # torch.topk's `sorted` as the family's reference calls it (Mixtral: True)

    def __post_init__(self):
        if self.scoring not in SCORING:
            raise ValueError(f"scoring {self.scoring!r} is not supported ({', '.join(SCORING)})")
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method {self.topk_method!r} is not supported ({', '.join(TOPK_METHODS)})")
        grouped = self.topk_method != "greedy"
        if self.n_experts % self.n_group or (grouped and not 0 < self.topk_group <= self.n_group):
            raise ValueError(f"{self.n_experts} routed experts in n_group={self.n_group} groups, "
                             f"topk_group={self.topk_group}: need whole groups and 1 <= topk_group <= n_group")
        if not 0 < self.top_k <= self.n_experts:
            raise ValueError(f"experts per token (num_experts_per_tok) = {self.top_k} must be in "
                             f"[1, {self.n_experts}], the number of routed experts")


def route(logits: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None = None):
    """logits [T, E] -> (weights [T, k] float32, ids [T, k] int64). Batched, no host sync."""
    logits = logits.float()
    scores = logits.sigmoid() if spec.scoring == "sigmoid" else logits.softmax(-1)
    if spec.topk_method == "greedy":
        weights, ids = torch.topk(scores, spec.top_k, dim=-1, sorted=spec.sorted_topk)
    else:
        noaux = spec.topk_method == "noaux_tc"
        choice = scores + bias.float() if noaux else scores
        per_group = spec.n_experts // spec.n_group
        grouped = choice.view(-1, spec.n_group, per_group)  # [T, G, E/G]
        if noaux:
            group_scores = grouped.topk(2, dim=-1)[0].sum(-1)  # [T, G]
        else:
            group_scores = grouped.max(dim=-1).values
        keep = torch.topk(group_scores, spec.topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
        group_mask = torch.zeros_like(group_scores).scatter_(1, keep, 1).bool()
        expert_mask = group_mask[:, :, None].expand(-1, -1, per_group).reshape(-1, spec.n_experts)
        fill = float("-inf") if noaux else 0.0
        ids = torch.topk(choice.masked_fill(~expert_mask, fill), spec.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)  # the bias picks experts, never weighs them
    if spec.norm_topk_prob and spec.top_k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + spec.norm_eps)
    return weights * spec.scaling if spec.scaling != 1.0 else weights, ids


class Router(nn.Module):
    """The gate: logits = x @ weight.T, then `route`. Its parameters stay float32 (`fix_dtypes`),
    or, for a family routing in the model dtype, take that dtype (no cast launch per forward)."""

    def __init__(self, hidden: int, spec: RouterSpec):
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(spec.n_experts, hidden), requires_grad=False)
        if spec.topk_method == "noaux_tc":
            # A loaded parameter (not a buffer) so the loader fills it.
            self.e_score_correction_bias = nn.Parameter(torch.empty(spec.n_experts), requires_grad=False)

    def fix_dtypes(self, dtype: torch.dtype) -> None:
        """After the stage's `.to(dtype)` (models/quant.py `fix_dtypes`): float32 again (the
        checkpoint's bf16 -> float32 is exact, and the logits are float32 anyway), unless the
        logits are computed in `dtype` (Mixtral), where forward would cast to it anyway."""
        for p in self.parameters(recurse=False):
            p.data = p.data.float() if self.spec.logits_fp32 else p.data.to(dtype)

    def forward(self, x: torch.Tensor, use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (weights [T, k] float32, expert ids [T, k] int64). use_triton: route with
        kernels/moe_route.py (one launch for `route`'s ~15); default: on CUDA when Triton imports."""
        if self.spec.logits_fp32:
            logits = F.linear(x.float(), self.weight.float())  # [T, E]
        else:
            logits = F.linear(x, self.weight.to(x.dtype))
        bias = getattr(self, "e_score_correction_bias", None)
        if use_triton is None:
            use_triton = x.is_cuda and moe_route.triton is not None
        if use_triton:
            return moe_route.fused_route(logits, self.spec, bias)
        return route(logits, self.spec, bias)


@dataclass(frozen=True)
class MoESpec:
    """Sizes and checkpoint names of one MoE layer's routed experts."""

    hidden: int
    inter: int
    router: RouterSpec
    bias: bool = False
    # checkpoint names of an expert's gate, up and down projections (Mixtral: w1, w3, w2)
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")


class SparseMoE(nn.Module):
    """Router + stacked routed experts (+ the family's shared-expert MLP, if any).

    backend: "auto" (Triton fused kernels on CUDA, torch elsewhere), "triton" or "torch".
    Not thread-safe (one micro-batch at a time, as the stage).
    """

    def __init__(self, spec: MoESpec, shared: nn.Module | None = None, fp8: bool = False):
        super().__init__()
        h, i, e = spec.hidden, spec.inter, spec.router.n_experts
        self.spec, self.backend = spec, "auto"
        self.gate = Router(h, spec.router)
        self.w_gate_up_scale_inv = self.w_down_scale_inv = None
        self.group_n = (quant.BLOCK, quant.BLOCK)  # scale row groups of w_gate_up, w_down (FP8)
        if fp8:  # models/quant.py's stacked layout: e4m3 [E, N, K] + scales [E, ceil(N/gn), ceil(K/128)]
            self.w_gate_up, self.w_gate_up_scale_inv, gn13 = quant.fp8_expert_params(e, [i, i], h)
            self.w_down, self.w_down_scale_inv, gn2 = quant.fp8_expert_params(e, [h], i)
            self.group_n = (gn13, gn2)
        else:
            self.w_gate_up = nn.Parameter(torch.empty(e, 2 * i, h), requires_grad=False)
            self.w_down = nn.Parameter(torch.empty(e, h, i), requires_grad=False)
        self.b_gate_up = self.b_down = None
        if spec.bias:
            self.b_gate_up = nn.Parameter(torch.empty(e, 2 * i), requires_grad=False)
            self.b_down = nn.Parameter(torch.empty(e, h), requires_grad=False)
        self.shared_experts = shared
        # CUDA, up to this many tokens: the shared experts on a side stream (`_forward_overlapped`).
        # V3's layer in a CUDA graph on an H200 (benchmarks/gpu/check_moe_route.py): 1.04x at 1
        # token, 0.99x at 64 and 256 (the routed GEMMs fill the GPU by then).
        self.overlap_shared = 16
        self.compute_dtype = torch.get_default_dtype()
        self._dense: tuple[torch.Tensor, torch.Tensor] | None = None  # FP8 stacks dequantized (no FP8 compute)

    @property
    def fp8(self) -> bool:
        return self.w_gate_up_scale_inv is not None

    def fix_dtypes(self, dtype: torch.dtype) -> None:
        """After the stage's `.to(dtype)` (models/quant.py `fix_dtypes`): FP8 stacks back to e4m3,
        their scales to float32; `dtype` is the compute dtype."""
        self.compute_dtype = dtype
        if self.fp8:
            self.w_gate_up.data = self.w_gate_up.data.to(torch.float8_e4m3fn)
            self.w_down.data = self.w_down.data.to(torch.float8_e4m3fn)
            self.w_gate_up_scale_inv.data = self.w_gate_up_scale_inv.data.float()
            self.w_down_scale_inv.data = self.w_down_scale_inv.data.float()

    def fp8_prepare(self) -> str | None:
        """After loading: "fp8" where FP8 GEMMs run (CUDA SM89+), else "dequant" (the stacks
        dequantized once to the compute dtype; the torch path then runs them)."""
        if not self.fp8:
            return None
        if quant.fp8_compute_available(self.w_down.device):
            self._dense = None
            return "fp8"
        self._dense = self._dequantized(self.compute_dtype)
        return "dequant"

    def _dequantized(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The FP8 stacks (w_gate_up, w_down) dequantized to `dtype`."""
        return tuple(quant.dequantize_blocks(w, s, gn).to(dtype) for w, s, gn in
                     ((self.w_gate_up, self.w_gate_up_scale_inv, self.group_n[0]),
                      (self.w_down, self.w_down_scale_inv, self.group_n[1])))

    def checkpoint_views(self, path: str) -> dict:
        """experts.{e}.{gate,up,down}.{weight,bias} -> slices of the stacks (own parameters only);
        FP8 stacks: each weight name -> its quant.Fp8Slot (rows and their scale rows)."""
        inter, views, root = self.spec.inter, {}, path + "." if path else ""
        gate, up, down = self.spec.names
        for e in range(self.w_down.shape[0]):
            pre = f"{root}experts.{e}."
            if self.fp8:
                (gn13, gn2), w13, s13 = self.group_n, self.w_gate_up[e], self.w_gate_up_scale_inv[e]
                views[f"{pre}{gate}.weight"] = quant.fp8_slot(w13, s13, gn13, 0, inter)
                views[f"{pre}{up}.weight"] = quant.fp8_slot(w13, s13, gn13, inter, inter)
                views[f"{pre}{down}.weight"] = quant.Fp8Slot(self.w_down[e], self.w_down_scale_inv[e], gn2)
            else:
                views[f"{pre}{gate}.weight"], views[f"{pre}{up}.weight"] = self.w_gate_up[e].split(inter)
                views[f"{pre}{down}.weight"] = self.w_down[e]
            if self.b_gate_up is not None:
                views[f"{pre}{gate}.bias"], views[f"{pre}{up}.bias"] = self.b_gate_up[e].split(inter)
                views[f"{pre}{down}.bias"] = self.b_down[e]
        return views

    @torch.no_grad()
    def quantize_fp8_(self) -> None:
        """16-bit stacks -> e4m3 + 128x128 dequant scales, in place, one expert at a time (a float32
        copy of a whole V3 stack would be 30 GB). For benchmarks and tests; a stage quantizes at
        load through its checkpoint slots instead."""
        if self.fp8:
            return
        stacks = []
        for w in (self.w_gate_up, self.w_down):
            e, n, k = w.shape
            q = torch.empty(e, n, k, dtype=torch.float8_e4m3fn, device=w.device)
            s = torch.empty(e, -(-n // quant.BLOCK), -(-k // quant.BLOCK), device=w.device)
            for i in range(e):
                q[i], s[i] = quant.quantize_blocks(w[i])
            stacks.append((q, s))
            w.data = torch.empty(0, device=w.device)  # free the 16-bit stack before the next one
        (q13, s13), (q2, s2) = stacks
        self.w_gate_up, self.w_down = nn.Parameter(q13, False), nn.Parameter(q2, False)
        self.w_gate_up_scale_inv, self.w_down_scale_inv = nn.Parameter(s13, False), nn.Parameter(s2, False)
        self.group_n = (quant.BLOCK, quant.BLOCK)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, H]
        if self.shared_experts is not None and x.is_cuda and x.shape[0] <= self.overlap_shared:
            return self._forward_overlapped(x)
        weights, ids = self.gate(x, self.use_triton(x))  # [T, k] float32, [T, k]
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def _forward_overlapped(self, x: torch.Tensor) -> torch.Tensor:
        """The shared experts on a side stream while the router and the routed experts run on the
        current one (fork after x is ready, join before the sum): their small GEMMs fill SMs the
        routed launches leave idle. Capturable in a CUDA graph (a fork/join of the capture stream).
        The side stream's allocations are freed only after the join, and every fork waits for the
        current stream first, so the caching allocator never hands a block to both at once."""
        main = torch.cuda.current_stream(x.device)
        side = _side_stream(x.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            shared = self.shared_experts(x)
        weights, ids = self.gate(x, self.use_triton(x))
        out = self.experts(x, weights, ids)
        main.wait_stream(side)
        return out + shared

    def use_triton(self, x: torch.Tensor) -> bool:
        if self.backend == "auto":
            return x.is_cuda and fused_moe.triton is not None
        return self.backend == "triton"

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum [T, H] for routing (weights, ids) [T, k]."""
        if self._dense is None and self.use_triton(x):
            return fused_moe.fused_experts(x, self.w_gate_up, self.w_down, weights, ids, self.b_gate_up,
                                           self.b_down, self.w_gate_up_scale_inv, self.w_down_scale_inv, self.group_n,
                                           use_triton=True)
        return self._experts_torch(x, weights, ids)

    def _experts_torch(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Sorted by expert, two grouped GEMMs, weighted in float32, summed in token order."""
        w_gu, w_d = self._dense_stacks(x.dtype)
        b_gu, b_d = self.b_gate_up, self.b_down
        t, k = ids.shape
        flat_ids, order = torch.sort(ids.reshape(-1), stable=True)  # [S = T*k], grouped by expert
        offs = torch.searchsorted(flat_ids, torch.arange(w_gu.shape[0], device=x.device),
                                  right=True).to(torch.int32)  # [E] cumulative row ends
        xs = x.index_select(0, order // k)  # [S, H]
        gu = grouped_linear(xs, w_gu, offs)  # [S, 2I]
        if b_gu is not None:
            gu = gu + b_gu[flat_ids]
        inter = w_d.shape[2]
        y = grouped_linear(F.silu(gu[:, :inter]) * gu[:, inter:], w_d, offs)  # [S, H]
        if b_d is not None:
            y = y + b_d[flat_ids]
        y = y.float() * weights.reshape(-1)[order, None]  # [S, H] float32
        routed = torch.empty_like(y).index_copy_(0, order, y)  # back to token-major order
        return routed.view(t, k, -1).sum(1).to(x.dtype)  # [T, H]

    def _dense_stacks(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.fp8:
            return self.w_gate_up, self.w_down
        if self._dense is None:
            self.fp8_prepare()  # FP8 stacks off the Triton path run dequantized
            if self._dense is None:  # FP8 compute available but the torch backend forced
                return self._dequantized(dtype)
        return self._dense


_SIDE_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """One side stream per device for every MoE layer (layers run one after another)."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_mm_ok(w: torch.Tensor) -> bool:
    """torch's grouped GEMM kernel: CPU (torch >= 2.9) or CUDA SM80+."""
    if _GROUPED_MM is None:
        return False
    if w.device.type == "cuda":
        return torch.cuda.get_device_capability(w.device) >= (8, 0)
    return w.device.type == "cpu"


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x: [S, in] sorted by group; w: [G, out, in]; offs: [G] int32 cumulative row ends.
    Row r of the result is x[r] @ w[g].T for the group g holding r. No host sync on the fast path."""
    if _grouped_mm_ok(w):
        return _GROUPED_MM(x, w.transpose(1, 2), offs=offs)
    out = x.new_empty(x.shape[0], w.shape[1])  # fallback: one host sync, one GEMM per group
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], w[g].t(), out=out[start:end])
        start = end
    return out
