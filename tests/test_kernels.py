"""Every Triton kernel in stage_worker/kernels/ against its torch reference, on the CPU through
Triton's interpreter (TRITON_INTERPRET=1), float32, small shapes (the interpreter runs each
program in numpy: seconds, not minutes).

Triton reads TRITON_INTERPRET once, when it is imported (its own library functions, tl.sum
included, are decorated then), and other test modules of a pytest run import it first. So in a
run without the variable this file is one test, which checks the outcomes of the kernel tests below
in the session's interpreter children (TRITON_INTERPRET=1, tests/interpreted.py: one run for every
such file, whose kernel launches tests/test_triton_compile.py also compiles); any failure fails it.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from stage_worker.kv_cache import FP8_KV, FP8_KV_MAX, read_slots
from tests.interpreted import INTERPRETED, run_in_interpreter


if not INTERPRETED:
    def test_kernels_in_an_interpreter_process():
        run_in_interpreter(__file__)


@pytest.fixture(scope="module")
def k():
    import triton  # noqa: F401 - in the test extra; imported here so a plain run needs it only above

    return {name: importlib.import_module(f"stage_worker.kernels.{name}")
            for name in ("fused_ops", "paged_decode", "unified_attention")}


if INTERPRETED:  # the kernel tests: collected only in the interpreter process (above)
    def _pool(gen, blocks: int, bs: int, hkv: int, d: int, dtype=torch.float32):
        """Random k and v pools; FP8 ones (--kv-cache-dtype fp8) hold e4m3 values, which the kernels
        upcast on load and the torch references through kv_cache.read_slots."""
        kc = torch.randn(blocks * bs, hkv, d, generator=gen)
        return kc.to(dtype), torch.randn(blocks * bs, hkv, d, generator=gen).to(dtype)

    def test_rms_norm_and_fused_add(k):
        fo, gen = k["fused_ops"], torch.Generator().manual_seed(0)
        x, r, w = torch.randn(5, 48, generator=gen), torch.randn(5, 48, generator=gen), torch.randn(48, generator=gen)
        torch.testing.assert_close(fo.rms_norm(x, w, 1e-6, use_triton=True), fo.rms_norm_torch(x, w, 1e-6))
        got = fo.fused_add_rms_norm(x, r, w, 1e-6, use_triton=True)
        for a, b in zip(got, fo.fused_add_rms_norm_torch(x, r, w, 1e-6)):
            torch.testing.assert_close(a, b)


    def test_silu_and_mul(k):
        fo, gen = k["fused_ops"], torch.Generator().manual_seed(1)
        gu = torch.randn(4, 2 * 40, generator=gen)
        torch.testing.assert_close(fo.silu_and_mul(gu, use_triton=True), fo.silu_and_mul_torch(gu))
        gu[0, :4] = torch.tensor([-30.0, 30.0, 0.0, -1e-4])  # tanh's tails and its cancellation near 0
        torch.testing.assert_close(fo.gelu_tanh_and_mul(gu, use_triton=True), fo.gelu_tanh_and_mul_torch(gu))


    @pytest.mark.parametrize("pool", [torch.float32, FP8_KV])
    def test_rotary_and_cache(k, pool):
        """An FP8 pool gets the values rounded to e4m3 and saturated at +-448 (values to ~800 here),
        byte for byte as kv_cache.write_slots."""
        fo, gen = k["fused_ops"], torch.Generator().manual_seed(2)
        t, n_q, n_kv, d = 3, 4, 2, 16
        qkv = torch.randn(t, n_q + 2 * n_kv, d, generator=gen) * (200 if pool == FP8_KV else 1)
        ang = torch.randn(t, d // 2, generator=gen)
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        slots = torch.tensor([5, 0, 9])
        caches = [torch.full((12, n_kv, d), float("nan")).to(pool) for _ in range(4)]
        q = fo.rotary_and_cache(qkv, cos, sin, n_q, n_kv, caches[0], caches[1], slots, use_triton=True)
        q_ref = fo.rotary_and_cache_torch(qkv, cos, sin, n_q, n_kv, caches[2], caches[3], slots)
        torch.testing.assert_close(q, q_ref)
        if pool == FP8_KV:  # the rest untouched (NaN), the written slots rounded and saturated as torch does
            for got, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
                untouched = torch.ones(12, dtype=torch.bool).index_fill_(0, slots, False)
                assert read_slots(got, untouched.nonzero()[:, 0], torch.float32).isnan().all()
                a, b = read_slots(got, slots, torch.float32), read_slots(ref, slots, torch.float32)
                # The interpreter's in-kernel e4m3 cast drops the carry when rounding up reaches the next
                # power of two (it gives half of it); elsewhere it equals torch's round-to-nearest.
                off = a != b
                assert off.float().mean() < 0.05 and torch.equal(a[off] * 2, b[off])
                assert b.abs().max() == FP8_KV_MAX and not a.isnan().any()
        else:
            for got, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
                torch.testing.assert_close(got, ref, equal_nan=True)  # written slots equal, the rest untouched


    def test_combine_splits(k):
        fo, gen = k["fused_ops"], torch.Generator().manual_seed(3)
        part, lse = torch.randn(2, 3, 4, 16, generator=gen), torch.randn(2, 3, 4, generator=gen)
        lse[0, 1, 2] = float("-inf")  # an empty split weighs nothing
        torch.testing.assert_close(fo.combine_splits(part, lse, torch.float32, use_triton=True),
                                   fo.combine_splits_torch(part, lse, torch.float32))


    # Sliding windows (5: starts mid-block; 66: one split of the 70-token context left empty) and
    # Gemma 2's logit soft cap (scores here reach ~2-3, so a cap of 2 changes them).
    WINDOW_CAP = [(None, None), (5, None), (None, 2.0), (66, 2.0)]

    @pytest.mark.parametrize("window,softcap,pool", [(w, c, torch.float32) for w, c in WINDOW_CAP]
                             + [(5, None, FP8_KV)])
    @pytest.mark.parametrize("splits", [1, 3])
    def test_paged_decode(k, splits, window, softcap, pool):
        """GQA group of 2, contexts inside one block, across blocks, and shorter than the splits."""
        pd, gen = k["paged_decode"], torch.Generator().manual_seed(4)
        bs, hq, hkv, d = 4, 4, 2, 16
        kc, vc = _pool(gen, 24, bs, hkv, d, pool)
        ctx = torch.tensor([3, 70, 9])
        tables = torch.stack([torch.randperm(24, generator=gen)[:18] for _ in range(3)])
        q = torch.randn(3, hq, d, generator=gen)
        extra = dict(window=window, softcap=softcap)
        got = pd.paged_decode(q, kc, vc, tables, ctx, 0.25, bs, num_splits=splits, use_triton=True, **extra)
        ref = pd.paged_decode_torch(q, kc, vc, tables, ctx, 0.25, bs, **extra)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        if window or softcap:  # the options change the answer (the test would catch them ignored)
            assert not torch.allclose(ref, pd.paged_decode_torch(q, kc, vc, tables, ctx, 0.25, bs), atol=1e-3)
        if splits == 3 and not window:  # other tiles (keys per iteration, warps, stages): the same answer
            for tile in ((32, 4, 3), (128, 4, 2)):
                got = pd.paged_decode(q, kc, vc, tables, ctx, 0.25, bs, num_splits=splits, use_triton=True,
                                      config=tile, **extra)
                torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


    @pytest.mark.parametrize("window,softcap,pool", [(w, c, torch.float32) for w, c in WINDOW_CAP]
                             + [(None, None, FP8_KV)])
    def test_unified_attention(k, window, softcap, pool):
        """A prefill chunk from 0, one starting mid-context (longer than BLOCK_N keys), decode rows,
        and padding tiles (tile_seq -1) that must leave nothing written."""
        ua, gen = k["unified_attention"], torch.Generator().manual_seed(5)
        bs, hq, hkv, d = 4, 4, 2, 16
        kc, vc = _pool(gen, 40, bs, hkv, d, pool)
        chunks = [(0, 6), (68, 3), (10, 1), (0, 1)]  # (start, new tokens) per sequence
        ns = np.array([n for _, n in chunks])
        qsl = np.concatenate([[0], np.cumsum(ns)]).astype(np.int64)
        seq_lens = torch.tensor([s + n for s, n in chunks])
        tables = torch.stack([torch.randperm(40, generator=gen)[:18] for _ in chunks])
        bq = ua.block_q(hq, hkv)
        tile_seq, tile_row = ua.tile_plan(qsl, bq, size=ua.max_tiles(int(qsl[-1]), len(chunks), bq) + 2)
        q = torch.randn(int(qsl[-1]), hq, d, generator=gen)
        args = (tables, seq_lens, torch.from_numpy(qsl), torch.from_numpy(tile_seq), torch.from_numpy(tile_row),
                0.3, bs)
        extra = dict(window=window, softcap=softcap)
        got = ua.unified_attention(q, kc, vc, *args, use_triton=True, **extra)
        ref = ua.unified_attention(q, kc, vc, *args, use_triton=False, **extra)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        if window or softcap:
            assert not torch.allclose(ref, ua.unified_attention(q, kc, vc, *args, use_triton=False), atol=1e-3)
