"""FP8 (e4m3) activations: the per-token quant that block-scaled and per-channel GEMMs take, and
the quantized activation they pass around (`Fp8Act`).

  x [M, K] bf16/fp32 --per_token_group_quant_fp8--> q [M, K] e4m3, s [M, ceil(K/128)] fp32 (1x128 groups)
  x [M, K]           --per_token_quant_fp8-------> q [M, K] e4m3, s [M, 1] fp32 (one scale per row)

`per_token_group_quant_fp8`: one program per `act_quant_groups` (kernels/tuning.py) groups of a row, amax in fp32; K need
not be a multiple of 128 (the last group is partial); offsets are int64 (large M*K); scales
row-major [M, G], or column-major (stride (1, M)), the layout torch._scaled_mm's blockwise recipe
wants, with rows padded to SCALED_MM_ALIGN_M. `per_token_quant_fp8`: the row held in registers up
to ROW_QUANT_ONE_PASS_MAX columns, else two passes.

x == q.float() * s per group (up to e4m3 rounding); scale = max(amax, eps) / 448, one formula
(`quant_scale`) shared with kernels/fused_ops.py, whose RMSNorm and SiLU*up kernels write their
output quantized (an `Fp8Act` from `empty_act`) instead of a bf16 tensor read back here.
kernels/fp8.py holds the GEMMs that read these. Every Triton op has a torch reference (`*_torch`);
tests/test_fp8.py checks them in Triton's CPU interpreter. Shape-static and sync-free.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from stage_worker.kernels import tuning

try:  # Triton is optional: CPU-only installs never import it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3fn; ROCm's fnuz would be 224 (vLLM's choice): not handled here
GROUP_K = 128  # activation group and weight block along K (DeepSeek-V3's weight_block_size)
EPS = 1e-10


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int = GROUP_K, column_major_scales: bool = False,
                              use_triton: bool | None = None, align: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (q [Mp, K] e4m3, scales [Mp, ceil(K/group)] fp32; column-major when asked).

    x == q.float() * scale per group (up to e4m3 rounding). A zero group gets scale eps/448.
    Mp is M rounded up to a multiple of `align` (cuBLASLt's blockwise GEMM wants 4): the added
    rows are zeros' (q 0, scale eps/448), written by the same launch.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got {tuple(x.shape)}")
    use = (triton is not None and x.is_cuda) if use_triton is None else use_triton
    m, k = x.shape
    mp = cdiv(m, align) * align
    if not use:
        if mp != m:
            x = torch.cat([x, x.new_zeros(mp - m, k)])
        q, s = per_token_group_quant_fp8_torch(x, group_size)
        return q, (s.t().contiguous().t() if column_major_scales else s)
    g = cdiv(k, group_size)
    x = x if x.stride(-1) == 1 else x.contiguous()
    q, s = act_buffers(mp, k, g, column_major_scales, x.device)
    if mp == 0 or k == 0:
        return q, s
    block = triton.next_power_of_2(group_size)
    groups = min(triton.next_power_of_2(tuning.active().act_quant_groups), triton.next_power_of_2(g))  # groups per program
    _act_quant_kernel[(mp * cdiv(g, groups),)](
        x, q, s, m, k, g, x.stride(0), q.stride(0), s.stride(0), s.stride(1), EPS, FP8_MAX,
        GROUP=group_size, BLOCK=block, GROUPS=groups, num_warps=1 if groups * block <= 256 else 4, num_stages=1)
    return q, s


def act_buffers(rows: int, k: int, groups: int, column_major_scales: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (q [rows, K] e4m3, scales [rows, groups] fp32, column-major when asked)."""
    q = torch.empty(rows, k, dtype=FP8_DTYPE, device=device)
    s = (torch.empty(groups, rows, dtype=torch.float32, device=device).t() if column_major_scales
         else torch.empty(rows, groups, dtype=torch.float32, device=device))
    return q, s


def per_token_group_quant_fp8_torch(x: torch.Tensor, group_size: int = GROUP_K) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: x [M, K] -> (q [M, K] e4m3, scales [M, ceil(K/group)] fp32, row-major)."""
    m, k = x.shape
    g = cdiv(k, group_size)
    xp = torch.zeros(m, g * group_size, dtype=torch.float32, device=x.device)
    xp[:, :k] = x.float()
    groups = xp.view(m, g, group_size)
    s = groups.abs().amax(-1).clamp(min=EPS) / FP8_MAX  # [M, G]
    q = (groups / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(m, g * group_size)[:, :k].contiguous(), s


if triton is not None:
    @triton.jit
    def quant_scale(amax, eps, fp8_max):
        """The dequant scale of values whose largest magnitude is amax: max(amax, eps) / 448 (the
        one formula of every activation quant here and in kernels/fused_ops.py)."""
        return tl.maximum(amax, eps) / fp8_max

    @triton.jit
    def quant_values(x, s, fp8_max):
        """x / s saturated at +-448, in fp32 (the caller casts to e4m3)."""
        return tl.clamp(x / s, -fp8_max, fp8_max)

    @triton.jit
    def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, G, stride_x, stride_q, stride_sm, stride_sg, eps, fp8_max,
                          GROUP: tl.constexpr, BLOCK: tl.constexpr, GROUPS: tl.constexpr):
        """GROUPS consecutive groups of one row per program, [GROUPS, BLOCK] at once; rows from M
        (alignment padding) read as zeros."""
        pid = tl.program_id(0).to(tl.int64)
        per_row = tl.cdiv(G, GROUPS)
        row = pid // per_row
        grp = (pid % per_row) * GROUPS + tl.arange(0, GROUPS).to(tl.int64)  # [GROUPS]
        lane = tl.arange(0, BLOCK)
        cols = grp[:, None] * GROUP + lane[None, :]  # [GROUPS, BLOCK]
        mask = (grp[:, None] < G) & (lane[None, :] < GROUP) & (cols < K)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask & (row < M), other=0.0).to(tl.float32)
        s = quant_scale(tl.max(tl.abs(x), axis=1), eps, fp8_max)  # [GROUPS]
        q = quant_values(x, s[:, None], fp8_max)
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row * stride_sm + grp * stride_sg, s, mask=grp < G)


ROW_QUANT_ONE_PASS_MAX = 16384  # columns per_token_quant_fp8 holds in registers (one read of x); wider: two passes


def per_token_quant_fp8(x: torch.Tensor, use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (q [M, K] e4m3, scales [M, 1] fp32): one scale per row (token), the
    activation side of the rowwise recipe (per-channel weights, `scaled_mm_rowwise`)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got {tuple(x.shape)}")
    use = (triton is not None and x.is_cuda) if use_triton is None else use_triton
    if not use:
        return per_token_quant_fp8_torch(x)
    m, k = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return q, s
    block = triton.next_power_of_2(k)
    one_pass = block <= ROW_QUANT_ONE_PASS_MAX
    block = block if one_pass else 2048
    _row_quant_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), EPS, FP8_MAX, BLOCK=block, ONE_PASS=one_pass,
                            num_warps=max(1, min(16, block // 512)), num_stages=1)
    return q, s


def per_token_quant_fp8_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: x [M, K] -> (q [M, K] e4m3, scales [M, 1] fp32)."""
    xf = x.float()
    s = xf.abs().amax(-1, keepdim=True).clamp(min=EPS) / FP8_MAX
    return (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), s


if triton is not None:
    @triton.jit
    def _row_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, eps, fp8_max, BLOCK: tl.constexpr,
                          ONE_PASS: tl.constexpr):
        """One row per program: held whole in registers (ONE_PASS: BLOCK >= K), or its amax in
        BLOCK-wide steps, then the quantized row (the second read hits L2)."""
        row = tl.program_id(0).to(tl.int64)
        lane = tl.arange(0, BLOCK)
        if ONE_PASS:
            x = tl.load(x_ptr + row * stride_x + lane, mask=lane < K, other=0.0).to(tl.float32)
            s = quant_scale(tl.max(tl.abs(x), axis=0), eps, fp8_max)
            q = quant_values(x, s, fp8_max)
            tl.store(q_ptr + row * stride_q + lane, q.to(q_ptr.dtype.element_ty), mask=lane < K)
            tl.store(s_ptr + row, s)
            return
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_ptr + row * stride_x + k0 + lane, mask=k0 + lane < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        s = quant_scale(tl.max(amax, axis=0), eps, fp8_max)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_ptr + row * stride_x + k0 + lane, mask=k0 + lane < K, other=0.0).to(tl.float32)
            q = quant_values(x, s, fp8_max)
            tl.store(q_ptr + row * stride_q + k0 + lane, q.to(q_ptr.dtype.element_ty), mask=k0 + lane < K)
        tl.store(s_ptr + row, s)


# ----------------------------------------------------------------------------- quantized activations

SCALED_MM_ALIGN_M = 4  # rows cuBLASLt's blockwise FP8 GEMM takes: a multiple of 4


class Fp8Act(NamedTuple):
    """Activations quantized for a W8A8 GEMM: what `quantize_act` returns, or a producer that
    writes them itself (kernels/fused_ops: the RMSNorm and SiLU*up kernels with `quant`).

    kind "group": q [Mp, K] e4m3 with 1x128 group scales [Mp, ceil(K/128)] column-major, Mp = M
    rounded up to SCALED_MM_ALIGN_M (zero rows: what cuBLASLt's blockwise recipe takes; the Triton
    kernel reads the first M rows); kind "row": q [M, K] with one scale per row [M, 1]."""

    q: torch.Tensor
    scale: torch.Tensor
    rows: int  # M, the real rows
    kind: str  # "group" | "row"


ACT_KINDS = ("group", "row")


def empty_act(rows: int, k: int, kind: str, device) -> Fp8Act:
    """The unwritten Fp8Act of `rows` rows of K values (a kernel that quantizes its own output
    fills it, kernels/fused_ops.py): "group" rows padded to SCALED_MM_ALIGN_M."""
    if kind not in ACT_KINDS:
        raise ValueError(f"unknown activation quant {kind!r} (known: {', '.join(ACT_KINDS)})")
    padded = cdiv(rows, SCALED_MM_ALIGN_M) * SCALED_MM_ALIGN_M if kind == "group" else rows
    q, s = act_buffers(padded, k, cdiv(k, GROUP_K) if kind == "group" else 1, True, device)
    return Fp8Act(q, s, rows, kind)


def quantize_act(x: torch.Tensor, kind: str, use_triton: bool | None = None) -> Fp8Act:
    """x [M, K] -> Fp8Act of that kind (one launch on CUDA)."""
    if kind == "group":
        q, s = per_token_group_quant_fp8(x, column_major_scales=True, use_triton=use_triton, align=SCALED_MM_ALIGN_M)
    elif kind == "row":
        q, s = per_token_quant_fp8(x, use_triton=use_triton)
    else:
        raise ValueError(f"unknown activation quant {kind!r} (known: {', '.join(ACT_KINDS)})")
    return Fp8Act(q, s, x.shape[0], kind)
