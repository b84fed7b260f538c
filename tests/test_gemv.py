"""The FP8 decode GEMV (stage_worker/kernels/fp8.py `w8a16_gemv`: one to four rows, x as it is,
the e4m3 weight dequantized in registers) against its torch reference in Triton's CPU interpreter
(a subprocess with TRITON_INTERPRET=1, as tests/test_kernels.py): ragged N and K, both scale forms
and summation orders, split-K and its last-arrival sum."""

from __future__ import annotations

import pytest
import torch

from tests.interpreted import INTERPRETED, run_in_interpreter


if not INTERPRETED:
    def test_gemv_kernels_in_an_interpreter_process():
        run_in_interpreter(__file__)


if INTERPRETED:  # collected only in the interpreter process (above)
    from stage_worker.kernels import fp8 as k

    @pytest.mark.parametrize("m,n,kdim,group_n", [(1, 200, 300, 128), (3, 130, 1100, 128), (4, 64, 96, 32),
                                                  (2, 96, 256, 128), (1, 72, 1100, 32)])
    def test_gemv(m, n, kdim, group_n):
        """The W8A16 GEMV of decode's few rows: ragged N and K, scale groups finer than 128 rows,
        K slices of 1 and of several scale groups (one past K), 1-4 rows (one row: summed late and
        per K step); x not quantized."""
        gen = torch.Generator().manual_seed(n + m)
        x = torch.randn(m, kdim, generator=gen)
        w = (torch.randn(n, kdim, generator=gen) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
        ws = torch.rand(-(-n // group_n), -(-kdim // 128), generator=gen) * 0.01 + 1e-3
        ref = k.w8a16_gemv_torch(x, w, ws, group_n)
        for config in (None, (16, 128, 4, 2), (4, 1024, 4, 2))[: 3 if m == 1 else 2]:  # (the interpreter is slow)
            for late_sum in ((True, False) if m == 1 else (False,)):  # one row: both summation orders
                bn = (config or k.GEMV_CONFIG)[0]
                modes = ["grid"] + (["shared"] if group_n % bn == 0 else [])  # the block's rows share scales
                assert [mo for mo in k.GEMV_SCALE_MODES if k.gemv_scale_fits(mo, group_n, bn)] == modes
                for mode in modes:
                    got = k.w8a16_gemv(x, w, ws, group_n, config=config, late_sum=late_sum, scale_mode=mode)
                    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        with pytest.raises(ValueError, match="does not fit"):
            k.w8a16_gemv(x, w, ws, group_n, config=(256, 128, 4, 2), scale_mode="shared")
        with pytest.raises(ValueError, match="unknown scale_mode"):
            k.w8a16_gemv(x, w, ws, group_n, scale_mode="row")

        assert k.fp8_gemm(x, w, ws, group_n, "gemv").shape == (m, n)
        with pytest.raises(ValueError, match="at most"):
            k.w8a16_gemv(torch.randn(k.GEMV_MAX_M + 1, kdim), w, ws, group_n)

    @pytest.mark.parametrize("m,late_sum", [(1, False), (1, True), (3, False)])
    def test_gemv_split_k(m, late_sum):
        """K shared by 2-4 programs per N block (5 K steps of 256 columns, the last ragged: uneven
        shares; 8 splits asked: one per step): equal to one program's result within fp32 summation
        order, the same bits on every call (partials summed in split order), and every arrival
        counter back to 0 after."""
        gen = torch.Generator().manual_seed(11 + m)
        n, kdim = 40, 1100
        x = torch.randn(m, kdim, generator=gen)
        w = (torch.randn(n, kdim, generator=gen) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
        ws = torch.rand(-(-n // 128), -(-kdim // 128), generator=gen) * 0.01 + 1e-3
        tile = (16, 256, 4, 2)
        one = k.w8a16_gemv(x, w, ws, 128, config=tile, late_sum=late_sum, split_k=1)
        torch.testing.assert_close(one, k.w8a16_gemv_torch(x, w, ws), rtol=1e-5, atol=1e-5 * one.abs().max().item())
        for splits in (2, 3, 4, 8):
            for mode in ("grid", "shared"):
                got = k.w8a16_gemv(x, w, ws, 128, config=tile, late_sum=late_sum, scale_mode=mode, split_k=splits)
                torch.testing.assert_close(got, one, rtol=1e-5, atol=1e-5 * one.abs().max().item())
                again = k.w8a16_gemv(x, w, ws, 128, config=tile, late_sum=late_sum, scale_mode=mode, split_k=splits)
                assert torch.equal(got, again)
                assert not any(c.any() for c in k._gemv_counters[x.device])

    def test_gemv_split_k_last_arrival_sums():
        """The last-arrival rule itself (the interpreter runs programs in grid order, so the test
        above always has the last split arrive last): split 0 launched alone, once as the last to
        arrive (its counter at 1, split 1's partial in place), which writes y = its partial + split
        1's and resets the counter; once as the first, which leaves y alone and counts its arrival."""
        gen = torch.Generator().manual_seed(5)
        n, kdim, bn, step = 16, 512, 8, 256
        x = torch.randn(1, kdim, generator=gen)
        w = (torch.randn(n, kdim, generator=gen) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
        ws = torch.rand(1, kdim // 128, generator=gen) * 0.01 + 1e-3
        first_half = k.w8a16_gemv_torch(x[:, :step], w[:, :step], ws[:, : step // 128])  # split 0's share
        for before, last in ((1, True), (0, False)):
            part = torch.zeros(2, 1, n)
            part[1] = torch.randn(1, n, generator=gen)
            arrivals, y = torch.full((n // bn,), before, dtype=torch.int32), torch.full((1, n), -7.0)
            k._gemv_kernel[(n // bn, 1)](
                x, w, ws, y, part, arrivals, 1, n, kdim, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                ws.stride(0), ws.stride(1), y.stride(0), y.stride(1), M_PAD=1, BLOCK_N=bn, GROUPS=step // 128,
                GROUP_K=128, GROUP_N=128, SCALE_MODE=0, LATE_SUM=False, SPLIT_K=2)
            torch.testing.assert_close(part[0], first_half, rtol=1e-5, atol=1e-5)
            if last:
                torch.testing.assert_close(y, first_half + part[1], rtol=1e-5, atol=1e-5)
                assert arrivals.tolist() == [0, 0]
            else:
                assert (y == -7.0).all() and arrivals.tolist() == [1, 1]
