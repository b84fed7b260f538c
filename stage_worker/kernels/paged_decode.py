"""Paged decode attention: one query token per sequence, K/V read straight from the paged pool.

Two implementations of one function, `paged_decode(q, k_cache, v_cache, block_tables, ctx_lens,
scale, num_splits)`:

- a Triton kernel (CUDA), flash-decoding style: grid (sequence, kv head, split); each program
  walks its split of the sequence's pages with an online softmax, for all the query heads that
  share the kv head at once (GQA: one K/V read serves the whole group), and writes a partial
  output plus its log-sum-exp; a few torch ops combine the splits. No host synchronisation and
  fixed shapes, so it can be captured in a CUDA graph (the context length is read in-kernel).
- a torch reference (CPU, or when Triton is missing): gathers each context and runs SDPA.

block_tables: [B, W] long, row b lists sequence b's blocks (only the first ceil(ctx/bs) are read);
ctx_lens: [B] long, >= 1. K/V slots are `block * block_size + offset` (see kv_cache.py).
window: a sliding window (Mistral, Gemma 2's local layers): the query sees only its last `window`
keys, itself included (transformers' `kv > q - window`); the kernel walks only those, so its
splits cover the window, not the whole context. softcap: Gemma 2's `softcap * tanh(s / softcap)`
of the scaled scores. 0 / None: off.
"""

from __future__ import annotations

import torch

from stage_worker.kernels import tuning
from stage_worker.kernels.fused_ops import combine_splits
from stage_worker.kernels.softmax import attention_torch, online_softmax_block
from stage_worker.kv_cache import read_slots

try:  # Triton is optional: CPU-only installs never import it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK_N = 64  # tokens per inner iteration (several pages); the splits are sized in these
# The kernel's default (BLOCK_N, num_warps, num_stages) for every pool dtype; a GPU's tuning file
# (kernels/tuning.py, written by benchmarks/gpu/bench_decode_attention.py) overrides it per pool dtype.
DECODE_CONFIG: tuple[int, int, int] = (BLOCK_N, 4, 2)


def decode_config(pool_dtype: torch.dtype) -> tuple[int, int, int]:
    """The tile the kernel launches with for a pool of this dtype: the active tuning's, else
    DECODE_CONFIG."""
    return tuning.active().decode.get(str(pool_dtype).removeprefix("torch."), DECODE_CONFIG)


def triton_available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def choose_splits(batch: int, num_kv_heads: int, max_ctx: int | None = None, sms: int = 132,
                  block_n: int = BLOCK_N) -> int:
    """Splits of the context per sequence so that ~2 programs run per SM (flash decoding), at most
    one per `block_n` keys of the longest context (the kernel's keys per iteration)."""
    splits = max(1, min(16, -(-2 * sms // max(1, batch * num_kv_heads))))
    if max_ctx is not None:
        splits = max(1, min(splits, -(-max_ctx // block_n)))
    return splits


def paged_decode(q, k_cache, v_cache, block_tables, ctx_lens, scale: float, block_size: int,
                 num_splits: int = 1, max_ctx: int | None = None, use_triton: bool | None = None,
                 window: int | None = None, softcap: float | None = None,
                 config: tuple[int, int, int] | None = None):
    """q: [B, Hq, D]; k_cache, v_cache: [N, Hkv, D] -> out [B, Hq, D] in q's dtype. config: the
    kernel's (BLOCK_N, num_warps, num_stages) (default: decode_config of the pool's dtype)."""
    if use_triton is None:
        use_triton = triton_available(q.device)
    if use_triton:
        return _paged_decode_triton(q, k_cache, v_cache, block_tables, ctx_lens, scale, block_size,
                                    num_splits, window, softcap, config or decode_config(k_cache.dtype))
    return paged_decode_torch(q, k_cache, v_cache, block_tables, ctx_lens, scale, block_size, max_ctx,
                              window, softcap)


def paged_decode_torch(q, k_cache, v_cache, block_tables, ctx_lens, scale, block_size, max_ctx=None,
                       window=None, softcap=None):
    """Reference: gather [B, Lmax] slots from the block tables, masked SDPA (needs a host sync)."""
    b = q.shape[0]
    lmax = int(max_ctx if max_ctx is not None else ctx_lens.max())
    pos = torch.arange(lmax, device=q.device)  # [L]
    blocks = block_tables[:, pos // block_size]  # [B, L]
    slots = blocks * block_size + pos % block_size  # [B, L]
    mask = pos[None, :] < ctx_lens[:, None]  # [B, L]
    if window:
        mask &= pos[None, :] >= ctx_lens[:, None] - window
    k = read_slots(k_cache, slots, q.dtype).transpose(1, 2)  # [B, Hkv, L, D]
    v = read_slots(v_cache, slots, q.dtype).transpose(1, 2)
    o = attention_torch(q.unsqueeze(2), k, v, mask.view(b, 1, 1, lmax), scale, softcap)  # [B, Hq, 1, D]
    return o.squeeze(2)


def _paged_decode_triton(q, k_cache, v_cache, block_tables, ctx_lens, scale, block_size, num_splits,
                         window, softcap, config):
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    q = q.contiguous()
    part = torch.empty(b, hq, num_splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, num_splits, dtype=torch.float32, device=q.device)
    grid = (b, hkv, num_splits)
    _decode_kernel[grid](
        q, k_cache, v_cache, block_tables, ctx_lens, part, lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        scale, int(window or 0), float(softcap or 0.0),
        BLOCK_SIZE=block_size, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d, BLOCK_N=config[0], NUM_SPLITS=num_splits, SOFTCAP=bool(softcap),
        num_warps=config[1], num_stages=config[2],
    )
    if num_splits == 1:
        return part[:, :, 0].to(q.dtype)
    return combine_splits(part, lse, q.dtype)  # softmax(lse)-weighted sum over splits, one launch


if triton is not None:

    @triton.jit
    def _decode_kernel(Q, K, V, BT, CL, O, LSE,
                       s_qb, s_qh, s_kn, s_kh, s_bt, s_ob, s_oh, s_os, s_lb, s_lh,
                       scale, window, softcap,
                       BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                       SOFTCAP: tl.constexpr):
        bid = tl.program_id(0)
        hk = tl.program_id(1)
        sp = tl.program_id(2)
        ctx = tl.load(CL + bid).to(tl.int32)
        # The keys the query sees: [first, ctx), the last `window` of them when window > 0.
        first = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
        per = tl.cdiv(tl.cdiv(ctx - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = first + sp * per
        hi = tl.minimum(lo + per, ctx)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        gmask = g < GROUP
        qh = hk * GROUP + g
        q = tl.load(Q + bid * s_qb + qh[:, None] * s_qh + d[None, :], mask=gmask[:, None], other=0.0)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        n_iter = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
        for it in range(0, n_iter):
            t = lo + it * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = t < hi
            m_i, l_i, acc = online_softmax_block(q, K, V, BT + bid * s_bt, t, valid, valid[None, :], hk * s_kh,
                                                 s_kn, d, m_i, l_i, acc, scale, softcap, BLOCK_SIZE, SOFTCAP)
        nonempty = l_i > 0
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        lse = tl.where(nonempty, m_i + tl.log(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        o_ptr = O + bid * s_ob + qh[:, None] * s_oh + sp * s_os + d[None, :]
        tl.store(o_ptr, out, mask=gmask[:, None])
        tl.store(LSE + bid * s_lb + qh * s_lh + sp, lse, mask=gmask)
