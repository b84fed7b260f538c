"""Paged attention for mixed micro-batches in one launch: prefill chunks and decode tokens alike.

A micro-batch is a flat token axis [T]: per sequence, a run of new tokens (a prefill chunk that
may start mid-prompt, or one decode token). Every query attends causally to its sequence's whole
context, read straight from the paged pool through the block table; the new tokens' K/V are
already in the pool (written by the layer before attention).

The work is cut into *tiles*: up to `block_q` consecutive query rows of one sequence, times the
query heads that share one KV head (GQA), so one K/V read serves them all. The host lists the
tiles (`tile_plan`: sequence and first row of each, -1 for an unused tile); the kernel's grid is
(tiles, kv heads) and each program walks the keys its last query can see, with an online
softmax. Nothing depends on the host inside a step, and the grid can be sized for the largest
micro-batch of a CUDA-graph bucket (`max_tiles`): unused tiles return at once. The same layout
as vLLM's unified Triton attention, written for this pool (slots = block * block_size + offset).

- `unified_attention(...)`: Triton on CUDA; the torch reference (gather + masked SDPA per
  sequence) elsewhere, which is also the reference the kernel is checked against.
- `window` (sliding-window layers: a query sees its last `window` keys, itself included) and
  `softcap` (Gemma 2's `softcap * tanh(score / softcap)`) as in paged_decode.py; a tile starts
  its walk at the first key its first query's window reaches.
"""

from __future__ import annotations

import numpy as np
import torch

from stage_worker.kernels.softmax import attention_torch, online_softmax_block
from stage_worker.kv_cache import read_slots

try:  # Triton is optional: CPU-only installs never import it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK_M = 64  # query rows x heads per program
BLOCK_N = 64  # keys per inner iteration


def group_pad(num_q_heads: int, num_kv_heads: int) -> int:
    group = num_q_heads // num_kv_heads
    return 1 << (group - 1).bit_length()


def block_m(num_q_heads: int, num_kv_heads: int) -> int:
    """Rows (query tokens x heads) per program: BLOCK_M, or one token's whole group if larger."""
    return max(BLOCK_M, group_pad(num_q_heads, num_kv_heads))


def block_q(num_q_heads: int, num_kv_heads: int) -> int:
    """Query tokens per tile: a program's rows hold block_q tokens x the padded GQA group."""
    return block_m(num_q_heads, num_kv_heads) // group_pad(num_q_heads, num_kv_heads)


def max_tiles(num_tokens: int, num_seqs: int, bq: int) -> int:
    """Upper bound of the tiles of any micro-batch of <= num_tokens tokens and <= num_seqs sequences."""
    return num_tokens // bq + num_seqs


def tile_plan(query_start_loc: np.ndarray, bq: int, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tile_seq, tile_row) int64 arrays: the sequence and first query row of each tile.

    query_start_loc: [S+1] row offsets. size: pad to this many tiles with tile_seq = -1.
    """
    ns = np.diff(query_start_loc)
    per = -(-ns // bq)  # tiles of each sequence
    count = int(per.sum())
    seq = np.repeat(np.arange(len(ns), dtype=np.int64), per)
    first = np.zeros(len(ns), dtype=np.int64)
    np.cumsum(per[:-1], out=first[1:])
    row = query_start_loc[:-1][seq] + (np.arange(count) - first[seq]) * bq
    if size is not None:
        if size < count:
            raise ValueError(f"{count} tiles do not fit a plan of {size}")
        seq = np.concatenate([seq, np.full(size - count, -1, dtype=np.int64)])
        row = np.concatenate([row, np.zeros(size - count, dtype=np.int64)])
    return seq, row.astype(np.int64)


def unified_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, tile_seq, tile_row,
                      scale: float, block_size: int, use_triton: bool | None = None,
                      window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q: [T, Hq, D]; k_cache, v_cache: [N, Hkv, D]; block_tables: [S, W]; seq_lens: [S] (context
    after this step); query_start_loc: [S+1]; tile_seq, tile_row: [G] (tile_plan) -> [T, Hq, D].

    Rows that no tile covers (padding) are left unwritten.
    """
    if use_triton is None:
        use_triton = triton is not None and q.is_cuda
    if use_triton:
        return _unified_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, tile_seq,
                               tile_row, scale, block_size, window, softcap)
    return unified_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                   block_size, window, softcap)


def unified_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, block_size,
                            window=None, softcap=None):
    """Reference: per sequence, gather its context through the block table and run masked SDPA."""
    out = torch.zeros_like(q)
    qsl = query_start_loc.tolist()
    for s, ctx in enumerate(seq_lens.tolist()):
        a, b = qsl[s], qsl[s + 1]
        if b <= a:
            continue
        pos = torch.arange(ctx, device=q.device)
        slots = block_tables[s, pos // block_size] * block_size + pos % block_size
        k = read_slots(k_cache, slots, q.dtype).transpose(0, 1)[None]  # [1, Hkv, L, D]
        v = read_slots(v_cache, slots, q.dtype).transpose(0, 1)[None]
        qpos = torch.arange(ctx - (b - a), ctx, device=q.device)
        mask = pos[None, :] <= qpos[:, None]  # [n, L]
        if window:
            mask &= pos[None, :] > qpos[:, None] - window
        o = attention_torch(q[a:b].transpose(0, 1)[None], k, v, mask[None, None], scale, softcap)
        out[a:b] = o[0].transpose(0, 1)
    return out


def _unified_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, tile_seq, tile_row,
                    scale, block_size, window=None, softcap=None):
    t, hq, d = q.shape
    hkv = k_cache.shape[1]
    gp = group_pad(hq, hkv)
    out = torch.empty_like(q)
    grid = (tile_seq.shape[0], hkv)
    _unified_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, tile_seq, tile_row, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1), scale, int(window or 0), float(softcap or 0.0),
        BLOCK_SIZE=block_size, GROUP=hq // hkv, GROUP_PAD=gp, BLOCK_Q=block_q(hq, hkv), HEAD_DIM=d,
        BLOCK_M=block_m(hq, hkv), BLOCK_N=BLOCK_N, SOFTCAP=bool(softcap), num_warps=4, num_stages=2,
    )
    return out


if triton is not None:

    @triton.jit
    def _unified_kernel(Q, K, V, BT, SL, QSL, TS, TR, O,
                        s_qt, s_qh, s_kn, s_kh, s_bt, s_ot, s_oh, scale, window, softcap,
                        BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                        BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr):
        tile = tl.program_id(0)
        hk = tl.program_id(1)
        seq = tl.load(TS + tile)
        if seq < 0:
            return
        row0 = tl.load(TR + tile)
        q_lo = tl.load(QSL + seq)
        q_hi = tl.load(QSL + seq + 1)
        ctx = tl.load(SL + seq)
        first_pos = ctx - (q_hi - q_lo)  # absolute position of the sequence's first new token
        m = tl.arange(0, BLOCK_M)
        qi = m // GROUP_PAD
        g = m % GROUP_PAD
        row = row0 + qi
        valid = (g < GROUP) & (row < q_hi)
        qpos = tl.where(valid, first_pos + row - q_lo, 0)  # invalid rows see key 0 at most (never stored)
        d = tl.arange(0, HEAD_DIM)
        qh = hk * GROUP + g
        q_ptr = Q + row.to(tl.int64)[:, None] * s_qt + qh[:, None] * s_qh + d[None, :]
        qv = tl.load(q_ptr, mask=valid[:, None], other=0.0)
        last = tl.minimum(row0 + BLOCK_Q, q_hi) - 1
        kv_hi = first_pos + last - q_lo + 1  # keys visible to the tile's last query
        # Sliding window: a query at p sees keys (p - window, p]; the tile's first query sees the lowest.
        kv_lo = tl.where(window > 0, tl.maximum(first_pos + row0 - q_lo - window + 1, 0), 0)
        win_lo = tl.where(window > 0, qpos - window + 1, 0)  # [BLOCK_M] lowest key each row sees
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start in range(kv_lo // BLOCK_N * BLOCK_N, kv_hi, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            in_ctx = t < kv_hi
            see = (t[None, :] <= qpos[:, None]) & (t[None, :] >= win_lo[:, None]) & in_ctx[None, :]
            m_i, l_i, acc = online_softmax_block(qv, K, V, BT + seq * s_bt, t, in_ctx, see, hk * s_kh,
                                                 s_kn, d, m_i, l_i, acc, scale, softcap, BLOCK_SIZE, SOFTCAP)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # padding rows may see no key
        o_ptr = O + row.to(tl.int64)[:, None] * s_ot + qh[:, None] * s_oh + d[None, :]
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=valid[:, None])
