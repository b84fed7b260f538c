"""kernels/mla_rope.py: the latent query and the latent pool write of MLA, against its torch
reference (MLAttention's formula before the kernel) and an explicit float64 formula.

The reference is checked on CPU against complex-number rotary and an explicit RMSNorm; the Triton
path runs in Triton's CPU interpreter, in a fresh process (Triton reads TRITON_INTERPRET once, at
import), with both rope layouts, fp32 and bf16, a latent rank that is not a power of two, several
blocks of query heads (the last one masked) and a pool in another dtype than the activations.
The interpreter rounds float32 to bfloat16 by truncation, so bf16 results are compared within a
few ulp here; benchmarks/gpu/mla_graphs.py checks the kernel's bits against the reference on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from stage_worker.kernels import mla_rope as mr
from tests.interpreted import INTERPRETED, run_in_interpreter


def _inputs(t, hq, dn, r, dr, dtype, pool_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(t, hq, dn + dr, generator=gen).to(dtype)
    kv = torch.randn(t, r + dr, generator=gen).to(dtype) * 3
    w_uk = (torch.randn(hq, dn, r, generator=gen) * 0.2).to(dtype)
    freqs = torch.arange(t, dtype=torch.float32)[:, None] * (0.7 ** torch.arange(dr // 2, dtype=torch.float32))
    cos, sin = (freqs.cos() * 1.1).to(dtype), (freqs.sin() * 1.1).to(dtype)
    weight = (1 + 0.3 * torch.randn(r, generator=gen)).to(dtype)
    pool = torch.randn(4 * t + 3, r + dr, generator=gen).to(pool_dtype)
    slots = torch.randperm(pool.shape[0], generator=gen)[:t]
    return q, kv, w_uk, cos, sin, weight, pool, slots


@pytest.mark.parametrize("interleave", [True, False])
def test_reference_equals_explicit_formula(interleave):
    """Rotary as a complex product of each pair (interleaved: (x0, x1), ...; else (x_j, x_j+Dr/2)),
    output [real parts | imaginary parts]; RMSNorm and W_UK spelled out in float64."""
    t, hq, dn, r, dr, eps = 3, 2, 5, 12, 8, 1e-6
    q, kv, w_uk, cos, sin, weight, pool, slots = _inputs(t, hq, dn, r, dr, torch.float32, torch.float32)
    before = pool.clone()
    q_cat = mr.latent_query_and_cache(q, kv, w_uk, cos, sin, weight, eps, pool, slots, interleave, use_triton=False)

    def rope(x):  # x: [T, Hx, Dr] float64
        pairs = (x[..., 0::2], x[..., 1::2]) if interleave else (x[..., : dr // 2], x[..., dr // 2:])
        z = torch.complex(*pairs) * torch.complex(cos.double(), sin.double())[:, None, :]
        return torch.cat([z.real, z.imag], dim=-1)

    q64, kv64 = q.double(), kv.double()
    c_kv = kv64[:, :r]
    normed = c_kv / torch.sqrt((c_kv ** 2).mean(-1, keepdim=True) + eps) * weight.double()
    latent = torch.cat([normed, rope(kv64[:, None, r:])[:, 0]], dim=-1)
    q_lat = torch.einsum("thn,hnr->thr", q64[..., :dn], w_uk.double())
    torch.testing.assert_close(q_cat.double(), torch.cat([q_lat, rope(q64[..., dn:])], dim=-1), atol=1e-5, rtol=1e-5)
    before[slots] = latent.float()
    torch.testing.assert_close(pool, before, atol=1e-5, rtol=1e-5)


if not INTERPRETED:
    def test_kernel_in_an_interpreter_process():
        run_in_interpreter(__file__, "triton")


if INTERPRETED:
    @pytest.mark.parametrize("dtype,pool_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32)])
    @pytest.mark.parametrize("interleave", [True, False])
    @pytest.mark.parametrize("r,dr", [(48, 16), (64, 32)])
    def test_triton_latent_query_and_cache(monkeypatch, dtype, pool_dtype, interleave, r, dr):
        monkeypatch.setattr(mr, "ROPE_ELEMS", 2 * dr)  # 2 query heads a program: 5 heads in 3 blocks
        args = _inputs(4, 5, 8, r, dr, dtype, pool_dtype, seed=r + dr)
        pool = args[6]
        ref_pool = pool.clone()
        got = mr.latent_query_and_cache(*args[:6], 1e-6, pool, args[7], interleave, use_triton=True)
        ref = mr.latent_query_and_cache(*args[:6], 1e-6, ref_pool, args[7], interleave, use_triton=False)
        assert got.dtype == ref.dtype == pool_dtype
        if dtype == torch.float32:  # rotary rounds as torch does; the norm's sum and the bmm may not
            assert torch.equal(got[..., r:], ref[..., r:]) and torch.equal(pool[:, r:], ref_pool[:, r:])
            tol = {}
        else:  # the interpreter truncates float32 to bfloat16 (the GPU rounds to nearest): a few ulp
            tol = dict(atol=0.05, rtol=0.02)
        torch.testing.assert_close(got, ref, **tol)
        torch.testing.assert_close(pool, ref_pool, **tol)

    def test_triton_without_absorption():
        """absorb=False (the expanded form's rows): the same pool rows and rope part of q_cat."""
        args = _inputs(4, 5, 8, 48, 16, torch.float32, torch.float32, seed=3)
        pool, ref_pool = args[6], args[6].clone()
        got = mr.latent_query_and_cache(*args[:6], 1e-6, pool, args[7], True, use_triton=True, absorb=False)
        ref = mr.latent_query_and_cache(*args[:6], 1e-6, ref_pool, args[7], True, use_triton=True)
        assert torch.equal(got[..., 48:], ref[..., 48:]) and torch.equal(pool, ref_pool)

    def test_triton_no_tokens():
        args = _inputs(0, 3, 4, 16, 8, torch.float32, torch.float32)
        pool = args[6].clone()
        got = mr.latent_query_and_cache(*args[:6], 1e-6, args[6], args[7], True, use_triton=True)
        assert got.shape == (0, 3, 24) and torch.equal(args[6], pool)
