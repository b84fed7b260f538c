"""Multi-head Latent Attention for mixed micro-batches: prefill chunks and decode rows, one launch.

The new tokens of every sequence (a prefill chunk that may start mid-prompt, chunked prefill,
or one decode token) attend causally to the sequence's whole latent context, read straight from
the paged pool (mla_cache.py) through its block table; the new tokens' latents are already
there. Same latent math as mla_decode.py (absorbed weights: MQA over rows [c_kv || k_pe],
value c_kv, output [T, H, R] in the latent space), same tiling as unified_attention.py (the
Llama kernel): the host lists *tiles* of up to `tile_q` query tokens of one sequence
(`unified_attention.tile_plan`, -1 marks an unused tile), and the grid is (head blocks,
tiles), each program holding tile_q tokens x BLOCK_H heads as the rows of its `tl.dot`s. It
walks the keys its last query can see with the online softmax of mla_decode.mla_block. Nothing
depends on the host inside a step, and the grid can be sized for a CUDA-graph bucket.

Why the absorbed form for prefill, not vLLM's "compute-friendly" MHA form (up-project the
context to per-head K [L, H, 192] and V [L, H, 128], then flash attention): the MHA form does
2 * (192 + 128) FLOPs per (query head, key) against 2 * (576 + 512) here (3.4x fewer), but it
must first gather and up-project every context token (2 * 512 * H * 256 FLOPs per token and
a variable-sized workspace: a step with long cached prefixes needs it chunked, and its size
is data-dependent, so no CUDA graph). On the "mixed" workload (prompts < 1024 tokens) the
attention is a few per cent of a DeepSeek layer's FLOPs either way (V2-Lite: 16 heads), so
one graph-capturable kernel that reads the paged pool in place is the simpler and, measured
end to end, the faster choice here; benchmarks/bench_deepseek_gpu.py --kernels times it
against the MHA form (the old per-sequence path) at V3's 128 heads.

`mla_attention_torch` is the reference: every sequence's context padded into one batch, one
masked SDPA call for the whole micro-batch (no per-sequence loop); it is the CPU path too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stage_worker.kernels.mla_decode import context_slots

try:  # Triton is optional: CPU-only installs never import it.
    import triton
    import triton.language as tl

    from stage_worker.kernels.mla_decode import mla_block
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Measured on an H100 (benchmarks/bench_deepseek_gpu.py --kernels, 4 shapes x 3 workloads): 16
# heads x 4 tokens per program with 8 warps was the fastest or within 6% of it everywhere.
BLOCK_H = 16  # heads per program
BLOCK_M = 64  # rows (query tokens x heads) per program: [BLOCK_M, R] fp32 accumulators
BLOCK_N = 32  # cache rows per inner iteration
NUM_WARPS = 8
NUM_STAGES = 2


def heads_per_program(num_heads: int, block_h: int = BLOCK_H) -> int:
    """BLOCK_H, or fewer heads (rounded up to a power of two) when the model has fewer."""
    return min(block_h, 1 << (num_heads - 1).bit_length())


def tile_q(num_heads: int, block_h: int = BLOCK_H, block_m: int = BLOCK_M) -> int:
    """Query tokens per tile: BLOCK_M rows hold tile_q tokens x heads_per_program heads."""
    return max(1, block_m // heads_per_program(num_heads, block_h))


def mla_attention(q, pool, block_tables, seq_lens, query_start_loc, tile_seq, tile_row, scale: float,
                  block_size: int, kv_rank: int, bq: int, use_triton: bool | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """q: [T, H, R + Dr] latent queries; pool: [N, R + Dr]; block_tables: [S, W]; seq_lens: [S]
    (context after this step); query_start_loc: [S+1]; tile_seq, tile_row: [G] (tile_plan with
    bq = tile_q(H) tokens per tile) -> latent output [T, H, R] in q's dtype.

    Rows that no tile covers (padding) are left unwritten by the kernel (zero in the reference).
    """
    if use_triton is None:
        use_triton = triton is not None and q.is_cuda
    if not use_triton:
        slots, _ = context_slots(block_tables, seq_lens, block_size)
        qsl = query_start_loc[: seq_lens.shape[0] + 1].to(q.device)  # graph buffers may be longer
        return mla_attention_torch(q, pool, slots, seq_lens, qsl[:-1], qsl[1:] - qsl[:-1], scale, kv_rank)
    return _mla_attention_triton(q, pool, block_tables, seq_lens, query_start_loc, tile_seq, tile_row,
                                 scale, block_size, kv_rank, bq, config or {})


def mla_attention_torch(q, pool, slots, seq_lens, q_start, q_count, scale, kv_rank) -> torch.Tensor:
    """Reference over padded contexts, for S sequences: slots [S, L] (each sequence's context
    slots; any value past its length), seq_lens [S] (context after this step), q_start and
    q_count [S] (its rows in q: the last q_count positions of its context).

    One SDPA for all of them: queries padded to [S, H, Qmax, R + Dr], keys [S, 1, L, R + Dr],
    causal mask. Rows of q that belong to no listed sequence come back zero.
    """
    t, h, _ = q.shape
    out = torch.zeros(t, h, kv_rank, dtype=q.dtype, device=q.device)
    if t == 0 or slots.shape[0] == 0:
        return out
    dev = q.device
    start, n, lens = q_start.to(dev), q_count.to(dev), seq_lens.to(dev)
    j = torch.arange(max(1, int(n.max())), device=dev)
    has_q = j[None, :] < n[:, None]  # [S, Qmax]
    rows = torch.where(has_q, start[:, None] + j[None, :], torch.zeros_like(j)[None, :])
    qp = q[rows].permute(0, 2, 1, 3)  # [S, H, Qmax, R + Dr]
    kv = pool[slots.to(dev)].to(q.dtype)[:, None]  # [S, 1, L, R + Dr]
    qpos = lens[:, None] - n[:, None] + j[None, :]  # [S, Qmax] absolute position of each query
    kpos = torch.arange(slots.shape[1], device=dev)
    see = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < lens[:, None, None])
    see = see | ((kpos == 0)[None, None, :] & ~has_q[:, :, None])  # padded queries: finite, dropped
    o = F.scaled_dot_product_attention(qp, kv, kv[..., :kv_rank], attn_mask=see[:, None], scale=scale,
                                       enable_gqa=True)  # [S, H, Qmax, R]
    out[rows[has_q]] = o.permute(0, 2, 1, 3)[has_q]
    return out


def _mla_attention_triton(q, pool, block_tables, seq_lens, query_start_loc, tile_seq, tile_row, scale,
                          block_size, kv_rank, bq, config):
    t, h, width = q.shape
    rope = width - kv_rank
    bh = heads_per_program(h, config.get("BLOCK_H", BLOCK_H))
    out = torch.empty(t, h, kv_rank, dtype=q.dtype, device=q.device)
    if t == 0 or tile_seq.shape[0] == 0:
        return out
    if q.stride(-1) != 1 or pool.stride(-1) != 1:
        raise ValueError("q and pool need a unit stride along their last dim")
    _mla_prefill_kernel[(triton.cdiv(h, bh), tile_seq.shape[0])](
        q, pool, block_tables, seq_lens, query_start_loc, tile_seq, tile_row, out,
        q.stride(0), q.stride(1), pool.stride(0), block_tables.stride(0), out.stride(0), out.stride(1),
        scale, h,
        BLOCK_SIZE=block_size, R=kv_rank, DR=rope, BLOCK_R=triton.next_power_of_2(kv_rank),
        BLOCK_DR=max(16, triton.next_power_of_2(rope)), BLOCK_H=bh, BLOCK_Q=bq,
        BLOCK_M=max(16, triton.next_power_of_2(bq * bh)), BLOCK_N=config.get("BLOCK_N", BLOCK_N),
        num_warps=config.get("num_warps", NUM_WARPS), num_stages=config.get("num_stages", NUM_STAGES),
    )
    return out


if triton is not None:

    @triton.jit
    def _mla_prefill_kernel(Q, KV, BT, SL, QSL, TS, TR, O,
                            s_qt, s_qh, s_kv, s_bt, s_ot, s_oh, scale, H,
                            BLOCK_SIZE: tl.constexpr, R: tl.constexpr, DR: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_H: tl.constexpr,
                            BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        hb = tl.program_id(0)
        tile = tl.program_id(1)
        seq = tl.load(TS + tile)
        if seq < 0:
            return
        row0 = tl.load(TR + tile)
        q_lo = tl.load(QSL + seq)
        q_hi = tl.load(QSL + seq + 1)
        ctx = tl.load(SL + seq)
        first_pos = ctx - (q_hi - q_lo)  # absolute position of the sequence's first new token
        m = tl.arange(0, BLOCK_M)
        row = row0 + m // BLOCK_H
        h = hb * BLOCK_H + m % BLOCK_H
        valid = (h < H) & (row < q_hi) & (m < BLOCK_Q * BLOCK_H)
        qpos = tl.where(valid, first_pos + row - q_lo, 0)  # invalid rows see key 0 only (finite)
        r = tl.arange(0, BLOCK_R)
        rm = r < R
        e = tl.arange(0, BLOCK_DR)
        em = e < DR
        q_row = Q + row.to(tl.int64)[:, None] * s_qt + h[:, None] * s_qh
        q_lat = tl.load(q_row + r[None, :], mask=valid[:, None] & rm[None, :], other=0.0)
        q_pe = tl.load(q_row + R + e[None, :], mask=valid[:, None] & em[None, :], other=0.0)
        last = tl.minimum(row0 + BLOCK_Q, q_hi) - 1
        kv_hi = first_pos + last - q_lo + 1  # keys visible to the tile's last query
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
        for start in range(0, kv_hi, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            in_ctx = t < kv_hi
            see = (t[None, :] <= qpos[:, None]) & in_ctx[None, :]
            m_i, l_i, acc = mla_block(q_lat, q_pe, KV, BT + seq * s_bt, t, in_ctx, see, s_kv, r, rm, e, em,
                                      m_i, l_i, acc, scale, BLOCK_SIZE, R)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptr = O + row.to(tl.int64)[:, None] * s_ot + h[:, None] * s_oh + r[None, :]
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=valid[:, None] & rm[None, :])
