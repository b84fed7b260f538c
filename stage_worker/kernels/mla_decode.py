"""Paged Multi-head Latent Attention decode (DeepSeek V2/V3): one query token per sequence.

With the absorbed weights (models/deepseek.py) every head's query lives in the latent space,
`q = [q_nope @ W_UK  ||  q_pe]` (R + Dr wide: 512 + 64 for V2/V3), and attention is multi-query
over the latent pool (mla_cache.py): one shared "head" whose key is the whole cache row
`[c_kv || k_pe]` and whose value is its first R columns, c_kv. The output is the latent
`o = softmax(q . row) @ c_kv` [R] per head; the caller applies W_UV.

The Triton kernel follows FlashMLA's point (a latent row is read once for *all* heads: FLOPs
per byte grow with the heads, so 128 heads make decode compute-bound) in the form of sglang's
grouped decode kernel:

- stage 1, grid (head blocks x SPLIT_R, sequences, splits): a program holds BLOCK_H heads' queries and
  walks its split of the sequence's context in blocks of BLOCK_N rows read through the block
  table, with two `tl.dot`s into one score tile (latent part, rope part) and one into the
  output (p @ c_kv); it writes a partial output [BLOCK_H, R] and its log-sum-exp (natural log).
  With SPLIT_R > 1 (config), SPLIT_R programs share a head block, each computing the scores in
  full but summing only its 1/SPLIT_R of the output columns: a [BLOCK_H, R / SPLIT_R] fp32
  accumulator instead of [64, 512] (128 registers a thread at 8 warps), scores computed twice.
  Head blocks vary fastest in the grid, so the programs that read the same rows run together
  and share them through L2.
- stage 2, grid (sequences * heads): the splits merged by their LSE weights; a sequence with
  no key at all (context length 0: padding rows) gets a zero output, never NaN.

Every shape is fixed by (batch, heads, splits), the context length is read on the device, and
nothing synchronises with the host, so a decode step can be captured in a CUDA graph.

`mla_decode_torch` is the reference (gather every context, masked SDPA; needs a host sync):
what the model ran before the kernel, and what the GPU benchmark times as the old path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stage_worker.kernels import tuning

try:  # Triton is optional: CPU-only installs never import it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK_N = 32  # cache rows per inner iteration
MAX_SPLITS = 16
# Block shapes measured on an H100 (benchmarks/bench_deepseek_gpu.py --kernels, 7 shapes swept):
# at 128 heads, 64 heads per program was fastest from batch 32 on (B=256, ctx 8192: 3.42 ms
# against 5.63 with 16 heads per program); 16 heads (V2-Lite) fill a 16-head program exactly.
# SPLIT_R (a head block's output columns over that many programs) is the tuning's mla_split_r
# (kernels/tuning.py): 1 until measured to win on a GPU.
WIDE = dict(BLOCK_H=64, BLOCK_N=32, num_warps=8, num_stages=2)
NARROW = dict(BLOCK_H=16, BLOCK_N=32, num_warps=4, num_stages=2)


def decode_config(num_heads: int) -> dict:
    """The Triton block shape for a model's head count (tl.dot needs >= 16 rows per program)."""
    return {**WIDE, "SPLIT_R": tuning.active().mla_split_r} if num_heads >= 64 else NARROW


def triton_available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def num_splits(batch: int, num_heads: int, sms: int, max_ctx: int | None = None,
               block_h: int | None = None) -> int:
    """Context splits per sequence so that ~2 programs run per SM; a function of the shapes only
    (max_ctx None: unknown, as inside a CUDA graph), so a captured graph keeps its grid."""
    block_h = block_h or decode_config(num_heads)["BLOCK_H"]
    programs = max(1, batch * -(-num_heads // block_h))
    splits = max(1, min(MAX_SPLITS, -(-2 * sms // programs)))
    if max_ctx is not None:  # no split shorter than two blocks of rows
        splits = max(1, min(splits, -(-max_ctx // (2 * BLOCK_N))))
    return splits


def mla_decode(q: torch.Tensor, pool: torch.Tensor, block_tables: torch.Tensor, ctx_lens: torch.Tensor,
               scale: float, block_size: int, kv_rank: int, splits: int = 1,
               use_triton: bool | None = None, max_ctx: int | None = None, config: dict | None = None) -> torch.Tensor:
    """q: [B, H, R + Dr] latent queries; pool: [N, R + Dr] (c_kv | k_pe per slot); block_tables:
    [B, W] long; ctx_lens: [B] long (0 allowed) -> latent output [B, H, R] in q's dtype.

    config: Triton block shape {BLOCK_H, BLOCK_N, num_warps, num_stages[, SPLIT_R]}; default
    decode_config(H).
    """
    if use_triton is None:
        use_triton = triton_available(q.device)
    if not use_triton:
        return mla_decode_torch(q, pool, block_tables, ctx_lens, scale, block_size, kv_rank, max_ctx)
    return _mla_decode_triton(q, pool, block_tables, ctx_lens, scale, block_size, kv_rank, splits,
                              config or {})


def context_slots(block_tables: torch.Tensor, ctx_lens: torch.Tensor, block_size: int,
                  max_ctx: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, L] slots of positions 0..L-1 (0 past the context), [B, L] bool: position < ctx_len)."""
    lmax = max(1, int(max_ctx if max_ctx is not None else (ctx_lens.max() if ctx_lens.numel() else 1)))
    pos = torch.arange(lmax, device=block_tables.device)  # [L]
    valid = pos[None, :] < ctx_lens[:, None]  # [B, L]
    blk = block_tables[:, (pos // block_size).clamp(max=block_tables.shape[1] - 1)]
    slots = blk * block_size + pos % block_size
    return torch.where(valid, slots, torch.zeros_like(slots)), valid


def mla_decode_torch(q, pool, block_tables, ctx_lens, scale, block_size, kv_rank, max_ctx=None):
    """Reference: gather [B, Lmax] latent rows through the block tables, masked SDPA (MQA: one
    shared latent head). A row with context 0 returns zeros."""
    slots, valid = context_slots(block_tables, ctx_lens, block_size, max_ctx)
    rows = pool[slots].to(q.dtype)[:, None]  # [B, 1, L, R + Dr]
    see = valid.clone()
    see[:, 0] = True  # an empty context attends to slot 0 (finite), then is zeroed
    o = F.scaled_dot_product_attention(q[:, :, None, :], rows, rows[..., :kv_rank],
                                       attn_mask=see[:, None, None, :], scale=scale,
                                       enable_gqa=True)[:, :, 0]  # [B, H, R]
    return torch.where((ctx_lens > 0)[:, None, None], o, torch.zeros_like(o))


def _mla_decode_triton(q, pool, block_tables, ctx_lens, scale, block_size, kv_rank, splits, config):
    b, h, width = q.shape
    rope = width - kv_rank
    config = {**decode_config(h), **config}
    bh = config["BLOCK_H"]
    out = torch.empty(b, h, kv_rank, dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    if q.stride(-1) != 1 or pool.stride(-1) != 1:
        raise ValueError("q and pool need a unit stride along their last dim")
    part = torch.empty(b, h, splits, kv_rank, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
    split_r = config.get("SPLIT_R", 1)
    _mla_decode_kernel[(triton.cdiv(h, bh) * split_r, b, splits)](
        q, pool, block_tables, ctx_lens, part, lse,
        q.stride(0), q.stride(1), pool.stride(0), block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        scale, h,
        BLOCK_SIZE=block_size, R=kv_rank, DR=rope, BLOCK_R=triton.next_power_of_2(kv_rank),
        BLOCK_DR=max(16, triton.next_power_of_2(rope)), BLOCK_H=bh,
        BLOCK_N=config["BLOCK_N"], NUM_SPLITS=splits, SPLIT_R=split_r, num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    _mla_merge_kernel[(b * h,)](
        part, lse, out, h,
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        S=splits, S_PAD=max(2, triton.next_power_of_2(splits)), R=kv_rank,
        BLOCK_R=triton.next_power_of_2(kv_rank), num_warps=4,
    )
    return out


if triton is not None:

    @triton.jit
    def mla_block(q_lat, q_pe, KV, BT_row, t, valid, see, s_kv, r, rm, e, em, m_i, l_i, acc, scale,
                  BLOCK_SIZE: tl.constexpr, R: tl.constexpr, vo=None, vom=None, SPLIT_R: tl.constexpr = 1):
        """One block of cache rows t [N] (valid: rows that exist; see [M, N] or [1, N]: rows each
        query may attend to) folded into the running (m_i [M], l_i [M], acc [M, BLOCK_R / SPLIT_R])
        of the latent queries q_lat [M, BLOCK_R], q_pe [M, BLOCK_DR]; SPLIT_R > 1: acc holds only the
        value columns vo (mask vom) of this program. Shared with mla_prefill.py."""
        blk = tl.load(BT_row + t // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row = KV + (blk * BLOCK_SIZE + t % BLOCK_SIZE)[:, None] * s_kv
        c_kv = tl.load(row + r[None, :], mask=valid[:, None] & rm[None, :], other=0.0)  # [N, BLOCK_R]
        k_pe = tl.load(row + R + e[None, :], mask=valid[:, None] & em[None, :], other=0.0)  # [N, BLOCK_DR]
        qk = tl.dot(q_lat, tl.trans(c_kv)) + tl.dot(q_pe, tl.trans(k_pe))  # [M, N] fp32
        qk = tl.where(see, qk * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if SPLIT_R == 1:
            v = c_kv
        else:  # this program's value columns (the rows are in L1/L2 from the load above)
            v = tl.load(row + vo[None, :], mask=valid[:, None] & vom[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(c_kv.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _mla_decode_kernel(Q, KV, BT, CL, O, LSE,
                           s_qb, s_qh, s_kv, s_bt, s_ob, s_oh, s_os, s_lb, s_lh,
                           scale, H,
                           BLOCK_SIZE: tl.constexpr, R: tl.constexpr, DR: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_H: tl.constexpr,
                           BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLIT_R: tl.constexpr):
        hb = tl.program_id(0) // SPLIT_R
        rs = tl.program_id(0) % SPLIT_R  # which 1/SPLIT_R of the output columns this program sums
        b = tl.program_id(1).to(tl.int64)
        sp = tl.program_id(2)
        ctx = tl.load(CL + b).to(tl.int32)
        per = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = sp * per
        hi = tl.minimum(lo + per, ctx)
        h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        hm = h < H
        r = tl.arange(0, BLOCK_R)
        rm = r < R
        e = tl.arange(0, BLOCK_DR)
        em = e < DR
        q_row = Q + b * s_qb + h[:, None] * s_qh
        q_lat = tl.load(q_row + r[None, :], mask=hm[:, None] & rm[None, :], other=0.0)  # [BLOCK_H, BLOCK_R]
        q_pe = tl.load(q_row + R + e[None, :], mask=hm[:, None] & em[None, :], other=0.0)  # [BLOCK_H, BLOCK_DR]
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        vo = rs * (BLOCK_R // SPLIT_R) + tl.arange(0, BLOCK_R // SPLIT_R)
        vom = vo < R
        acc = tl.zeros([BLOCK_H, BLOCK_R // SPLIT_R], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            valid = t < hi
            m_i, l_i, acc = mla_block(q_lat, q_pe, KV, BT + b * s_bt, t, valid, valid[None, :], s_kv,
                                      r, rm, e, em, m_i, l_i, acc, scale, BLOCK_SIZE, R, vo, vom, SPLIT_R)
        nonempty = l_i > 0
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        lse = tl.where(nonempty, m_i + tl.log(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        o_ptr = O + b * s_ob + h[:, None] * s_oh + sp * s_os + vo[None, :]
        tl.store(o_ptr, out, mask=hm[:, None] & vom[None, :])
        tl.store(LSE + b * s_lb + h * s_lh + sp, lse, mask=hm & (rs == 0))  # the same in every column split

    @triton.jit
    def _mla_merge_kernel(P, L, OUT, H, s_pb, s_ph, s_ps, s_lb, s_lh, s_ob, s_oh,
                          S: tl.constexpr, S_PAD: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr):
        pid = tl.program_id(0)
        b = (pid // H).to(tl.int64)
        h = (pid % H).to(tl.int64)
        s = tl.arange(0, S_PAD)
        r = tl.arange(0, BLOCK_R)
        sm = s < S
        lse = tl.load(L + b * s_lb + h * s_lh + s, mask=sm, other=float("-inf"))
        top = tl.max(lse, axis=0)
        top = tl.where(top == float("-inf"), 0.0, top)  # no key anywhere: every weight 0
        w = tl.where(sm, tl.exp(lse - top), 0.0)
        total = tl.sum(w, axis=0)
        w = w / tl.where(total > 0, total, 1.0)
        pm = sm[:, None] & (r < R)[None, :]
        p = tl.load(P + b * s_pb + h * s_ph + s[:, None] * s_ps + r[None, :], mask=pm, other=0.0)
        p = tl.where(pm & (w[:, None] > 0), p, 0.0)  # an empty split's partial is never read as data
        acc = tl.sum(p * w[:, None], axis=0)
        tl.store(OUT + b * s_ob + h * s_oh + r, acc.to(OUT.dtype.element_ty), mask=r < R)
