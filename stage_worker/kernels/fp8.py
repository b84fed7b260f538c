"""Block-scaled FP8 (e4m3) GEMMs for DeepSeek-V3-style weights (the activation quant they take:
kernels/fp8_act.py).

Data flow of one FP8 linear, y = x @ W^T (models/quant.py holds W and calls `fp8_gemm`):

  x [M, K] bf16/fp32 --per_token_group_quant_fp8--> xq [M, K] e4m3, xs [M, ceil(K/128)] fp32 (fp8_act)
  W  [N, K] e4m3 with ws [ceil(N/group_n), ceil(K/128)] fp32 (the checkpoint's `weight_scale_inv`)
  y[m, n] = sum over k-blocks b of (xq[m, b] . W[n, b]) * xs[m, b] * ws[n // group_n, b]

`ws` is the dequantization multiplier (DeepSeek's `weight_dequant` computes `w_fp8 * s`).
group_n is 128 for every real checkpoint; a merged weight whose parts are not 128-row aligned
(tiny test models) repeats each part's scale rows at a finer group_n (models/quant.py).

- `w8a8_block_gemm(xq, xs, w, ws, group_n)`: Triton, BLOCK_K = 128 = the quant group, so each
  K-step multiplies one fp32 partial dot by its two scales ("promotion" every 128 K, as DeepSeek's
  kernel.py and DeepGEMM); masked for M, N, K not multiples of the tiles; grouped program order
  (GROUP_M) for L2 reuse; tiles chosen per M bucket (`gemm_config`); optional split-K.
- `w8a16_gemv(x, w, ws, group_n)`: Triton, for decode's few rows (M <= GEMV_MAX_M): the weight
  read as e4m3 and dequantized in registers against x as it is (bf16/fp32, no activation quant,
  one launch), a program per BLOCK_N weight rows walking K in BLOCK_K slices (several 128-column
  scale groups each). At M = 1 the tensor-core kernel has N / 64 programs (64 for a 4096-row
  weight: half an H100 idle) and an activation quant before it; here N / BLOCK_N programs with
  wide K slices keep enough bytes in flight to stream the weight. Dispatched at one row on
  block-scaled weights, 1-2 rows on per-channel ones (kernel tuning's gemv_max_m,
  channel_gemv_max_m, kernels/tuning.py: where it measured faster on an H100). Scales per row and group ("grid"), or
  once per group on x where a program's rows share a scale row ("shared", timed slower; benchmarks).
- `w8a16_block_gemm(x, w, ws, group_n)`: the same Triton kernel with x as it is (bf16/fp16, no
  activation quant) and each e4m3 weight tile converted to x's dtype in registers: decode-size M,
  where the weight bytes set the time and the tensor cores have room to spare.
- per channel (one weight scale per output row, models/quant.py): x quantized one scale per row
  (fp8_act `per_token_quant_fp8`) and `scaled_mm_rowwise` (torch._scaled_mm's rowwise recipe,
  SM90); the Triton kernels above take the same scales as a stride-0 [N, ceil(K/128)] grid at
  group_n 1.
- `scaled_mm_blockwise(...)`: torch._scaled_mm with the 1x128 x 128x128 recipe (cuBLASLt, SM90,
  CUDA >= 12.9); needs N and K multiples of 128, and M a multiple of 4 (cuBLASLt has no
  algorithm otherwise: measured on the H100, M = 1, 2, 17, 33, 70, 129 fail), so `fp8_gemm` pads M.
- `fp8_gemm(x, w, ws, group_n, backend)`: quantizes x (1x128 groups; per row for "rowwise"; not
  at all for the W8A16 forms) and runs one of the above, or the torch reference (dequantize,
  fp32 matmul) for backend "torch". x may arrive quantized already (`Fp8Act`, written by the
  RMSNorm or SiLU kernel before the GEMM: kernels/fused_ops `quant`); `quantize_act` is the same
  quant as a separate launch.

Every Triton op has a torch reference (`*_torch`) with the same formula; tests/test_fp8.py checks
the kernels against them in Triton's CPU interpreter. Shape-static and sync-free (graph-capturable).
"""

from __future__ import annotations

import torch

try:  # Triton is optional: CPU-only installs never import it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

from stage_worker.kernels import tuning
from stage_worker.kernels.fp8_act import (  # the activations these GEMMs take
    GROUP_K, Fp8Act, cdiv, per_token_group_quant_fp8_torch, quantize_act,
)

# ----------------------------------------------------------------------------- block-scaled GEMM

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per M bucket (largest bucket <= M wins): the tiles
# benchmarks/gpu/bench_fp8.py --tune picked on an H100 at DeepSeek-V3 shapes (README); BLOCK_K is
# the quant group, 128.
GEMM_CONFIGS: dict[int, tuple[int, int, int, int]] = {
    1: (16, 64, 4, 4),
    128: (64, 128, 8, 4),
    512: (64, 64, 4, 3),
    2048: (128, 64, 4, 3),
}


def gemm_config(m: int) -> tuple[int, int, int, int]:
    return _bucket(GEMM_CONFIGS, m)


def _bucket(table: dict, m: int):
    """A per-M-bucket table's entry for M rows: the largest bucket <= M."""
    return table[max(b for b in table if b <= max(m, 1))]


def w8a8_block_gemm(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, group_n: int = 128,
                    out_dtype: torch.dtype = torch.bfloat16, config: tuple[int, int, int, int] | None = None,
                    split_k: int | None = None) -> torch.Tensor:
    """xq [M, K] e4m3, xs [M, ceil(K/128)] fp32 (any strides), w [N, K] e4m3,
    ws [ceil(N/group_n), ceil(K/128)] fp32 -> y [M, N] out_dtype (Triton).

    split_k > 1: each program sums a slice of the K-blocks into an fp32 partial [S, M, N], summed
    after (two more launches). Off by default: on the H100 it sped up N=2112 at M=16-512 but
    slowed N=576 and M=1 (bench_fp8.py, README), so it waits for a fused reduction."""
    m, k = xq.shape
    n = w.shape[0]
    _check_gemm_shapes(xq, xs, w, ws, group_n)
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return out
    _launch_block_gemm(xq, xs, w, ws, group_n, out, config or gemm_config(m), split_k or 1)
    return out


def _launch_block_gemm(x, xs, w, ws, group_n, out, config, split, prescale: bool = False) -> None:
    """The block-scaled kernel into out [M, N]; xs None: x is not quantized (W8A16, x's dtype on
    the tensor cores; prescale: the weight tile dequantized before the MMA)."""
    (m, k), n = x.shape, w.shape[0]
    bm, bn, warps, stages = config
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    part = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    scales = xs if xs is not None else ws  # (unread when W8A16)
    _block_gemm_kernel[(tiles, split)](
        x, w, part, scales, ws, m, n, k, group_n,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), part.stride(-2), part.stride(-1),
        m * n, scales.stride(0), scales.stride(1), ws.stride(0), ws.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=GROUP_K, GROUP_M=8, SPLIT_K=split, W8A16=xs is None,
        PRESCALE=xs is None and prescale, num_warps=warps, num_stages=stages)
    if split > 1:
        out.copy_(part.sum(0))


# W8A16 on the tensor cores (`w8a16_block_gemm`): (BLOCK_M, BLOCK_N, warps, stages) and K slices
# per M bucket (largest bucket <= M wins); off in the dispatch (kernel tuning's w8a16_max_m).
W8A16_CONFIGS: dict[int, tuple[tuple[int, int, int, int], int]] = {
    1: ((16, 64, 4, 4), 2),
    64: ((64, 64, 4, 3), 2),
    128: ((64, 128, 8, 4), 1),
}



def w8a16_block_gemm(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, group_n: int = 128,
                     out_dtype: torch.dtype | None = None, config: tuple[int, int, int, int] | None = None,
                     split_k: int | None = None, prescale: bool | None = None) -> torch.Tensor:
    """x [M, K] bf16/fp16 as it is (no activation quant), w [N, K] e4m3 with its block scales ->
    y [M, N] = x @ dequant(w)^T (Triton): the weight tile converted to x's dtype in registers and
    multiplied on the tensor cores, each 128-wide K block's partial dot scaled by its weight scale.
    For decode-size M, where the weight's bytes (half of bf16's) set the time, not the FLOPs.

    prescale (default: the active tuning's w8a16_prescale, on): each weight tile times its scales, rounded to x's dtype,
    before the MMA, so the products accumulate in one chain as a plain bf16 GEMM's do (the
    numbers of x @ dequant(w).to(x.dtype)); else each 128-wide K block's product is scaled and
    summed apart, in fp32."""
    m, k = x.shape
    n = w.shape[0]
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"w8a16_block_gemm takes bf16/fp16 activations, got {x.dtype}")
    _check_gemm_shapes(x, None, w, ws, group_n)
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    bucket = _bucket(W8A16_CONFIGS, m)
    _launch_block_gemm(x, None, w, ws, group_n, out, config or bucket[0], split_k or bucket[1],
                       tuning.active().w8a16_prescale if prescale is None else prescale)
    return out


def _check_gemm_shapes(xq, xs, w, ws, group_n) -> None:
    """x [M, K] against w [N, K] and its scale grid; xs: x's 1x128 group scales (None: x is not
    quantized, the W8A16 forms)."""
    m, k = xq.shape
    n, kw = w.shape
    if kw != k:
        raise ValueError(f"x has K={k} but the weight has K={kw}")
    if xs is not None and tuple(xs.shape) != (m, cdiv(k, GROUP_K)):
        raise ValueError(f"activation scales {tuple(xs.shape)}, expected {(m, cdiv(k, GROUP_K))}")
    if tuple(ws.shape) != (cdiv(n, group_n), cdiv(k, GROUP_K)):
        raise ValueError(f"weight scales {tuple(ws.shape)}, expected {(cdiv(n, group_n), cdiv(k, GROUP_K))}")


def w8a8_block_gemm_torch(xq, xs, w, ws, group_n: int = 128, out_dtype: torch.dtype = torch.bfloat16):
    """Reference: dequantize both operands to fp32 and matmul."""
    _check_gemm_shapes(xq, xs, w, ws, group_n)
    return (dequant_act(xq, xs) @ dequant_weight(w, ws, group_n).t()).to(out_dtype)


def dequant_act(xq: torch.Tensor, xs: torch.Tensor, group_size: int = GROUP_K) -> torch.Tensor:
    """xq [M, K] e4m3, xs [M, G] -> fp32 [M, K]."""
    k = xq.shape[1]
    return xq.float() * xs.float().repeat_interleave(group_size, 1)[:, :k]


def dequant_weight(w: torch.Tensor, ws: torch.Tensor, group_n: int = 128, group_k: int = GROUP_K) -> torch.Tensor:
    """w [..., N, K] e4m3, ws [..., ceil(N/group_n), ceil(K/group_k)] -> fp32 [..., N, K]."""
    n, k = w.shape[-2:]
    scale = ws.float().repeat_interleave(group_n, -2)[..., :n, :].repeat_interleave(group_k, -1)[..., :k]
    return w.float() * scale


if triton is not None:
    @triton.jit
    def _block_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K, group_n,
                           stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_cs,
                           stride_as_m, stride_as_k, stride_bs_n, stride_bs_k,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, W8A16: tl.constexpr,
                           PRESCALE: tl.constexpr):
        """W8A16: a is x as it is (bf16/fp16), b is converted to it, only b's scale applies: to each
        128-wide K block's partial product, or (PRESCALE) to the weight tile before the MMA."""
        pid, pid_k = tl.program_id(0), tl.program_id(1)
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n  # grouped order: GROUP_M row-tiles share each column of B in L2
        first_m = (pid // per_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m, mask_n = offs_m < M, offs_n < N
        k_blocks = tl.cdiv(K, BLOCK_K)
        per_split = tl.cdiv(k_blocks, SPLIT_K)  # this program's K-blocks: [kb0, kb1)
        kb0 = pid_k * per_split
        kb1 = tl.minimum(kb0 + per_split, k_blocks)
        k0 = kb0.to(tl.int64) * BLOCK_K
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + (k0 + offs_k[None, :]) * stride_ak  # [BM, BK]
        b_ptrs = b_ptr + offs_n[None, :] * stride_bn + (k0 + offs_k[:, None]) * stride_bk  # [BK, BN]
        as_ptrs = as_ptr + offs_m * stride_as_m
        bs_ptrs = bs_ptr + (offs_n // group_n) * stride_bs_n
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(kb0, kb1):
            k_left = K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
            b_s = tl.load(bs_ptrs + kb * stride_bs_k, mask=mask_n, other=0.0)
            if PRESCALE:  # W8A16, the tile dequantized before the MMA: one accumulate chain, no per-step sum
                acc = tl.dot(a, (b.to(tl.float32) * b_s[None, :]).to(a.dtype), acc)
            elif W8A16:
                acc += tl.dot(a, b.to(a.dtype)) * b_s[None, :]
            else:
                a_s = tl.load(as_ptrs + kb * stride_as_k, mask=mask_m, other=0.0)
                acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        c_ptrs = c_ptr + pid_k.to(tl.int64) * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------- small-M GEMV

GEMV_MAX_M = 4  # rows the W8A16 GEMV takes (its [M, BLOCK_N] accumulator is unrolled over M)
# (BLOCK_N, BLOCK_K, num_warps, num_stages): benchmarks/gpu/bench_gemv.py sweeps them. On an H100
# at one row, 12 tiles within 1.5x of each other; this one is best or within 4% at every Llama-8B shape.
# The default; a GPU's tuning file (kernels/tuning.py, from `bench_gemv.py --layers`) overrides it.
GEMV_CONFIG: tuple[int, int, int, int] = (8, 1024, 4, 2)


GEMV_SCALE_MODES = tuning.SCALE_MODES  # ("grid", "shared"): the kernel's SCALE_MODE is the index
_gemv_counters: dict[torch.device, list[torch.Tensor]] = {}  # split-K arrivals per N block, per device


def _gemv_arrivals(device: torch.device, blocks: int) -> torch.Tensor:
    """The split-K GEMV's arrival counters: int32 zeros, one per N block (the last program of a
    block sets its counter back to 0, so a buffer serves every later call, in a CUDA graph too:
    the warm-up before a capture allocates it). A larger need adds a larger buffer; none is ever
    freed, since a captured graph keeps the address it was captured with. One buffer per device:
    split GEMVs must not run on two streams at once (the stage runs them on its compute stream;
    the side streams sample, and the shared experts' stream runs no split GEMV concurrently with
    another)."""
    kept = _gemv_counters.setdefault(device, [])
    if not kept or kept[-1].numel() < blocks:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split-K GEMV counters allocated during a CUDA graph capture: warm up first")
        kept.append(torch.zeros(max(blocks, 4096), dtype=torch.int32, device=device))
    return kept[-1]


def gemv_scale_fits(mode: str, group_n: int, block_n: int) -> bool:
    """Whether the GEMV can apply the weight scales in `mode`: "grid" (each row's own scale per
    128-column group multiplies that row's group sums; the default) always, "shared" (x scaled
    once per group, plain products after) when a program's BLOCK_N rows share one scale row
    (group_n a multiple of BLOCK_N). Which one runs: the tuning's `gemv_scales` (kernels/tuning.py,
    with the measurement)."""
    return {"grid": True, "shared": group_n % block_n == 0}.get(mode, False)


def w8a16_gemv(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, group_n: int = 128,
               out_dtype: torch.dtype | None = None, config: tuple[int, int, int, int] | None = None,
               late_sum: bool | None = None, scale_mode: str | None = None,
               split_k: int | None = None) -> torch.Tensor:
    """x [M, K] (M <= GEMV_MAX_M, any float dtype), w [N, K] e4m3, ws [ceil(N/group_n), ceil(K/128)]
    -> y [M, N] = x @ dequant(w, ws)^T in out_dtype (default x's), fp32 accumulation (Triton).

    split_k (default: the tuning's gemv_split_k, 1): each N block's K walked by that many
    programs (more bytes in flight where N / BLOCK_N programs leave SMs short: ncu, README); each
    writes its fp32 partial, and the last to arrive (an atomic counter per block) sums them in
    split order, so the result does not depend on which finishes first.

    late_sum (one row): the products accumulate elementwise in a [BLOCK_N, BLOCK_K] tile, summed
    across it once at the end, instead of a cross-thread sum at every K step. late_sum, config
    and scale_mode (one of GEMV_SCALE_MODES that fits, `gemv_scale_fits`): None takes the active
    tuning's (kernels/tuning.py; config's default GEMV_CONFIG)."""
    m, kdim = x.shape
    n = w.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"w8a16_gemv takes at most {GEMV_MAX_M} rows, got {m}")
    _check_gemm_shapes(x, None, w, ws, group_n)
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    bn, bk, warps, stages = config or tuning.active().gemv or GEMV_CONFIG
    mode = scale_mode or tuning.active().gemv_scales
    if scale_mode is None and not gemv_scale_fits(mode, group_n, bn):
        mode = "grid"  # a tuning file's form applies where it fits (it always does at 128x128 blocks)
    if mode not in GEMV_SCALE_MODES:
        raise ValueError(f"unknown scale_mode {mode!r} (known: {', '.join(GEMV_SCALE_MODES)})")
    if not gemv_scale_fits(mode, group_n, bn):
        raise ValueError(f"scale_mode {mode!r} does not fit group_n {group_n} at BLOCK_N {bn}")
    m_pad, blocks = max(1, triton.next_power_of_2(m)), triton.cdiv(n, bn)
    steps = triton.cdiv(kdim, bk)
    splits = triton.cdiv(steps, triton.cdiv(steps, split_k or tuning.active().gemv_split_k))  # none left empty
    part = out if splits == 1 else torch.empty(splits, m_pad, n, dtype=torch.float32, device=x.device)
    arrivals = out if splits == 1 else _gemv_arrivals(x.device, blocks)
    _gemv_kernel[(blocks, splits)](
        x, w, ws, out, part, arrivals, m, n, kdim, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        ws.stride(0), ws.stride(1), out.stride(0), out.stride(1),
        M_PAD=m_pad, BLOCK_N=bn, GROUPS=bk // GROUP_K, GROUP_K=GROUP_K,
        GROUP_N=group_n, SCALE_MODE=GEMV_SCALE_MODES.index(mode),
        LATE_SUM=(tuning.active().gemv_late_sum if late_sum is None else late_sum) and m == 1, SPLIT_K=splits,
        num_warps=warps, num_stages=stages)
    return out


def w8a16_gemv_torch(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, group_n: int = 128,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference: x (as it is, in fp32) @ the dequantized weight^T."""
    return (x.float() @ dequant_weight(w, ws, group_n).t()).to(out_dtype or x.dtype)


if triton is not None:
    @triton.jit
    def _gemv_weights(w_ptr, offs_n, mask_n, k0, K, stride_wn, stride_wk, GROUPS: tl.constexpr,
                      GROUP_K: tl.constexpr):
        """One K step of the GEMV: its columns cols [G, GK], their mask, and the weight slice
        [BN, G, GK] in fp32."""
        g = tl.arange(0, GROUPS)
        cols = k0 + g[:, None] * GROUP_K + tl.arange(0, GROUP_K)[None, :]
        kmask = cols < K
        w = tl.load(w_ptr + offs_n[:, None, None] * stride_wn + cols[None, :, :] * stride_wk,
                    mask=mask_n[:, None, None] & kmask[None, :, :], other=0.0).to(tl.float32)
        return cols, kmask, w

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, ws_ptr, y_ptr, part_ptr, arrivals_ptr, M, N, K,
                     stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk, stride_ym, stride_yn,
                     M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, GROUP_K: tl.constexpr,
                     GROUP_N: tl.constexpr, SCALE_MODE: tl.constexpr, LATE_SUM: tl.constexpr,
                     SPLIT_K: tl.constexpr):
        """y[:, n-block] = x @ (w * scale)^T; each K step is GROUPS scale groups of GROUP_K columns.

        SCALE_MODE 0 (grid): each row's scale per group multiplies that row's group sums; 1
        (shared: the block's rows share one scale row): x's groups are scaled once, then plain
        products. SPLIT_K > 1: program (pid, s) walks the s-th share of K's steps and stores its
        fp32 partial in part [SPLIT_K, M_PAD, N]; the block's last arrival (arrivals[pid], an
        atomic count, reset to 0 after) adds the partials in split order and writes y."""
        pid = tl.program_id(0)
        step = GROUPS * GROUP_K
        per_split = tl.cdiv(tl.cdiv(K, step), SPLIT_K) * step  # this program's K: [k_lo, k_hi)
        k_lo = tl.program_id(1) * per_split
        k_hi = tl.minimum(k_lo + per_split, K)
        offs_n = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        g = tl.arange(0, GROUPS)
        rows = tl.arange(0, M_PAD)
        if LATE_SUM:  # one row: products summed elementwise, reduced across the tile once
            tile = tl.zeros((BLOCK_N, GROUPS, GROUP_K), dtype=tl.float32)
        else:
            acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, step):
            cols, kmask, w = _gemv_weights(w_ptr, offs_n, mask_n, k0, K, stride_wn, stride_wk, GROUPS, GROUP_K)
            kb = k0 // GROUP_K + g  # [G] scale-group index of each slice
            if SCALE_MODE == 1:  # one scale per group for the whole block: [G]
                s = tl.load(ws_ptr + ((pid * BLOCK_N) // GROUP_N) * stride_sn + kb * stride_sk,
                            mask=kb * GROUP_K < K, other=0.0)
            else:  # [BN, G]
                s = tl.load(ws_ptr + (offs_n // GROUP_N)[:, None] * stride_sn + kb[None, :] * stride_sk,
                            mask=mask_n[:, None] & (kb * GROUP_K < K)[None, :], other=0.0)
            for m in tl.static_range(M_PAD):
                xm = tl.load(x_ptr + m * stride_xm + cols * stride_xk, mask=kmask & (m < M), other=0.0).to(tl.float32)
                if SCALE_MODE == 1:
                    xm = xm * s[:, None]
                prod = w * xm[None, :, :]  # [BN, G, GK]
                if LATE_SUM:
                    tile += prod * s[:, :, None] if SCALE_MODE == 0 else prod
                else:
                    part = tl.sum(prod, axis=2)  # [BN, G]
                    if SCALE_MODE == 0:
                        part = part * s
                    acc = tl.where(rows[:, None] == m, acc + tl.sum(part, axis=1)[None, :], acc)
        if LATE_SUM:
            acc = tl.sum(tl.sum(tile, axis=2), axis=1)[None, :]  # [1, BN]
        y_mask = (rows[:, None] < M) & mask_n[None, :]
        y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
        if SPLIT_K > 1:
            part_ptrs = part_ptr + rows[:, None] * N + offs_n[None, :]  # [M_PAD, BN] of split 0
            tl.store(part_ptrs + tl.program_id(1) * M_PAD * N, acc, mask=y_mask)
            tl.debug_barrier()  # every thread's partial stored before the arrival publishes them
            if tl.atomic_add(arrivals_ptr + pid, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
                acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
                for s in tl.static_range(SPLIT_K):  # in split order, whichever arrived last
                    acc += tl.load(part_ptrs + s * M_PAD * N, mask=y_mask, other=0.0, cache_modifier=".cg")
                tl.store(arrivals_ptr + pid, 0)
                tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
        else:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


# ----------------------------------------------------------------------------- torch._scaled_mm

def scaled_mm_ok(n: int, k: int, group_n: int) -> bool:
    """The shapes torch._scaled_mm's 1x128 x 128x128 recipe takes (full blocks only)."""
    return group_n == 128 and n % 128 == 0 and k % 128 == 0


def scaled_mm_weight_scale(ws: torch.Tensor) -> torch.Tensor:
    """[N/128, K/128] -> the layout _scaled_mm reads for B = W^T: K-blocks padded to a multiple
    of 4, passed transposed ([L4, N/128], stride (1, L4)). Built once at load."""
    nb, kb = ws.shape
    padded = torch.zeros(nb, cdiv(kb, 4) * 4, dtype=torch.float32, device=ws.device)
    padded[:, :kb] = ws
    return padded.t()


def scaled_mm_blockwise(xq: torch.Tensor, xs_col: torch.Tensor, w: torch.Tensor, ws_mm: torch.Tensor,
                        out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """xq [M, K] e4m3 with column-major scales [M, K/128]; w [N, K]; ws_mm from
    scaled_mm_weight_scale -> [M, N] (cuBLASLt blockwise, SM90)."""
    return torch._scaled_mm(xq, w.t(), scale_a=xs_col, scale_b=ws_mm, out_dtype=out_dtype)


def rowwise_ok(n: int, k: int) -> bool:
    """The shapes torch._scaled_mm's rowwise recipe takes (16-byte aligned rows)."""
    return n % 16 == 0 and k % 16 == 0


def scaled_mm_rowwise(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws_row: torch.Tensor,
                      out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """xq [M, K] e4m3 with per-row scales xs [M, 1]; w [N, K] e4m3 with per-channel scales ws_row
    [1, N] -> [M, N] (torch._scaled_mm's rowwise recipe, SM90, bf16 out)."""
    return torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=ws_row, out_dtype=out_dtype)


# ----------------------------------------------------------------------------- dispatch

BACKENDS = ("gemv", "w8a16", "triton", "scaled_mm", "rowwise", "torch")


def act_kind(backend: str) -> str | None:
    """The activation quant a backend takes: "group" (1x128), "row", or None (x as it is)."""
    return {"triton": "group", "scaled_mm": "group", "rowwise": "row"}.get(backend)


def resolve_backend(backend: str, x_dtype: torch.dtype | None) -> str:
    """The backend that runs for x of x_dtype (None: x comes quantized, an Fp8Act): "w8a16" takes
    bf16/fp16 x as it is; fp32 x, or x quantized already, go to "triton"."""
    return "triton" if backend == "w8a16" and x_dtype not in (torch.bfloat16, torch.float16) else backend


def fp8_gemm(x: torch.Tensor | Fp8Act, w: torch.Tensor, ws: torch.Tensor, group_n: int = 128,
             backend: str = "triton", ws_mm: torch.Tensor | None = None,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] -> x @ dequant(w, ws)^T [M, N], activations quantized per token in 1x128 groups.

    backend "gemv" (M <= GEMV_MAX_M) or "w8a16" (x is not quantized in either; "w8a16" takes fp32
    x quantized, as "triton"), "triton" or "scaled_mm" (CUDA) or "torch" (the reference, any
    device); ws_mm is the _scaled_mm copy of ws (required for "scaled_mm"). "rowwise": per-channel
    weights (ws_mm [1, N]; ws their [N, K/128] grid at group_n 1), x quantized one scale per row.
    x may come quantized already (an Fp8Act of the backend's `act_kind`; out_dtype then required).
    """
    quantized = isinstance(x, Fp8Act)
    backend = resolve_backend(backend, None if quantized else x.dtype)
    if backend == "torch":
        if quantized:
            raise ValueError("backend 'torch' (the reference) takes x unquantized")
        xq, xs = per_token_group_quant_fp8_torch(x)
        return w8a8_block_gemm_torch(xq, xs, w, ws, group_n, out_dtype or x.dtype)
    if backend not in BACKENDS:
        raise ValueError(f"unknown FP8 GEMM backend {backend!r} (known: {', '.join(BACKENDS)})")
    kind = act_kind(backend)
    if quantized:
        if x.kind != kind:
            raise ValueError(f"backend {backend!r} takes {kind or 'unquantized'} activations, got {x.kind!r}")
        if out_dtype is None:
            raise ValueError("out_dtype is required with quantized activations")
    else:
        out_dtype = out_dtype or x.dtype
        if kind is None:
            gemm = w8a16_gemv if backend == "gemv" else w8a16_block_gemm
            return gemm(x, w, ws, group_n, out_dtype)
        x = quantize_act(x, kind)
    m = x.rows
    if backend == "scaled_mm":  # padded rows: their outputs dropped
        return scaled_mm_blockwise(x.q, x.scale, w, ws_mm, out_dtype)[:m]
    if backend == "rowwise":
        return scaled_mm_rowwise(x.q, x.scale, w, ws_mm, out_dtype)
    return w8a8_block_gemm(x.q[:m], x.scale[:m], w, ws, group_n, out_dtype)
