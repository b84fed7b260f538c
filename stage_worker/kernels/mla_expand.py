"""MLA prefill in the expanded (MHA) form, for long prefill chunks at many heads.

The absorbed form (mla_prefill.py) attends every query head to the latent rows: 2 * (576 + 512)
FLOPs per (head, key) at V2/V3's widths. The expanded form first up-projects each context row
once, `kv_b_proj(c_kv)` -> per-head K_nope [L, H, Dn] and V [L, H, Dv] (2 * R * H * (Dn + Dv)
FLOPs per context row, one dense GEMM), then runs ordinary multi-head attention: 2 * (Dn + Dr +
Dv) FLOPs per (head, key), 2 * (128 + 64 + 128) at V3's widths, 3.4x fewer. The expansion is
paid per context row and the attention per (query, key) pair, so the expanded form wins for
long chunks (vLLM and SGLang take it for prefill, and the absorbed form for decode). On an H100
at V3's 128 heads the absorbed kernel ran 8 fresh 512-token prompts in 3.99 ms against 1.83 ms
for the expanded form as per-sequence SDPA calls (results/h100_mla_kernels.json).

Here the expanded form serves the chunks of `min_tokens` or more of an eager (not graph-captured)
micro-batch on a GPU, up to a cap on the context rows a step expands (the K/V workspace is
proportional to it); every other row stays on the absorbed kernel. `plan` picks the chunks on
the host, from what the step's metadata knows; `expand_context` gathers and up-projects their
context; `attention` is a flash-attention kernel (Triton) over the packed sequences, causal
with the queries at the end of their context (a chunk may start mid-prompt): a program takes
BLOCK_M queries of one sequence and one head, walks the keys its tile can see, unmasked up to
the first query's position and masked after. K's rope part k_pe [L, Dr] is one row for all
heads (MQA-style), read in place, never broadcast.

`attention_torch` is the reference: a float loop over the sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from stage_worker.kernels.unified_attention import tile_plan

try:  # Triton is optional: CPU-only installs never import it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Context rows one step may expand: max(this, the step's tokens), so the K/V workspace
# (rows * H * (Dn + Dv) activations: 256 MiB at V3's widths and 4,096 rows) stays of the order of
# the step's other activations. A chunk after a longer cached prefix stays absorbed.
MAX_CONTEXT = 4096
MIN_HEADS = 64  # models with fewer heads keep the absorbed form (measured there: V2-Lite's 16)
# The expanded form runs eagerly: a step that the mixed CUDA graphs could take (<= 2,048 tokens)
# leaves them for it only when its expanded chunks hold at least this many tokens. Measured on an
# H100 with the V3 stage (README): one 512-token prompt, 33.7 ms in a graph against 40.7 ms eager
# and expanded; one of 2,048 tokens, 72.6 against 48.6 (its attention is 2.6x faster expanded).
GRAPH_MIN_TOKENS = 1024

# (BLOCK_M, BLOCK_N, num_warps, num_stages): queries and keys per program step.
CONFIG = (64, 64, 4, 2)


@dataclass
class ExpandPlan:
    """The chunks of a micro-batch that take the expanded form, packed in [T] order."""

    rows: torch.Tensor  # [Tp] long: each packed query's row in the micro-batch
    ctx_slots: torch.Tensor  # [Lp] long: the pool slots of each chunk's whole context, packed
    cu_q: torch.Tensor  # [P+1] long: packed query offsets
    cu_k: torch.Tensor  # [P+1] long: packed context offsets
    tile_seq: torch.Tensor  # [G] long: chunk of each BLOCK_M-query tile
    tile_row: torch.Tensor  # [G] long: first packed query of each tile
    all_rows: bool  # every row of the micro-batch is in the plan (rows == arange(T))


def choose(ns: np.ndarray, ctx: np.ndarray, min_tokens: int, max_context: int = MAX_CONTEXT) -> np.ndarray:
    """Indices of the sequences whose chunk takes the expanded form: num_tokens >= min_tokens (the
    tuning's mla_expand_min_tokens, kernels/tuning.py; 0: none),
    taken in order while their contexts add up to at most max(max_context, tokens in the step)
    (a chunk whose context would pass it is skipped, the later ones still considered)."""
    picked: list[int] = []
    if min_tokens > 0:
        room = max(max_context, int(ns.sum()))
        for i in np.nonzero(ns >= min_tokens)[0]:
            if ctx[i] <= room:
                picked.append(int(i))
                room -= int(ctx[i])
    return np.array(picked, dtype=np.int64)


def plan_arrays(chosen: np.ndarray, qsl: np.ndarray, ctx: np.ndarray, tables: np.ndarray,
                block_size: int) -> list[np.ndarray]:
    """Host arrays of the plan for `chosen` (see ExpandPlan, in its field order, less all_rows)."""
    ns = qsl[1:][chosen] - qsl[:-1][chosen]
    lens = ctx[chosen]
    cu_q = np.concatenate([[0], np.cumsum(ns)]).astype(np.int64)
    cu_k = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    rows = np.repeat(qsl[:-1][chosen] - cu_q[:-1], ns) + np.arange(int(cu_q[-1]))
    seq = np.repeat(np.arange(len(chosen)), lens)
    pos = np.arange(int(cu_k[-1])) - cu_k[:-1][seq]
    slots = tables[chosen[seq], pos // block_size] * block_size + pos % block_size
    tile_seq, tile_row = tile_plan(cu_q, CONFIG[0])
    return [rows.astype(np.int64), slots.astype(np.int64), cu_q, cu_k, tile_seq, tile_row]


def expand_context(pool: torch.Tensor, ctx_slots: torch.Tensor, w_kv_b: torch.Tensor, heads: int, kv_rank: int,
                   nope_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed contexts' latent rows gathered and up-projected: pool [N, R + Dr]; w_kv_b
    [H * (Dn + Dv), R] (kv_b_proj's weight) -> k_nope [L, H, Dn] and v [L, H, Dv] (views of one
    GEMM's output, in w_kv_b's dtype) and k_pe [L, Dr] (the gathered rows' rope part)."""
    rows = pool[ctx_slots]  # [L, R + Dr]
    kv = F.linear(rows[:, :kv_rank].to(w_kv_b.dtype), w_kv_b).view(rows.shape[0], heads, -1)  # [L, H, Dn + Dv]
    return kv[..., :nope_dim], rows[:, kv_rank:], kv[..., nope_dim:]


def attention(q_nope, q_pe, k_nope, k_pe, v, cu_q, cu_k, tile_seq, tile_row, scale: float,
              use_triton: bool | None = None, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Causal attention of packed chunks over their packed contexts, each chunk's queries the
    last positions of its context.

    q_nope [Tp, H, Dn], q_pe [Tp, H, Dr]; k_nope [Lp, H, Dn], k_pe [Lp, Dr] (one for all heads),
    v [Lp, H, Dv] (any strides with a unit last one); cu_q, cu_k [P+1]; tile_seq, tile_row [G]
    (tile_plan over cu_q with BLOCK_M queries a tile) -> [Tp, H, Dv] in q_nope's dtype.
    """
    if use_triton is None:
        use_triton = triton is not None and q_nope.is_cuda
    if not use_triton:
        return attention_torch(q_nope, q_pe, k_nope, k_pe, v, cu_q, cu_k, scale)
    bm, bn, warps, stages = config or CONFIG
    tp, h, dn = q_nope.shape
    dr, dv = q_pe.shape[2], v.shape[2]
    out = torch.empty(tp, h, dv, dtype=q_nope.dtype, device=q_nope.device)
    if tp == 0 or tile_seq.shape[0] == 0:
        return out
    for name, x in (("q_nope", q_nope), ("q_pe", q_pe), ("k_nope", k_nope), ("k_pe", k_pe), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit stride along its last dim")
    _expand_attention_kernel[(tile_seq.shape[0], h)](
        q_nope, q_pe, k_nope, k_pe, v, out, cu_q, cu_k, tile_seq, tile_row,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), k_nope.stride(0), k_nope.stride(1),
        k_pe.stride(0), v.stride(0), v.stride(1), out.stride(0), out.stride(1), scale * LOG2E,
        DN=dn, DR=dr, DV=dv, BLOCK_DN=_pow2(dn), BLOCK_DR=_pow2(dr), BLOCK_DV=_pow2(dv),
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )
    return out


LOG2E = 1.4426950408889634


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())  # tl.dot needs >= 16 along each dim


def attention_torch(q_nope, q_pe, k_nope, k_pe, v, cu_q, cu_k, scale: float) -> torch.Tensor:
    """Reference: one SDPA per chunk, K = [k_nope | k_pe for every head], causal at the context's end."""
    tp, h, _ = q_nope.shape
    out = torch.zeros(tp, h, v.shape[2], dtype=q_nope.dtype, device=q_nope.device)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for a, b, c, d in zip(cq[:-1], cq[1:], ck[:-1], ck[1:]):
        if b == a:
            continue
        q = torch.cat([q_nope[a:b], q_pe[a:b].to(q_nope.dtype)], dim=-1).transpose(0, 1)  # [H, n, Dn + Dr]
        k = torch.cat([k_nope[c:d], k_pe[c:d, None, :].to(k_nope.dtype).expand(-1, h, -1)], dim=-1)
        qpos = torch.arange(d - c - (b - a), d - c, device=q.device)
        see = torch.arange(d - c, device=q.device)[None, :] <= qpos[:, None]  # [n, L]
        o = F.scaled_dot_product_attention(q, k.transpose(0, 1).to(q.dtype), v[c:d].transpose(0, 1).to(q.dtype),
                                           attn_mask=see, scale=scale)  # [H, n, Dv]
        out[a:b] = o.transpose(0, 1)
    return out


if triton is not None:

    @triton.jit
    def _fold(qn, qp, KN, KP, V, key, kmask, see, s_kn, s_kp, s_v, dn, dnm, dr, drm, dv, dvm,
              m_i, l_i, acc, scale_log2, MASKED: tl.constexpr):
        """Keys `key` [N] (kmask: those that exist) folded into the running (m_i [M], l_i [M],
        acc [M, BLOCK_DV]) of the tile's queries qn [M, BLOCK_DN], qp [M, BLOCK_DR]; MASKED:
        only where see [M, N] (else every key is visible to every query of the tile)."""
        kn = tl.load(KN + key[:, None] * s_kn + dn[None, :], mask=kmask[:, None] & dnm[None, :], other=0.0)
        kp = tl.load(KP + key[:, None] * s_kp + dr[None, :], mask=kmask[:, None] & drm[None, :], other=0.0)
        s = (tl.dot(qn, tl.trans(kn)) + tl.dot(qp, tl.trans(kp.to(qp.dtype)))) * scale_log2  # [M, N] fp32
        if MASKED:
            s = tl.where(see, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vv = tl.load(V + key[:, None] * s_v + dv[None, :], mask=kmask[:, None] & dvm[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
        return m_new, l_i, acc

    @triton.jit
    def _expand_attention_kernel(QN, QP, KN, KP, V, O, CUQ, CUK, TS, TR,
                                 s_qn, s_qnh, s_qp, s_qph, s_kn, s_knh, s_kp, s_v, s_vh, s_o, s_oh, scale_log2,
                                 DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, BLOCK_DN: tl.constexpr,
                                 BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr):
        tile = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        seq = tl.load(TS + tile)
        if seq < 0:
            return
        row0 = tl.load(TR + tile)
        q_lo = tl.load(CUQ + seq)
        q_hi = tl.load(CUQ + seq + 1)
        k_lo = tl.load(CUK + seq)
        first = tl.load(CUK + seq + 1) - k_lo - (q_hi - q_lo)  # context position of the chunk's first query
        rows = row0 + tl.arange(0, BLOCK_M)
        valid = rows < q_hi
        qpos = first + tl.where(valid, rows, row0) - q_lo  # padding rows: the tile's first query
        dn = tl.arange(0, BLOCK_DN)
        dnm = dn < DN
        dr = tl.arange(0, BLOCK_DR)
        drm = dr < DR
        dv = tl.arange(0, BLOCK_DV)
        dvm = dv < DV
        qrow = rows.to(tl.int64)[:, None]
        qn = tl.load(QN + qrow * s_qn + h * s_qnh + dn[None, :], mask=valid[:, None] & dnm[None, :], other=0.0)
        qp = tl.load(QP + qrow * s_qp + h * s_qph + dr[None, :], mask=valid[:, None] & drm[None, :], other=0.0)
        KN_h = KN + h * s_knh
        V_h = V + h * s_vh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        full = (first + row0 - q_lo + 1) // BLOCK_N * BLOCK_N  # keys below it: seen by every query
        kv_hi = first + tl.minimum(row0 + BLOCK_M, q_hi) - q_lo  # keys seen by the tile's last query
        for start in range(0, full, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            m_i, l_i, acc = _fold(qn, qp, KN_h, KP, V_h, k_lo + t, t < kv_hi, None, s_kn, s_kp, s_v,
                                  dn, dnm, dr, drm, dv, dvm, m_i, l_i, acc, scale_log2, MASKED=False)
        for start in range(full, kv_hi, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            see = t[None, :] <= qpos[:, None]
            m_i, l_i, acc = _fold(qn, qp, KN_h, KP, V_h, k_lo + t, t < kv_hi, see, s_kn, s_kp, s_v,
                                  dn, dnm, dr, drm, dv, dvm, m_i, l_i, acc, scale_log2, MASKED=True)
        out = acc / l_i[:, None]
        tl.store(O + qrow * s_o + h * s_oh + dv[None, :], out.to(O.dtype.element_ty),
                 mask=valid[:, None] & dvm[None, :])
