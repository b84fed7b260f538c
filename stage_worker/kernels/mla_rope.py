"""MLA's small ops before attention in one kernel: the latent pool write and the latent query.

For T new tokens, from the q projection q [T, Hq, Dn + Dr] and the kv_a projection
kv [T, R + Dr] (c_kv | k_pe), `latent_query_and_cache` does what models/deepseek.py's
MLAttention did with ~25 launches (split, two rotaries, the kv_a RMSNorm, two cats, the pool's
index_copy_, the einsum's transposes and bmm, the cast):

- pool[slot_mapping[t]] = [rms_norm(c_kv) | rope(k_pe)]        the latent row, in the pool's dtype
- q_cat[t, h] = [q_nope[t, h] @ W_UK[h] | rope(q_pe[t, h])]    the latent query, in the pool's dtype

On the Triton path that is one torch.bmm writing q_nope @ W_UK straight into q_cat[:, :, :R] and
one Triton kernel for the rest (a program per token for the latent row, and programs of HEADS
query heads for q_pe's rotary). `latent_query_and_cache_torch` is the formula the model had before
the kernel, run on CPU (or without Triton): the CPU path computes what it always did.

Rotary as `apply_rope` (below): interleave pairs (x0, x1), (x2, x3), ... (DeepSeek's released
weights) or halves; the output de-interleaved, [x1 c - x2 s | x2 c + x1 s], each product and the
sum rounded to the activation dtype as torch's separate kernels round them. RMSNorm as
kernels/fused_ops.py's (sum of squares in fp32, the only difference from torch being its
summation order). Slots may repeat (CUDA-graph padding rows share the pool's scratch block, whose
content is then a mix of those rows). Shape-static and free of host syncs: graph-capturable.
"""

from __future__ import annotations

import torch

from stage_worker.kernels.fused_ops import rms_norm_torch

try:  # Triton is optional: CPU-only installs never import it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

ROPE_ELEMS = 2048  # q_pe elements (heads * Dr) one program rotates


def latent_query_and_cache(q: torch.Tensor, kv: torch.Tensor, w_uk: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, norm_weight: torch.Tensor, eps: float, pool: torch.Tensor,
                           slot_mapping: torch.Tensor, interleave: bool,
                           use_triton: bool | None = None, absorb: bool = True) -> torch.Tensor:
    """Write the new tokens' latents into the pool; return their latent queries.

    q: [T, Hq, Dn + Dr] and kv: [T, R + Dr] in the activation dtype (unit stride along the last
    dim); w_uk: [Hq, Dn, R] (a view of kv_b_proj's weight); cos, sin: [T, Dr/2] in the activation
    dtype; norm_weight: [R] (kv_a_layernorm); pool: [N, R + Dr]; slot_mapping: [T] long, every
    slot in [0, N). Returns q_cat [T, Hq, R + Dr] in the pool's dtype. Mutates pool.
    absorb=False (the Triton path): q_cat's latent part is left unwritten, for a caller that
    reads only the rotated rope part (kernels/mla_expand.py).
    """
    r, dr = w_uk.shape[2], kv.shape[1] - w_uk.shape[2]
    if dr % 2 or q.shape[2] != w_uk.shape[1] + dr:
        raise ValueError(f"q {tuple(q.shape)}, kv {tuple(kv.shape)} and w_uk {tuple(w_uk.shape)} "
                         f"do not make an even rope width")
    if not ((triton is not None and q.is_cuda) if use_triton is None else use_triton):
        return latent_query_and_cache_torch(q, kv, w_uk, cos, sin, norm_weight, eps, pool, slot_mapping, interleave)
    if q.stride(2) != 1 or kv.stride(1) != 1 or pool.stride(1) != 1:
        raise ValueError("q, kv and pool need a unit stride along their last dim")
    t, hq, dn = q.shape[0], q.shape[1], w_uk.shape[1]
    q_cat = torch.empty(t, hq, r + dr, dtype=pool.dtype, device=q.device)
    if t == 0:
        return q_cat
    q_nope = q[:, :, :dn].transpose(0, 1)  # [Hq, T, Dn]
    q_lat = q_cat[:, :, :r].transpose(0, 1)  # [Hq, T, R], a view: cuBLAS writes q_cat's rows in place
    if absorb and q.dtype == pool.dtype:
        torch.bmm(q_nope, w_uk, out=q_lat)
    elif absorb:
        q_lat.copy_(torch.bmm(q_nope, w_uk))
    cos, sin = cos.contiguous(), sin.contiguous()
    half = dr // 2
    half_pad = triton.next_power_of_2(half)
    heads = min(triton.next_power_of_2(hq), max(1, ROPE_ELEMS // (2 * half_pad)))
    _latent_rope_kernel[(t, 1 + triton.cdiv(hq, heads))](
        q[:, :, dn:], kv, cos, sin, norm_weight.contiguous(), pool, slot_mapping, q_cat,
        q.stride(0), q.stride(1), kv.stride(0), cos.stride(0), sin.stride(0), pool.stride(0),
        q_cat.stride(0), q_cat.stride(1), hq, float(eps),
        R=r, R_PAD=triton.next_power_of_2(r), HALF=half, HALF_PAD=half_pad, HEADS=heads,
        INTERLEAVE=interleave, num_warps=4, enable_fp_fusion=False,
    )
    return q_cat


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x: [T, Hx, Dr]; cos, sin: [T, Dr/2] -> rotated x [T, Hx, Dr].

    interleave: pairs (x0, x1), (x2, x3) share a frequency (DeepSeek's layout); the output is
    de-interleaved ([evens | odds]) as transformers does. The layout only has to be the same for
    q and k, since attention uses q_pe . k_pe.
    """
    c, s = cos[:, None, :], sin[:, None, :]
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def latent_query_and_cache_torch(q, kv, w_uk, cos, sin, norm_weight, eps, pool, slot_mapping, interleave):
    """Reference: MLAttention.forward's formula before the kernel (split, rotaries, kv_a_layernorm,
    the pool's index_copy_, the absorbed einsum, cat and cast)."""
    dn, r = w_uk.shape[1], w_uk.shape[2]
    q_nope, q_pe = q.split([dn, q.shape[2] - dn], dim=-1)
    c_kv, k_pe = kv.split([r, kv.shape[1] - r], dim=-1)
    q_pe = apply_rope(q_pe, cos, sin, interleave)  # [T, Hq, Dr]
    k_pe = apply_rope(k_pe[:, None, :], cos, sin, interleave)[:, 0]  # [T, Dr]
    latent = torch.cat([rms_norm_torch(c_kv, norm_weight, eps), k_pe], dim=-1)  # [T, R + Dr]
    pool.index_copy_(0, slot_mapping, latent.to(pool.dtype))
    q_lat = torch.einsum("thn,hnr->thr", q_nope, w_uk)  # [T, Hq, R]
    return torch.cat([q_lat, q_pe], dim=-1).to(pool.dtype)  # [T, Hq, R + Dr]


if triton is not None:

    @triton.jit
    def _rope(x1, x2, c, s, dt: tl.constexpr):
        """(x1 c - x2 s, x2 c + x1 s) in dt, each product and the sum rounded as torch's kernels."""
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        o1 = ((f1 * c).to(dt).to(tl.float32) - (f2 * s).to(dt).to(tl.float32)).to(dt)
        o2 = ((f2 * c).to(dt).to(tl.float32) + (f1 * s).to(dt).to(tl.float32)).to(dt)
        return o1, o2

    @triton.jit
    def _latent_rope_kernel(QPE, KV, COS, SIN, W, POOL, SLOT, QC,
                            s_qt, s_qh, s_kv, s_c, s_s, s_p, s_ct, s_ch, HQ, eps,
                            R: tl.constexpr, R_PAD: tl.constexpr, HALF: tl.constexpr,
                            HALF_PAD: tl.constexpr, HEADS: tl.constexpr, INTERLEAVE: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)  # 0: token t's latent row; b > 0: query heads [(b-1) HEADS, b HEADS)
        j = tl.arange(0, HALF_PAD)
        jm = j < HALF
        if INTERLEAVE:  # the columns of each pair's first and second element
            i1, i2 = 2 * j, 2 * j + 1
        else:
            i1, i2 = j, j + HALF
        c = tl.load(COS + t * s_c + j, mask=jm, other=0.0).to(tl.float32)
        s = tl.load(SIN + t * s_s + j, mask=jm, other=0.0).to(tl.float32)
        dt = KV.dtype.element_ty
        pdt = POOL.dtype.element_ty
        if blk == 0:
            row = POOL + tl.load(SLOT + t).to(tl.int64) * s_p
            cols = tl.arange(0, R_PAD)
            cm = cols < R
            x = tl.load(KV + t * s_kv + cols, mask=cm, other=0.0).to(tl.float32)
            ms = tl.math.div_rn(tl.sum(x * x, axis=0), R * 1.0)
            inv = tl.math.div_rn(1.0, tl.sqrt_rn(ms + eps))
            y = (x * inv).to(dt).to(tl.float32)  # .to(dtype) before the weight
            w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
            tl.store(row + cols, (w * y).to(dt).to(pdt), mask=cm)
            k1 = tl.load(KV + t * s_kv + R + i1, mask=jm, other=0.0)
            k2 = tl.load(KV + t * s_kv + R + i2, mask=jm, other=0.0)
            o1, o2 = _rope(k1, k2, c, s, dt)
            tl.store(row + R + j, o1.to(pdt), mask=jm)
            tl.store(row + R + HALF + j, o2.to(pdt), mask=jm)
        else:
            h = (blk - 1) * HEADS + tl.arange(0, HEADS)
            m = (h < HQ)[:, None] & jm[None, :]
            src = QPE + t * s_qt + h[:, None] * s_qh
            x1 = tl.load(src + i1[None, :], mask=m, other=0.0)
            x2 = tl.load(src + i2[None, :], mask=m, other=0.0)
            q1, q2 = _rope(x1, x2, c[None, :], s[None, :], dt)  # not o1, o2: a name set in both branches
            dst = QC + t * s_ct + h[:, None] * s_ch + R + j[None, :]  # must keep one type (the compiler)
            tl.store(dst, q1.to(pdt), mask=m)
            tl.store(dst + HALF, q2.to(pdt), mask=m)
