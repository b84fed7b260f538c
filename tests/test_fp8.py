"""FP8 block-quantized weights: kernels, layout, and serving through the mesh.

- kernels/fp8.py against its torch references in Triton's CPU interpreter (a subprocess with
  TRITON_INTERPRET=1, as tests/test_kernels.py), shapes with N and K not multiples of 128;
- models/quant.py: blocks quantize within e4m3's error, a merged weight with parts off the
  128-row grid keeps each part's scales exactly;
- a tiny DeepSeek-V3 checkpoint (transformers) quantized by the test into the V3 FP8 format
  (float8_e4m3fn + weight_scale_inv, experts included) serves through the mesh at 1 and 2 stages
  with greedy tokens equal to transformers' on the dequantized fp32 checkpoint (on the CPU the
  FP8 weights are dequantized once: fp8 * scale is exact in fp32, so the comparison is exact);
- `--quantization fp8` on a tiny Llama equals transformers on the quantized-then-dequantized weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.interpreted import INTERPRETED, run_in_interpreter


if not INTERPRETED:
    def test_fp8_kernels_in_an_interpreter_process():
        run_in_interpreter(__file__)


if INTERPRETED:  # collected only in the interpreter process (above)
    from stage_worker.kernels import fp8 as k
    from stage_worker.kernels import fp8_act as fa

    def _same_fp8(q: torch.Tensor, ref: torch.Tensor) -> None:
        """Equal, except where the interpreter's float32 -> e4m3 conversion (numpy emulation in
        Triton 3.8) rounds a value just under a power of two down to the power below instead of
        up to it; the GPU converts in hardware. Such values are checked to be exactly half."""
        diff = q.float() != ref.float()
        assert torch.equal(q.float()[diff] * 2, ref.float()[diff])
        assert diff.float().mean() < 0.05

    @pytest.mark.parametrize("groups", [1, 8])
    @pytest.mark.parametrize("m,kdim", [(5, 300), (1, 128), (3, 64), (4, 1300)])
    def test_act_quant(m, kdim, groups, tune):
        """One 128-value group per program, or up to 8 of a row (1,300 columns: 11 groups, so two
        programs a row, the second partly masked)."""
        tune(act_quant_groups=groups)
        gen = torch.Generator().manual_seed(m)
        x = torch.randn(m, kdim, generator=gen) * torch.linspace(0.1, 30, kdim)
        x[0, :10] = 0.0
        if kdim >= 256:
            x[1, 128:256] = 0.0  # a zero group
        q, s = fa.per_token_group_quant_fp8(x, use_triton=True)
        q_ref, s_ref = fa.per_token_group_quant_fp8_torch(x)
        assert q.dtype == torch.float8_e4m3fn and s.shape == (m, -(-kdim // 128))
        torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
        _same_fp8(q, q_ref)
        qc, sc = fa.per_token_group_quant_fp8(x, column_major_scales=True, use_triton=True)
        assert sc.stride() == (1, m) and torch.equal(sc, s) and torch.equal(qc, q)
        err = (k.dequant_act(q_ref, s_ref) - x).abs().max()
        assert err <= x.abs().max() / 16  # e4m3: 3 mantissa bits

    @pytest.mark.parametrize("m,kdim,one_pass_max", [(5, 300, 16384), (1, 2048, 16384), (3, 4500, 16384),
                                                     (1, 2048, 2048), (3, 4500, 2048)])
    def test_per_token_quant(m, kdim, one_pass_max, monkeypatch):
        """One scale per row, the row held whole or (rows past ROW_QUANT_ONE_PASS_MAX) read twice
        in 2,048-wide steps: rows shorter than, equal to and longer than a step (4,500: three, the
        last partly masked), a zero row. Magnitudes stay clear of e4m3's subnormals, which the
        interpreter rounds differently from the GPU."""
        monkeypatch.setattr(fa, "ROW_QUANT_ONE_PASS_MAX", one_pass_max)
        gen = torch.Generator().manual_seed(kdim)
        sign = torch.randint(0, 2, (m, kdim), generator=gen) * 2 - 1
        x = sign * (torch.rand(m, kdim, generator=gen) + 0.5) * torch.linspace(1, 30, kdim)
        x[-1] = 0.0
        q, s = fa.per_token_quant_fp8(x, use_triton=True)
        q_ref, s_ref = fa.per_token_quant_fp8_torch(x)
        assert q.dtype == torch.float8_e4m3fn and s.shape == (m, 1)
        torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
        _same_fp8(q, q_ref)
        assert (q_ref.float() * s_ref - x).abs().max() <= x.abs().max() / 16  # e4m3: 3 mantissa bits

    @pytest.mark.parametrize("m,n,kdim", [(1, 200, 300), (3, 130, 1100), (20, 96, 256)])
    def test_channel_scales_through_the_block_kernels(m, n, kdim):
        """Per-channel weights (one scale per row) as the block kernels read them: group_n 1 and
        the [N, 1] scales expanded to a [N, ceil(K/128)] grid with stride 0 along K (no copy);
        GEMV, W8A16 and W8A8 against x @ (w * s)^T."""
        gen = torch.Generator().manual_seed(n + m)
        w = (torch.randn(n, kdim, generator=gen) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
        s = torch.rand(n, 1, generator=gen) * 0.01 + 1e-3
        grid = s.expand(n, -(-kdim // 128))
        assert grid.stride() == (1, 0)
        x = torch.randn(m, kdim, generator=gen)
        ref = x @ (w.float() * s).t()
        tol = dict(rtol=1e-3, atol=1e-3 * ref.abs().max().item())
        if m <= k.GEMV_MAX_M:
            torch.testing.assert_close(k.w8a16_gemv(x, w, grid, 1), ref, **tol)
            # shared scales fit group 1 at one row per program only
            assert not k.gemv_scale_fits("shared", 1, k.GEMV_CONFIG[0])
            torch.testing.assert_close(k.w8a16_gemv(x, w, grid, 1, config=(1, 256, 4, 2), scale_mode="shared"),
                                       ref, **tol)
            torch.testing.assert_close(k.w8a16_gemv(x, w, grid, 1, late_sum=True), ref, **tol)
        x16 = x.to(torch.float16)
        torch.testing.assert_close(k.w8a16_block_gemm(x16, w, grid, 1, torch.float32),
                                   x16.float() @ (w.float() * s).t(), **tol)
        got = k.fp8_gemm(x, w, grid, 1, "triton")  # activations in 1x128 groups, weights per row
        assert ((got - ref).norm() / ref.norm()) < 0.05
        torch.testing.assert_close(got, k.fp8_gemm(x, w, grid, 1, "torch"), **tol)

    @pytest.mark.parametrize("m,n,kdim,group_n", [(5, 200, 300, 128), (70, 130, 129, 128), (3, 64, 96, 32),
                                                  (1, 576, 256, 128)])
    def test_block_gemm(m, n, kdim, group_n):
        """Ragged N and K (masked tiles, partial scale blocks), M from 1 to past one tile."""
        gen = torch.Generator().manual_seed(n)
        x = torch.randn(m, kdim, generator=gen)
        xq, xs = fa.per_token_group_quant_fp8_torch(x)
        w = (torch.randn(n, kdim, generator=gen) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
        ws = torch.rand(-(-n // group_n), -(-kdim // 128), generator=gen) * 0.01 + 1e-3
        ref = k.w8a8_block_gemm_torch(xq, xs, w, ws, group_n, torch.float32)
        for config, split in ((None, None), ((16, 32, 4, 2), 1), ((64, 64, 4, 2), 1), ((16, 32, 4, 2), 2),
                              ((16, 64, 4, 2), 3)):  # split-K: 3 slices of 1-3 K-blocks (one may be empty)
            got = k.w8a8_block_gemm(xq, xs, w, ws, group_n, torch.float32, config=config, split_k=split)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        xq_c, xs_c = xq, xs.t().contiguous().t()  # scales in either layout
        torch.testing.assert_close(k.w8a8_block_gemm(xq_c, xs_c, w, ws, group_n, torch.float32), ref,
                                   rtol=1e-5, atol=1e-5 * ref.abs().max().item())

    @pytest.mark.parametrize("m,n,kdim,group_n", [(5, 200, 300, 128), (70, 130, 129, 128), (3, 64, 96, 32)])
    def test_w8a16_block_gemm(m, n, kdim, group_n):
        """The tensor-core W8A16 form (x as it is, weight tiles converted in registers): ragged
        M, N and K, split-K, scale groups finer than 128 rows; against x @ dequant(W)^T, with each
        K block's product scaled, or (prescale) with the weight dequantized to x's dtype first."""
        gen = torch.Generator().manual_seed(n + 1)
        x = torch.randn(m, kdim, generator=gen).to(torch.float16)  # (bf16 is unreliable in the interpreter)
        w = (torch.randn(n, kdim, generator=gen) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
        ws = torch.rand(-(-n // group_n), -(-kdim // 128), generator=gen) * 1e-4 + 1e-5
        ref = k.w8a16_gemv_torch(x, w, ws, group_n, torch.float32)
        ref16 = x.float() @ k.dequant_weight(w, ws, group_n).to(x.dtype).float().t()  # prescale's numbers
        for config, split in ((None, None), ((16, 32, 4, 2), 1), ((64, 64, 4, 2), 3)):
            got = k.w8a16_block_gemm(x, w, ws, group_n, torch.float32, config=config, split_k=split, prescale=False)
            torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())
            got = k.w8a16_block_gemm(x, w, ws, group_n, torch.float32, config=config, split_k=split, prescale=True)
            torch.testing.assert_close(got, ref16, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        assert k.fp8_gemm(x, w, ws, group_n, "w8a16").dtype == torch.float16
        y32 = k.fp8_gemm(x.float(), w, ws, group_n, "w8a16")  # fp32 activations: the W8A8 kernel instead
        torch.testing.assert_close(y32, k.fp8_gemm(x.float(), w, ws, group_n, "triton"), rtol=0, atol=0)
        with pytest.raises(ValueError, match="bf16/fp16"):
            k.w8a16_block_gemm(x.float(), w, ws, group_n)

    def test_fp8_linear_forward_on_the_kernel_path():
        """Fp8Linear's FP8 path (forced here; CUDA SM89+ picks it) with a merged weight, a bias and
        a 3-D input, against its dequantized path: within the activation quant's error."""
        from stage_worker.models import quant

        gen = torch.Generator().manual_seed(2)
        lin = quant.Fp8Linear(160, parts={"gate_proj": 136, "up_proj": 136}, bias=True)
        assert lin.group_n == 8  # 136 = 17 x 8: parts off the 128-row grid
        for name, slot in lin.checkpoint_views("mlp.gate_up_proj").items():
            slot.copy_(torch.randn(slot.shape, generator=gen) * (0.05 if name.endswith("weight") else 1.0))
        x = torch.randn(2, 3, 160, generator=gen)
        lin.prepare()
        ref = lin(x)  # dequantized (the CPU's path)
        lin.backend = "fp8"
        got = lin(x)
        assert got.shape == (2, 3, 272)
        assert ((got - ref).norm() / ref.norm()) < 0.05

    def test_channel_fp8_linear_forward_on_the_kernel_path():
        """A per-channel Fp8Linear (merged, off the 128-row grid, bias, 3-D input): its FP8 path
        (forced; no rowwise _scaled_mm here: the Triton kernels on the scale grid, the GEMV at one
        row) against its dequantized path."""
        from stage_worker.models import quant

        gen = torch.Generator().manual_seed(3)
        lin = quant.Fp8Linear(160, parts={"gate_proj": 136, "up_proj": 136}, bias=True, channel=True)
        assert (lin.group_n, lin.group_k, tuple(lin.weight_scale_inv.shape)) == (1, 160, (272, 1))
        for name, slot in lin.checkpoint_views("mlp.gate_up_proj").items():
            slot.copy_(torch.randn(slot.shape, generator=gen) * (0.05 if name.endswith("weight") else 1.0))
        for shape, bound in (((2, 3, 160), 0.05), ((1, 160), 1e-5)):  # one row: the GEMV, x not quantized
            x = torch.randn(*shape, generator=gen)
            lin.backend = None
            assert lin.prepare() == "dequant"
            ref = lin(x)
            lin.backend, lin._ws_grid = "fp8", lin.weight_scale_inv.expand(272, 2)
            got = lin(x)
            assert got.shape == (*shape[:-1], 272) and ((got - ref).norm() / ref.norm()) < bound

    def _same_act(a, b) -> None:
        assert (a.rows, a.kind, tuple(a.q.shape), tuple(a.scale.shape)) == (b.rows, b.kind, tuple(b.q.shape),
                                                                            tuple(b.scale.shape))
        assert torch.equal(a.q.view(torch.uint8), b.q.view(torch.uint8)) and torch.equal(a.scale, b.scale)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("quant", ["group", "row"])
    @pytest.mark.parametrize("t,h", [(5, 320), (1, 64), (0, 128)])
    def test_norm_and_act_write_fp8(dtype, quant, t, h, monkeypatch):
        """fused_ops' RMSNorm (with and without the residual add) and SiLU/GELU * up kernels with
        `quant` write exactly what their plain output quantized by quantize_act is: the same e4m3
        bits and scales, rows padded to 4 in 1x128 groups (column-major scales), one scale per row
        otherwise; partial last groups (320 columns), a row narrower than a group (64). A product
        too wide for one program per row (ROW_QUANT_ONE_PASS_MAX lowered) quantizes after it."""
        from stage_worker.kernels import fused_ops as fo

        gen = torch.Generator().manual_seed(t * h)
        x, r = (torch.randn(t, h, generator=gen).to(dtype) for _ in range(2))
        w = (torch.rand(h, generator=gen) + 0.5).to(dtype)
        got = fo.rms_norm(x, w, 1e-5, use_triton=True, quant=quant)
        _same_act(got, fa.quantize_act(fo.rms_norm(x, w, 1e-5, use_triton=True), quant, use_triton=True))
        assert got.scale.stride()[0] == 1 and got.q.shape[0] == (-(-t // 4) * 4 if quant == "group" else t)
        got, res = fo.fused_add_rms_norm(x, r, w, 1e-5, use_triton=True, quant=quant)
        plain, res_ref = fo.fused_add_rms_norm(x, r, w, 1e-5, use_triton=True)
        assert torch.equal(res, res_ref)
        _same_act(got, fa.quantize_act(plain, quant, use_triton=True))
        gate_up = torch.randn(t, 2 * h, generator=gen).to(dtype)
        for fn in (fo.silu_and_mul, fo.gelu_tanh_and_mul):
            _same_act(fn(gate_up, use_triton=True, quant=quant), fa.quantize_act(fn(gate_up, use_triton=True), quant,
                                                                                use_triton=True))
        monkeypatch.setattr(fa, "ROW_QUANT_ONE_PASS_MAX", 128)
        assert fo.act_quant_fusable(h, quant) == (quant == "group" or h <= 128)
        _same_act(fo.silu_and_mul(gate_up, use_triton=True, quant=quant),
                  fa.quantize_act(fo.silu_and_mul(gate_up, use_triton=True), quant, use_triton=True))

    @pytest.mark.parametrize("family", ["llama", "v3"])
    def test_norms_write_fp8_for_the_gemms(family, tmp_path, monkeypatch, tune):
        """A stage quantized at load, on the FP8 kernel path and the Triton elementwise kernels
        (both forced; CUDA SM89+ picks them): each RMSNorm and SiLU * up kernel hands the FP8 GEMM
        after it quantized rows (Fp8Linear.input_quant: 1x128 groups from two rows, none at one
        row, the GEMV's; DeepSeek: one quantized x for q_a and kv_a, the q_a norm's for q_b, the
        dense MLP's SiLU for its down_proj) and the logits equal, bit for bit, those of the same
        stage quantizing before each GEMM in a separate kernel (the tuning's fuse_act_quant off).
        (Here the interpreter sums in numpy's order either way; on a GPU the fused norm may sum
        its squares in another order: kernels/fused_ops.py.)"""
        from stage_worker.kernels import fused_ops
        from stage_worker.loader import load_stage
        from stage_worker.models import quant
        from tests.checkpoints import make_deepseek_checkpoint, make_hf_checkpoint
        from tests.reference import random_prompts
        from tests.test_model import run_pipeline

        monkeypatch.setattr(quant, "fp8_compute_available", lambda device: True)
        monkeypatch.setattr(fused_ops, "triton_available", lambda device: True)
        separate_quant = fa.quantize_act
        monkeypatch.setattr(k, "quantize_act", lambda x, kind, use_triton=None: separate_quant(x, kind, True))
        src = make_hf_checkpoint(tmp_path, "llama", num_layers=1) if family == "llama" else \
            make_deepseek_checkpoint(tmp_path, "v3", num_layers=1)  # one layer (V3's first: dense) is enough here
        stage, _ = load_stage(src, 0, 1, quantization="fp8")
        asked, plain_input_quant = [], quant.Fp8Linear.input_quant

        def spy(self, m):
            asked.append(plain_input_quant(self, m))
            return asked[-1]

        monkeypatch.setattr(quant.Fp8Linear, "input_quant", spy)
        prompts = random_prompts(seed=4, lengths=[9], vocab=320)  # a 9-row prefill, then a 1-row decode step
        tune(fuse_act_quant=True)
        fused = run_pipeline([stage], prompts, 2)
        assert set(asked) == {"group", None}
        tune(fuse_act_quant=False)
        plain = run_pipeline([stage], prompts, 2)
        assert fused[0] == plain[0]
        for a, b in zip(fused[1], plain[1]):
            assert all(torch.equal(x, y) for x, y in zip(a, b))

    def test_fp8_gemm_end_to_end():
        """x -> quant -> GEMM (Triton) equals the torch path, and both are near x @ W^T; rows
        quantized beforehand (an Fp8Act) give the same product; a backend of another kind refuses them."""
        gen = torch.Generator().manual_seed(9)
        x, w = torch.randn(7, 260, generator=gen), torch.randn(150, 260, generator=gen) * 0.05
        from stage_worker.models.quant import quantize_blocks

        wq, ws = quantize_blocks(w)
        got = k.fp8_gemm(x, wq, ws, 128, "triton")
        ref = k.fp8_gemm(x, wq, ws, 128, "torch")
        torch.testing.assert_close(got, ref, rtol=0.02, atol=0.02 * ref.abs().max().item())
        act = fa.quantize_act(x, "group")  # rows quantized before (as fp8_gemm does): the same product
        assert torch.equal(k.fp8_gemm(act, wq, ws, 128, "triton", out_dtype=torch.float32), got)
        for backend, match in (("torch", "unquantized"), ("rowwise", "takes row activations")):
            with pytest.raises(ValueError, match=match):
                k.fp8_gemm(act, wq, ws, 128, backend, out_dtype=torch.float32)
        exact = x @ w.t()
        assert ((ref - exact).norm() / exact.norm()) < 0.06


# -- layout (models/quant.py) --------------------------------------------------------------------
if not INTERPRETED:
    from stage_worker.models import quant

    def test_quantize_blocks_error_and_layout():
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(300, 200, generator=gen) * torch.linspace(0.01, 10, 200)  # 3x2 blocks, ragged
        q, s = quant.quantize_blocks(w)
        assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
        deq = quant.dequantize_blocks(q, s)
        for i, j in [(0, 0), (2, 1), (1, 0), (1, 1)]:
            rows, cols = slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1))
            torch.testing.assert_close(deq[rows, cols], q[rows, cols].float() * s[i, j])
        assert (deq - w).abs().max() <= 0.07 * w.abs().max()
        with pytest.raises(ValueError, match="expected"):
            quant.dequantize_blocks(q, s[:2])

    def test_gemm_backend_rule(tune):
        """Which FP8 GEMM a [M, K] x [N, K]^T product takes: the GEMV at one row, the W8A16 form (when
        turned on) up to its rows on narrow weights, else _scaled_mm (when it can) from its measured
        rows, else Triton."""
        tune(gemv_max_m=1, w8a16_max_m=0)  # the defaults (W8A16 off)
        b = quant.gemm_backend
        assert b(1, 4096, 4096, True) == "gemv"
        assert [b(m, 6144, 4096, True) for m in (2, 16, 64)] == ["triton", "scaled_mm", "scaled_mm"]
        tune(w8a16_max_m=16)
        assert [b(m, 6144, 4096, True) for m in (2, 16, 17)] == ["w8a16", "w8a16", "scaled_mm"]
        assert [b(m, 28672, 4096, True) for m in (2, 16, 64)] == ["triton", "scaled_mm", "scaled_mm"]
        assert b(8, 28672, 4096, False) == "triton" and b(32, 576, 7168, False) == "triton"
        assert b(32, 4096, 1536, True) == "triton" and b(64, 4096, 1536, True) == "scaled_mm"

    def test_channel_backend_rule_and_slot(tune):
        """Per-channel linears: the GEMV at one or two rows, rowwise _scaled_mm where the device has it,
        else Triton; their slots quantize float tensors per row and refuse FP8 checkpoint tensors
        (whose 128x128 scales they cannot hold)."""
        tune(channel_gemv_max_m=2)
        b = quant.channel_gemm_backend
        assert [b(1, True), b(2, False), b(3, True), b(4096, True), b(3, False)] == \
            ["gemv", "gemv", "rowwise", "rowwise", "triton"]
        lin = quant.Fp8Linear(128, 48, channel=True)  # K = one 128-column block: still a scale per row
        slot = lin.checkpoint_views("o_proj")["o_proj.weight"]
        w = torch.randn(48, 128) * torch.linspace(0.1, 3, 48)[:, None]
        slot.copy_(w)
        q, s = quant.quantize_blocks(w, (1, 128))
        assert torch.equal(lin.weight_scale_inv, s) and torch.equal(lin.weight.view(torch.uint8), q.view(torch.uint8))
        torch.testing.assert_close(lin.dense_weight(), q.float() * s)
        with pytest.raises(ValueError, match="per-channel"):
            slot.load(q, torch.ones(1, 2), (128, 128))

    def test_channel_prepare_takes_rowwise_where_the_device_has_it(monkeypatch):
        """prepare() on a device with FP8 compute and the rowwise recipe (both claimed here: the
        CPU's torch._scaled_mm runs the same recipe): a bf16 per-channel linear keeps its row
        scales as _scaled_mm's [1, N] and a stride-0 grid for the Triton kernels, and from 3 rows
        runs the rowwise GEMM, near the dequantized product; an fp32 stage never takes rowwise."""
        monkeypatch.setattr(quant, "fp8_compute_available", lambda device: True)
        monkeypatch.setattr(quant, "rowwise_available", lambda device: True)
        gen = torch.Generator().manual_seed(4)
        lin = quant.Fp8Linear(256, 96, channel=True)
        lin.checkpoint_views("o_proj")["o_proj.weight"].copy_(torch.randn(96, 256, generator=gen) * 0.05)
        lin.compute_dtype = torch.bfloat16
        assert lin.prepare() == "fp8" and tuple(lin._ws_mm.shape) == (1, 96) and lin._ws_grid.stride() == (1, 0)
        x = torch.randn(5, 256, generator=gen).to(torch.bfloat16)
        y = lin(x)
        ref = x.float() @ lin.dense_weight().float().t()
        assert y.dtype == torch.bfloat16 and ((y.float() - ref).norm() / ref.norm()) < 0.05
        lin.compute_dtype, lin.backend = torch.float32, None
        assert lin.prepare() == "fp8" and lin._ws_mm is None

    def test_merged_parts_off_the_block_grid_keep_their_scales():
        """q/k/v of 96/32/32 rows: group_n 32, each part's checkpoint scale repeated on its rows;
        a 128-aligned merge keeps group_n 128; the loaded layer equals the dequantized parts."""
        assert quant.row_group([4096, 1024, 1024]) == 128 and quant.row_group([576]) == 128
        lin = quant.Fp8Linear(200, parts={"q_proj": 96, "k_proj": 32, "v_proj": 32}, bias=True)
        assert lin.group_n == 32 and lin.weight_scale_inv.shape == (5, 2)
        gen = torch.Generator().manual_seed(1)
        views = lin.checkpoint_views("layers.0.self_attn.qkv_proj")
        dense = []
        for name, rows in lin.parts.items():
            w = torch.randn(rows, 200, generator=gen) * (1 + len(dense))
            q, s = quant.quantize_blocks(w)
            views[f"layers.0.self_attn.{name}.weight"].load(q, s, (128, 128))
            views[f"layers.0.self_attn.{name}.bias"].copy_(torch.randn(rows, generator=gen))
            dense.append(quant.dequantize_blocks(q, s))
        assert lin.prepare() == "dequant"  # the CPU
        x = torch.randn(3, 200, generator=gen)
        ref = x @ torch.cat(dense).t() + lin.bias
        torch.testing.assert_close(lin(x), ref, rtol=0, atol=0)
        slot = views["layers.0.self_attn.k_proj.weight"]
        with pytest.raises(ValueError, match="shape"):
            slot.load(torch.zeros(31, 200), None, (128, 128))
        with pytest.raises(ValueError, match="scale_inv"):
            slot.load(torch.zeros(32, 200, dtype=torch.float8_e4m3fn), torch.ones(1, 1), (128, 128))


# -- serving through the mesh ------------------------------------------------------------------------
if not INTERPRETED:
    import asyncio
    import json

    from safetensors.torch import load_file, save_file

    from stage_worker.loader import load_stage
    from stagemesh.errors import CheckpointError
    from tests.checkpoints import make_deepseek_checkpoint, make_hf_checkpoint
    from tests.reference import hf_greedy, random_prompts
    from tests.test_model import run_pipeline

    V3_FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}

    def _is_linear(name: str, w: torch.Tensor) -> bool:
        return ".layers." in name and name.endswith(("proj.weight", "proj_with_mqa.weight")) and w.ndim == 2

    def _write(out: Path, tensors: dict, config: dict) -> Path:
        out.mkdir()
        save_file(tensors, out / "model.safetensors")
        (out / "config.json").write_text(json.dumps(config))
        return out

    @pytest.fixture(scope="module")
    def v3_fp8(tmp_path_factory):
        """(FP8 checkpoint, its dequantized fp32 twin): every layer linear, routed and shared
        experts and kv_b_proj included, as float8_e4m3fn + weight_scale_inv (DeepSeek-V3's format)."""
        root = tmp_path_factory.mktemp("fp8")
        src = make_deepseek_checkpoint(root, "v3")
        tensors = load_file(src / "model.safetensors")
        fp8, deq = dict(tensors), dict(tensors)
        for name, w in tensors.items():
            if _is_linear(name, w):
                q, scale = quant.quantize_blocks(w)
                fp8[name], fp8[name + "_scale_inv"] = q, scale
                deq[name] = quant.dequantize_blocks(q, scale)
        raw = json.loads((src / "config.json").read_text())
        return (_write(root / "v3-fp8", fp8, {**raw, "quantization_config": V3_FP8}),
                _write(root / "v3-deq", deq, raw))

    async def _generate_all(address, prompts, max_tokens, **kw):
        from stagemesh.client import AsyncClient

        async with AsyncClient(address) as client:
            return await asyncio.gather(*[client.generate(prompt_ids=p, max_tokens=max_tokens, timeout=120, **kw)
                                          for p in prompts])

    def test_v3_fp8_checkpoint_stays_fp8_and_equals_dequantized(v3_fp8):
        """Loaded as e4m3 + scales (1 byte per weight), computing exactly the dequantized weights:
        one stage in process (logits and greedy equal transformers on the dequantized checkpoint)."""
        fp8_dir, deq_dir = v3_fp8
        stage, _ = load_stage(fp8_dir, 0, 3)
        lin = stage.layers["1"].self_attn.q_b_proj
        moe = stage.layers["1"].mlp
        assert isinstance(lin, quant.Fp8Linear) and lin.weight.dtype == torch.float8_e4m3fn
        if hasattr(moe, "w_gate_up_scale_inv"):  # expert stacks in quant.py's FP8 layout (models/moe.py)
            assert moe.w_gate_up.dtype == torch.float8_e4m3fn and moe.w_gate_up_scale_inv.dtype == torch.float32
        assert stage.layers["1"].self_attn.kv_b_proj.weight.dtype == torch.float32  # dense (absorbed MLA)
        dense, _ = load_stage(deq_dir, 0, 3)
        assert lin.weight.element_size() == 1 and quant.weight_bytes(stage) < quant.weight_bytes(dense)
        ref = dense.layers["1"].self_attn.q_b_proj.weight
        assert torch.equal(lin.dense_weight(), ref)
        prompts = random_prompts(seed=5, lengths=[11, 4], vocab=320)
        tokens, rows = run_pipeline([stage], prompts, 5)
        tokens_ref, rows_ref = run_pipeline([dense], prompts, 5)
        assert tokens == tokens_ref and all(torch.equal(a, b) for a, b in zip(rows, rows_ref))
        assert tokens == [hf_greedy(deq_dir, p, 5, ignore_eos=True) for p in prompts]

    def test_v3_fp8_mesh_equals_transformers_dequantized(v3_fp8):
        """Two stages through the real mesh (gRPC processes), chunked prefill: greedy tokens equal
        transformers' on the dequantized fp32 checkpoint."""
        from stagemesh.cli.harness import mesh

        fp8_dir, deq_dir = v3_fp8
        prompts = random_prompts(seed=7, lengths=[3, 17, 40], vocab=320)
        expected = [hf_greedy(deq_dir, p, 8) for p in prompts]
        with mesh(fp8_dir, stages=2, extra=["--max-batched-tokens", "16"]) as m:
            outs = asyncio.run(_generate_all(m.address, prompts, 8))
        assert [o.token_ids for o in outs] == expected

    def test_quantization_fp8_deepseek_in_process(tmp_path):
        """`--quantization fp8` on a bf16/fp32 DeepSeek: every linear and expert quantized at load
        (kv_b_proj stays dense); two stages equal transformers on those weights dequantized."""
        src = make_deepseek_checkpoint(tmp_path, "v3")
        tensors = load_file(src / "model.safetensors")
        deq = {n: quant.dequantize_blocks(*quant.quantize_blocks(w)) if _is_linear(n, w) and "kv_b_proj" not in n
               else w for n, w in tensors.items()}
        deq_dir = _write(tmp_path / "v3-q-deq", deq, json.loads((src / "config.json").read_text()))
        stages = [load_stage(src, a, b, quantization="fp8")[0] for a, b in ((0, 1), (1, 3))]
        assert isinstance(stages[1].layers["2"].mlp.shared_experts.down_proj, quant.Fp8Linear)
        prompts = random_prompts(seed=4, lengths=[9, 30], vocab=320)
        tokens, _ = run_pipeline(stages, prompts, 6)
        assert tokens == [hf_greedy(deq_dir, p, 6, ignore_eos=True) for p in prompts]

    def test_missing_scale_names_the_tensor(v3_fp8, tmp_path):
        fp8_dir, _ = v3_fp8
        tensors = load_file(fp8_dir / "model.safetensors")
        del tensors["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"]
        bad = _write(tmp_path / "bad", tensors, json.loads((fp8_dir / "config.json").read_text()))
        with pytest.raises(CheckpointError, match="experts.3.up_proj.weight has no .*weight_scale_inv"):
            load_stage(bad, 1, 2)
        tensors = load_file(fp8_dir / "model.safetensors")
        tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(2, 1)
        bad2 = _write(tmp_path / "bad2", tensors, json.loads((fp8_dir / "config.json").read_text()))
        with pytest.raises(CheckpointError, match="o_proj.weight: scale_inv of shape"):
            load_stage(bad2, 0, 1)

    def _dequantized_twin(src: Path, out: Path, block) -> Path:
        """src's checkpoint with every layer linear quantized in `block`s ((1, K): per row) and
        dequantized again: what a stage quantizing at load computes with."""
        tensors = load_file(src / "model.safetensors")
        deq = {}
        for n, w in tensors.items():
            b = block or (1, w.shape[-1])
            deq[n] = quant.dequantize_blocks(*quant.quantize_blocks(w, b), *b) if _is_linear(n, w) else w
        return _write(out, deq, json.loads((src / "config.json").read_text()))

    def test_quantization_fp8_llama_mesh(tmp_path):
        """`--quantization fp8` on a bf16/fp32 Llama: quantized at load per checkpoint tensor in
        128x128 blocks (fp8-channel is the other scheme); the mesh's greedy tokens equal transformers' on
        those weights dequantized."""
        from stagemesh.cli.harness import mesh

        src = make_hf_checkpoint(tmp_path, "llama", num_layers=2)
        deq_dir = _dequantized_twin(src, tmp_path / "llama-deq", (128, 128))
        stage, cfg = load_stage(src, 0, 2, quantization="fp8")
        qkv = stage.layers["0"].self_attn.qkv_proj
        assert quant.fp8_scheme(cfg) == "block" and isinstance(qkv, quant.Fp8Linear) and not qkv.channel
        prompts = random_prompts(seed=3, lengths=[5, 21], vocab=320)
        expected = [hf_greedy(deq_dir, p, 8) for p in prompts]
        with mesh(src, stages=1, extra=["--quantization", "fp8"]) as m:
            outs = asyncio.run(_generate_all(m.address, prompts, 8))
        assert [o.token_ids for o in outs] == expected

    def test_quantization_fp8_llama_channel_scheme(tmp_path):
        """`--quantization fp8-channel`: the same Llama quantized with one scale per output row
        (down_proj's K = 128: one block wide, still per row); two stages in process equal
        transformers on those weights dequantized."""
        src = make_hf_checkpoint(tmp_path, "llama", num_layers=2)
        deq_dir = _dequantized_twin(src, tmp_path / "llama-deq", None)
        stages = [load_stage(src, a, b, quantization="fp8-channel")[0] for a, b in ((0, 1), (1, 2))]
        down = stages[1].layers["1"].mlp.down_proj
        assert down.channel and tuple(down.weight_scale_inv.shape) == (down.out_features, 1)
        prompts = random_prompts(seed=5, lengths=[7, 19], vocab=320)
        tokens, _ = run_pipeline(stages, prompts, 6)
        assert tokens == [hf_greedy(deq_dir, p, 6, ignore_eos=True) for p in prompts]

    def test_dummy_load_format_serves_without_weight_files(tmp_path):
        """config.json + tokenizer only: `up --load-format dummy` (FP8 via --quantization) comes up,
        the gateway tokenizes a text prompt, and N tokens come back (meaningless ones)."""
        from stagemesh.cli.demo_model import write_demo_model
        from stagemesh.cli.harness import mesh

        demo = write_demo_model(tmp_path / "demo", num_layers=2)
        (demo / "model.safetensors").unlink()
        assert not list(demo.glob("*.safetensors"))
        stage, _ = load_stage(demo, 0, 2, load_format="dummy", quantization="fp8")
        w = stage.layers["1"].mlp.down_proj
        assert w.weight.dtype == torch.float8_e4m3fn and 0 < w.dense_weight().std() < 0.1
        again, _ = load_stage(demo, 1, 2, load_format="dummy", quantization="fp8")  # same weights, any split
        assert torch.equal(again.layers["1"].mlp.down_proj.weight.view(torch.uint8), w.weight.view(torch.uint8))
        with mesh(demo, stages=1, extra=["--load-format", "dummy", "--quantization", "fp8"]) as m:
            out = asyncio.run(_dummy_generate(m.address))
        assert out.completion_tokens == 6 and len(out.token_ids) == 6 and out.prompt_tokens > 1

    async def _dummy_generate(address):
        from stagemesh.client import AsyncClient

        async with AsyncClient(address) as client:
            return await client.generate(prompt="The gateway", max_tokens=6, ignore_eos=True, timeout=120)

    def test_unsupported_quantization_configs_are_named():
        from stagemesh.model_config import ModelConfig

        base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10}
        for qc, match in (({"quant_method": "gptq"}, "quant_method 'gptq' is not supported"),
                          ({"quant_method": "fp8"}, "without weight_block_size"),
                          ({"quant_method": "fp8", "weight_block_size": [128]}, "bad quantization_config")):
            with pytest.raises(CheckpointError, match=match):
                quant.is_fp8(ModelConfig.from_dict({**base, "quantization_config": qc}))
        with pytest.raises(CheckpointError, match="--quantization 'int4'"):
            quant.with_quantization(ModelConfig.from_dict(base), "int4")
        with pytest.raises(CheckpointError, match="--quantization 'fp8-tensor' is not supported"):
            quant.with_quantization(ModelConfig.from_dict(base), "fp8-tensor")
