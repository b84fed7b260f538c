"""Fused mixture-of-experts: the routed experts of a batch as two grouped GEMM launches.

Data flow for M tokens, top_k experts each, E experts of hidden H and intermediate I:

  topk_ids [M, k] --moe_align_block_size--> sorted_ids, expert_ids, num_tokens_post_padded (device)
  x [M, H] --GEMM1 (w13 [E, 2I, H]; row r of a block reads x[sorted_ids[r] // k])--> gu [M*k, 2I]
  gu --silu(gate) * up--> act [M*k, I]            (fused_ops.silu_and_mul; FP8: quantized 1x128 in it)
  act --GEMM2 (w2 [E, H, I]; rows read as is; times the routed weight in the epilogue)--> y [M*k, H]
  y.view(M, k, H).sum(1) --> [M, H]

Each GEMM program owns BLOCK_M rows of one expert (`expert_ids[pid_m]`) by BLOCK_N columns: it
reads num_tokens_post_padded on the device and returns at once when its rows are past it, gathers
its A rows through sorted_ids (no permuted copy of x), and writes rows back by flat index
`token * k + slot` (padding rows, sorted_ids == M*k, are masked). Shapes depend only on M, so a
layer is free of host syncs and capturable in a CUDA graph (vLLM's `fused_moe_kernel` design).

Weights: bf16 / fp16 / fp32 stacks, or block-FP8 (e4m3 [E, N, K] with dequant scales
[E, ceil(N/group_n), ceil(K/128)], the checkpoint's `weight_scale_inv` stacked): activations are
then quantized per token in 1x128 groups (kernels/fp8_act.py) and BLOCK_K is 128, so each K step
multiplies its fp32 partial dot by one activation scale per row and one weight scale per column.

`fused_experts_torch` is the reference (dequantized weights, one GEMM per expert, float32).
"""

from __future__ import annotations

import torch

from stage_worker.kernels import fp8 as fp8k
from stage_worker.kernels import fp8_act as fp8a
from stage_worker.kernels import tuning
from stage_worker.kernels.fused_ops import silu_and_mul
from stage_worker.kernels.moe_align import moe_align_block_size

try:  # Triton is optional: CPU-only installs never import it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

GROUP_K = 128  # FP8 activation group and weight block along K
SCALAR_WEIGHT_SCALE = True  # a tile inside one weight scale block loads one scale per K group (bench A/B)

# Tiles per expected rows per expert (numel / E; largest key <= it wins):
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); BLOCK_K is 128 (the quant group)
# for FP8. Picked by `benchmarks/gpu/bench_moe.py --sweep` on an H100 (Triton 3.6), routed
# experts replayed in a CUDA graph at the DeepSeek-V2-Lite and V3 shapes: the best or within 2%
# of it at both; (128, 128, 128, 8, 4, 4) for FP8 spilled (3-4x slower), hence 64-row FP8 tiles.
# FP8 re-swept at V3's shape with one weight scale per K group (2026-12-07, H100): at 4,096 tokens
# GROUP_M 16 6.28 ms against 6.47 (8) and 7.32 before the scalar scale; at 8,192 GROUP_M 8 and 16
# within 1%; two K groups per step (BLOCK_K 256) 1.2-1.3x slower at prefill sizes, 2% faster at
# 256 tokens in the sweep but not in the mesh (4,089 vs 4,101 tok/s), so not used.
CONFIGS_16BIT: dict[int, tuple[int, int, int, int, int, int]] = {
    0: (16, 64, 128, 1, 4, 4),
    8: (32, 64, 128, 8, 4, 4),
    32: (128, 128, 64, 8, 8, 3),
    128: (128, 256, 64, 8, 8, 3),
}
CONFIGS_FP8: dict[int, tuple[int, int, int, int, int, int]] = {
    0: (16, 64, 128, 1, 4, 5),
    8: (64, 64, 128, 8, 4, 4),
    32: (64, 128, 128, 8, 4, 3),
    128: (64, 128, 128, 16, 4, 4),
}


def moe_config(numel: int, num_experts: int, fp8: bool) -> tuple[int, int, int, int, int, int]:
    """The tile for `numel` routed rows over `num_experts`: from the active kernel tuning's table
    for the weight type (kernels/tuning.py), else CONFIGS_FP8 / CONFIGS_16BIT."""
    table = tuning.active().moe.get("fp8" if fp8 else "16bit") or (CONFIGS_FP8 if fp8 else CONFIGS_16BIT)
    per_expert = numel / max(num_experts, 1)
    return table[max(key for key in table if key <= per_expert)]


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, b13: torch.Tensor | None = None, b2: torch.Tensor | None = None,
                  w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                  group_n: tuple[int, int] = (128, 128), config: tuple | None = None,
                  use_triton: bool | None = None) -> torch.Tensor:
    """x [M, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; topk_weights [M, k]
    (any float dtype), topk_ids [M, k]; b13 [E, 2I] / b2 [E, H] optional; FP8 when the scales
    are given (group_n: the scale row group of w13 and of w2) -> [M, H] in x's dtype (Triton;
    `fused_experts_torch` is the reference)."""
    m, k = topk_ids.shape
    e, n13, h = w13.shape
    fp8 = w13_scale is not None
    numel = m * k
    out = x.new_empty(m, h)
    if m == 0:
        return out
    bm, bn, bk, group_m, warps, stages = config or moe_config(numel, e, fp8)
    paired = fp8 and bk == 2 * GROUP_K  # FP8: BLOCK_K 256 = two quant groups per loop step
    if fp8:
        bk = GROUP_K
    sorted_ids, expert_ids, post = moe_align_block_size(topk_ids, bm, e, use_triton=use_triton)
    weights = topk_weights.reshape(-1).float()
    tiles = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, PAIRED=paired, num_warps=warps,
                 num_stages=stages)
    route = (weights, sorted_ids, expert_ids, post)
    gu = x.new_empty(numel, n13)  # row token*k + slot: A row `token` (top_k k) through its expert's w13
    _gemm(_quant(x, fp8, use_triton), w13, w13_scale, b13, gu, *route, k, False, group_n[0], tiles)
    act = silu_and_mul(gu, use_triton=use_triton, quant="group" if fp8 else None)  # [M*k, I], FP8: quantized
    y = x.new_empty(numel, h)  # rows read as they are (top_k 1), times the routed weight
    _gemm((act.q, act.scale) if fp8 else (act, None), w2, w2_scale, b2, y, *route, 1, True, group_n[1], tiles)
    return torch.sum(y.view(m, k, h), dim=1, out=out)


def _quant(a: torch.Tensor, use_fp8: bool, use_triton: bool | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(a, None), or a quantized per token in 1x128 groups: (e4m3 [R, K], scales [R, ceil(K/128)])."""
    return fp8a.per_token_group_quant_fp8(a, GROUP_K, use_triton=use_triton) if use_fp8 else (a, None)


def _gemm(a_and_scale, w, w_scale, bias, c, weights, sorted_ids, expert_ids, post, top_k: int,
          mul_weight: bool, group_n: int, tiles: dict) -> None:
    """c[flat rows] = A[rows // top_k] @ w[expert].T (+ bias) (* routed weight) for every block."""
    a, a_scale = a_and_scale
    e, n, kdim = w.shape
    bound = sorted_ids.shape[0]
    grid = (triton.cdiv(bound, tiles["BLOCK_M"]) * triton.cdiv(n, tiles["BLOCK_N"]),)
    fp8 = w_scale is not None
    dummy = weights  # any tensor stands for an absent pointer (its branch is compiled out)
    _fused_moe_kernel[grid](
        a, w, c, a_scale if fp8 else dummy, w_scale if fp8 else dummy, bias if bias is not None else dummy,
        weights, sorted_ids, expert_ids, post,
        n, kdim, bound, c.shape[0], group_n,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), c.stride(0), c.stride(1),
        a_scale.stride(0) if fp8 else 0, a_scale.stride(1) if fp8 else 0,
        w_scale.stride(0) if fp8 else 0, w_scale.stride(1) if fp8 else 0, w_scale.stride(2) if fp8 else 0,
        bias.stride(0) if bias is not None else 0,
        TOP_K=top_k, MUL_ROUTED_WEIGHT=mul_weight, USE_FP8=fp8, HAS_BIAS=bias is not None,
        IEEE=a.dtype == torch.float32, SCALAR_BS=fp8 and SCALAR_WEIGHT_SCALE and group_n % tiles["BLOCK_N"] == 0,
        **tiles)


if triton is not None:
    @triton.jit
    def _fused_moe_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, topk_w_ptr,
                          sorted_ids_ptr, expert_ids_ptr, post_ptr,
                          N, K, EM, num_valid, group_n,
                          stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
                          stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk, stride_bias_e,
                          TOP_K: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr, USE_FP8: tl.constexpr,
                          HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, SCALAR_BS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, PAIRED: tl.constexpr):
        pid = tl.program_id(0)
        num_m, num_n = tl.cdiv(EM, BLOCK_M), tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n  # grouped order: GROUP_M row blocks share each weight tile in L2
        first_m = (pid // per_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        if pid_m * BLOCK_M >= tl.load(post_ptr):
            return  # past the last expert's padded rows (read on device: no host sync)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        tok = tl.load(sorted_ids_ptr + rows).to(tl.int64)  # flat index token*TOP_K + slot, or padding
        tok_mask = tok < num_valid
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_rows = tok // TOP_K
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BM, BK]
        b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk  # [BK, BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if USE_FP8:
            as_ptrs = as_ptr + a_rows * stride_asm
            if SCALAR_BS:  # the tile lies in one weight scale block along N: one scale per K group
                bs_ptrs = bs_ptr + expert * stride_bse + (pid_n * BLOCK_N // group_n) * stride_bsn
            else:
                bs_ptrs = bs_ptr + expert * stride_bse + (offs_n // group_n) * stride_bsn
            step: tl.constexpr = 2 if PAIRED else 1
            for kb in range(0, tl.cdiv(K, BLOCK_K), step):
                d, s = _fp8_group(a_ptrs, b_ptrs, as_ptrs, bs_ptrs, kb, K, tok_mask, n_mask, offs_k,
                                  stride_ak, stride_bk, stride_ask, stride_bsk, BLOCK_K, SCALAR_BS)
                if PAIRED:  # two independent dots in flight before either is scaled
                    d1, s1 = _fp8_group(a_ptrs, b_ptrs, as_ptrs, bs_ptrs, kb + 1, K, tok_mask, n_mask, offs_k,
                                        stride_ak, stride_bk, stride_ask, stride_bsk, BLOCK_K, SCALAR_BS)
                    acc += d * s + d1 * s1
                else:
                    acc += d * s
        else:
            for kb in range(0, tl.cdiv(K, BLOCK_K)):
                k_left = K - kb * BLOCK_K
                a = tl.load(a_ptrs, mask=tok_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
                b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & n_mask[None, :], other=0.0)
                if IEEE:
                    acc += tl.dot(a, b, input_precision="ieee")
                else:
                    acc += tl.dot(a, b)
                a_ptrs += BLOCK_K * stride_ak
                b_ptrs += BLOCK_K * stride_bk
        if HAS_BIAS:
            acc += tl.load(bias_ptr + expert * stride_bias_e + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if MUL_ROUTED_WEIGHT:
            acc *= tl.load(topk_w_ptr + tok, mask=tok_mask, other=0.0)[:, None]
        c_ptrs = c_ptr + tok[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=tok_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _fp8_group(a_ptrs, b_ptrs, as_ptrs, bs_ptrs, kb, K, tok_mask, n_mask, offs_k,
                   stride_ak, stride_bk, stride_ask, stride_bsk, BLOCK_K: tl.constexpr, SCALAR_BS: tl.constexpr):
        """K group kb (BLOCK_K = the 128-wide quant group): its unscaled dot and the scale to apply,
        [BM, 1] x [1, BN] (or x a scalar); a group past K reads zeros and scale 0."""
        k_left = K - kb * BLOCK_K
        k_ok = offs_k < k_left
        a = tl.load(a_ptrs + kb * BLOCK_K * stride_ak, mask=tok_mask[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs + kb * BLOCK_K * stride_bk, mask=k_ok[:, None] & n_mask[None, :], other=0.0)
        a_s = tl.load(as_ptrs + kb * stride_ask, mask=tok_mask & (k_left > 0), other=0.0)
        if SCALAR_BS:
            scale = a_s[:, None] * tl.load(bs_ptrs + kb * stride_bsk, mask=k_left > 0, other=0.0)
        else:
            scale = a_s[:, None] * tl.load(bs_ptrs + kb * stride_bsk, mask=n_mask & (k_left > 0), other=0.0)[None, :]
        return tl.dot(a, b), scale


def fused_experts_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, b13: torch.Tensor | None = None, b2: torch.Tensor | None = None,
                        w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                        group_n: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Reference: float32, one GEMM per expert hit (a host sync), FP8 as quantize-then-dequantize."""
    m, k = topk_ids.shape
    xf = _fake_quant(x, w13_scale is not None)
    out = torch.zeros(m, x.shape[1], dtype=torch.float32, device=x.device)
    for e in torch.unique(topk_ids).tolist():  # one expert dequantized at a time (V3: 30 GB in fp32)
        w13f = _dequant(w13[e], None if w13_scale is None else w13_scale[e], group_n[0])
        w2f = _dequant(w2[e], None if w2_scale is None else w2_scale[e], group_n[1])
        tok, slot = torch.where(topk_ids == e)
        gu = xf[tok] @ w13f.t() + (b13[e].float() if b13 is not None else 0)
        act = silu_and_mul(gu.to(x.dtype), use_triton=False)  # the kernel stores gu in x's dtype
        act = _fake_quant(act, w2_scale is not None)
        y = act @ w2f.t() + (b2[e].float() if b2 is not None else 0)
        y = (y * topk_weights[tok, slot, None].float()).to(x.dtype).float()
        out.index_add_(0, tok, y)
    return out.to(x.dtype)


def _dequant(w: torch.Tensor, scale: torch.Tensor | None, group_n: int) -> torch.Tensor:
    return w.float() if scale is None else fp8k.dequant_weight(w, scale, group_n, GROUP_K)


def _fake_quant(a: torch.Tensor, use_fp8: bool) -> torch.Tensor:
    """a as the FP8 kernel sees it: quantized per 1x128 group and dequantized (fp32)."""
    if not use_fp8:
        return a.float()
    return fp8k.dequant_act(*fp8a.per_token_group_quant_fp8_torch(a, GROUP_K), GROUP_K)
