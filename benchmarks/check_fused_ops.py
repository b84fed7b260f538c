"""Correctness check of stage_worker/kernels/fused_ops.py: Triton kernels vs their torch references.

Runs on a CUDA device as is, or on CPU through Triton's interpreter:

    TRITON_INTERPRET=1 .venv/bin/python benchmarks/check_fused_ops.py   # triton: the test extra
    python benchmarks/check_fused_ops.py            # on a GPU host

Every case draws fresh random inputs (seeded), runs the Triton path (use_triton=True) and the
torch reference (use_triton=False), and compares:
- float32: max abs error < 1e-5 (and counts elements that are not bit-equal);
- bf16 / fp16: relative error < 1e-2, per element |a - b| / max(|b|, 1e-3 max|b|), and the number
  of elements more than 1 ulp apart (reported, not a failure by itself);
- NaN where the reference has none is a failure.
On CUDA, all five ops are also captured in one CUDA graph and replayed on new inputs (no host
synchronisation, static shapes). rotary_and_cache fills both KV caches with NaN first: every
element of a written slot must equal that element of one of the rows mapped to it (padding rows
share a scratch slot; their programs race, so that slot may mix rows, reported as "torn") and
every other slot must still be NaN. Outputs the ops allocate are poisoned by freeing a NaN block
of their size first (best effort: the allocator usually hands it back).

The interpreter rounds float32 -> bfloat16 casts by truncation, where GPUs round to nearest even;
in interpreter mode this script patches that one cast to round to nearest even (as the hardware
does), unless --no-rtne-patch. Exits 1 when any case fails.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stage_worker.kernels import fused_ops as fo  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ULP_BITS = {torch.float32: (torch.int32, 0x7FFFFFFF), torch.bfloat16: (torch.int16, 0x7FFF),
            torch.float16: (torch.int16, 0x7FFF), torch.float8_e4m3fn: (torch.int8, 0x7F)}


def patch_interpreter_rtne() -> bool:
    """Make the interpreter's float32 -> bfloat16 cast round to nearest even, as GPUs do."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as ti

    orig = ti.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            f = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            bits = f.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return ti.TensorHandle(bits.reshape(np.shape(src.data)), tl.bfloat16)
        return orig(self, src, dst_type)

    ti.InterpreterBuilder.cast_impl = cast_impl
    return True


def poison_allocator(n: int, device: str) -> None:
    """Free a NaN block of n floats so the next allocation of that size likely reuses it."""
    if n:
        x = torch.full((n,), float("nan"), device=device)
        del x


def ordered(x: torch.Tensor) -> torch.Tensor:
    """Integers whose differences count ulps between floats of x's dtype (sign-magnitude)."""
    idt, mag = ULP_BITS[x.dtype]
    i = x.contiguous().view(idt).to(torch.int64)
    return torch.where(i < 0, -(i & mag), i)


class Report:
    def __init__(self):
        self.rows: list[tuple] = []
        self.failed = 0

    def compare(self, op: str, case: str, dtype: torch.dtype, got: torch.Tensor,
                ref: torch.Tensor, extra_ok: bool = True, note: str = "") -> None:
        got, ref = got.detach().cpu(), ref.detach().cpu()
        shape_ok = got.shape == ref.shape and got.dtype == ref.dtype
        if not shape_ok:
            note = f"shape/dtype {tuple(got.shape)} {got.dtype} vs {tuple(ref.shape)} {ref.dtype}"
            self._add(op, case, dtype, float("nan"), float("nan"), -1, -1, -1, False, note)
            return
        n = got.numel()
        if n == 0:
            self._add(op, case, dtype, 0.0, 0.0, 0, 0, 0, extra_ok, note or "empty")
            return
        nan_bad = bool((got.isnan() & ~ref.isnan()).any() | (ref.isnan() & ~got.isnan()).any())
        g, r = got.float(), ref.float()
        finite = ~(g.isnan() | r.isnan())
        diff = (g - r).abs()[finite]
        max_abs = float(diff.max()) if diff.numel() else 0.0
        rf = r[finite].abs()
        floor = max(float(rf.max()) * 1e-3, 1e-30) if rf.numel() else 1.0
        rel = float((diff / rf.clamp_min(floor)).max()) if diff.numel() else 0.0
        ulps = (ordered(got) - ordered(ref)).abs()[finite]
        not_equal = int((ulps > 0).sum())
        over1 = int((ulps > 1).sum())
        max_ulp = int(ulps.max()) if ulps.numel() else 0
        if dtype == torch.float32:
            ok = max_abs < 1e-5
        elif dtype == torch.float8_e4m3fn:  # both sides round to nearest in hardware
            ok = not_equal == 0
        else:
            ok = rel < 1e-2
        ok = ok and not nan_bad and extra_ok
        if nan_bad:
            note = (note + " NaN mismatch").strip()
        self._add(op, case, dtype, max_abs, rel, not_equal, over1, max_ulp, ok, note, n)

    def _add(self, op, case, dtype, max_abs, rel, neq, over1, max_ulp, ok, note, n=0):
        name = {v: k for k, v in DTYPES.items()}.get(dtype, "fp8")
        self.rows.append((op, case, name, n, max_abs, rel, neq, over1, max_ulp, ok, note))
        self.failed += not ok

    def print(self) -> None:
        head = ("op", "case", "dtype", "elems", "max_abs", "max_rel", "!=bits", ">1ulp", "maxulp",
                "ok", "note")
        fmt = "{:<18} {:<26} {:<5} {:>8} {:>10} {:>10} {:>7} {:>6} {:>6} {:<4} {}"
        print(fmt.format(*head))
        for op, case, dt, n, ma, rel, neq, o1, mu, ok, note in self.rows:
            print(fmt.format(op, case, dt, n, f"{ma:.2e}", f"{rel:.2e}", neq, o1, mu,
                             "ok" if ok else "FAIL", note))


def check_rms(rep: Report, device: str, gen: torch.Generator) -> None:
    for dtype in DTYPES.values():
        for t, h in ((1, 4096), (37, 4096), (37, 4000), (5, 1000), (0, 4096)):
            x = torch.randn(t, h, generator=gen).to(dtype).to(device)
            res = torch.randn(t, h, generator=gen).to(dtype).to(device)
            w = (1 + 0.1 * torch.randn(h, generator=gen)).to(dtype).to(device)
            eps = 1e-5
            case = f"T={t} H={h}"
            poison_allocator(t * h, device)
            got = fo.rms_norm(x, w, eps, use_triton=True)
            ref = fo.rms_norm(x, w, eps, use_triton=False)
            rep.compare("rms_norm", case, dtype, got, ref)
            poison_allocator(2 * t * h, device)
            gn, gr = fo.fused_add_rms_norm(x, res, w, eps, use_triton=True)
            rn, rr = fo.fused_add_rms_norm(x, res, w, eps, use_triton=False)
            rep.compare("add_rms.normed", case, dtype, gn, rn)
            rep.compare("add_rms.residual", case, dtype, gr, rr)
    # fp32 weight with bf16 activations: torch promotes the product to fp32.
    x = torch.randn(7, 512, generator=gen).to(torch.bfloat16).to(device)
    w = (1 + 0.1 * torch.randn(512, generator=gen)).to(device)
    rep.compare("rms_norm", "T=7 H=512 fp32 weight", torch.float32,
                fo.rms_norm(x, w, 1e-6, use_triton=True), fo.rms_norm(x, w, 1e-6, use_triton=False))


def check_silu(rep: Report, device: str, gen: torch.Generator) -> None:
    for dtype in DTYPES.values():
        for t, i in ((1, 14336), (37, 3584), (37, 1000), (0, 1024)):
            gu = (2 * torch.randn(t, 2 * i, generator=gen)).to(dtype).to(device)
            poison_allocator(t * i, device)
            got = fo.silu_and_mul(gu, use_triton=True)
            ref = fo.silu_and_mul(gu, use_triton=False)
            rep.compare("silu_and_mul", f"T={t} I={i}", dtype, got, ref)


def check_fp8_out(rep: Report, device: str, gen: torch.Generator) -> None:
    """RMSNorm and SiLU * up with `quant` (their output quantized for the FP8 GEMM in their own
    kernel) against the plain Triton op then kernels/fp8.py's quantize_act: the same e4m3 bits
    (fp8 rows) and scales (fp32 rows), required equal from bf16/fp16 inputs (as measured on an
    H100); from fp32 inputs the norm's sum of squares may be reduced in another order when its
    kernel also quantizes, so a scale may move by a few ulp (measured <= 4 on an H100; within 1e-6
    relative here)."""
    from stage_worker.kernels import fp8_act

    def same(op, case, got, ref):
        rep.compare(op + ".q", case, torch.float8_e4m3fn, got.q, ref.q)
        exact = bool(torch.equal(got.scale, ref.scale))
        near = got.scale.shape == ref.scale.shape and bool(torch.allclose(got.scale, ref.scale, rtol=1e-6, atol=0))
        ok = exact or (dtype == torch.float32 and near)
        rep.compare(op + ".scale", case, torch.float32, got.scale, ref.scale, ok,
                    "" if exact else "fp32: within 1e-6 (sum order)" if ok else "")

    for dtype in DTYPES.values():
        for quant in ("group", "row"):
            for t, h in ((1, 4096), (37, 4096), (37, 4000), (0, 4096)):
                x = torch.randn(t, h, generator=gen).to(dtype).to(device)
                res = torch.randn(t, h, generator=gen).to(dtype).to(device)
                w = (1 + 0.1 * torch.randn(h, generator=gen)).to(dtype).to(device)
                case = f"{quant} T={t} H={h}"
                same("rms_norm+fp8", case, fo.rms_norm(x, w, 1e-5, use_triton=True, quant=quant),
                     fp8_act.quantize_act(fo.rms_norm(x, w, 1e-5, use_triton=True), quant, use_triton=True))
                got, _ = fo.fused_add_rms_norm(x, res, w, 1e-5, use_triton=True, quant=quant)
                plain, _ = fo.fused_add_rms_norm(x, res, w, 1e-5, use_triton=True)
                same("add_rms+fp8", case, got, fp8_act.quantize_act(plain, quant, use_triton=True))
            for t, i in ((1, 14336), (37, 14336), (37, 1000), (0, 1024)):
                gu = (2 * torch.randn(t, 2 * i, generator=gen)).to(dtype).to(device)
                same("silu_and_mul+fp8", f"{quant} T={t} I={i}", fo.silu_and_mul(gu, use_triton=True, quant=quant),
                     fp8_act.quantize_act(fo.silu_and_mul(gu, use_triton=True), quant, use_triton=True))


def check_rotary(rep: Report, device: str, gen: torch.Generator) -> None:
    for dtype in DTYPES.values():
        for n_q, n_kv, d in ((32, 8, 128), (14, 2, 64)):
            for t in (1, 37, 0):
                _rotary_case(rep, device, gen, dtype, dtype, n_q, n_kv, d, t)
    _rotary_case(rep, device, gen, torch.bfloat16, torch.float32, 14, 2, 64, 9)  # fp32 pool
    # --kv-cache-dtype fp8: values to ~+-1000, so the pool saturates at +-448 as the torch path does
    # (bit for bit on a GPU; the interpreter's e4m3 cast rounds some values differently, ~6% here)
    _rotary_case(rep, device, gen, torch.bfloat16, torch.float8_e4m3fn, 32, 8, 128, 37, scale=250.0)


def _rotary_case(rep, device, gen, dtype, cache_dtype, n_q, n_kv, d, t, scale=1.0):
    nh = n_q + 2 * n_kv
    n_slots = 4 * t + 16
    qkv = (torch.randn(t, nh, d, generator=gen) * scale).to(dtype).to(device)
    pos = torch.randint(0, 100_000, (t,), generator=gen).float()
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat([pos[:, None] * inv_freq[None]] * 2, dim=-1)
    cos, sin = emb.cos().to(dtype).to(device), emb.sin().to(dtype).to(device)
    # Distinct slots, except the last rows (padding) that all write one scratch slot.
    slots = torch.randperm(n_slots - 1, generator=gen)[:t]
    n_pad = min(3, t // 4)
    if n_pad:
        slots[-n_pad:] = n_slots - 1
    slots = slots.to(device)
    kc = torch.full((n_slots, n_kv, d), float("nan"), dtype=cache_dtype, device=device)
    vc = torch.full_like(kc, float("nan"))
    case = f"T={t} {n_q}/{n_kv} D={d}" + ("" if cache_dtype == dtype else (" pool fp8" if cache_dtype.itemsize == 1 else " pool fp32"))
    poison_allocator(t * n_q * d, device)
    q = fo.rotary_and_cache(qkv, cos, sin, n_q, n_kv, kc, vc, slots, use_triton=True)
    # Reference per row: unique slots 0..T-1 in a fresh pool.
    rk = torch.full((max(t, 1), n_kv, d), float("nan"), dtype=cache_dtype, device=device)
    rv = torch.full_like(rk, float("nan"))
    ar = torch.arange(t, device=device)
    rq = fo.rotary_and_cache(qkv, cos, sin, n_q, n_kv, rk, rv, ar, use_triton=False)
    rep.compare("rotary.q", case, dtype, q, rq)
    # Each written slot holds, element by element, the value of one of the rows mapped to it:
    # programs of different rows race on a shared (padding) slot, so it may mix rows ("torn").
    slots_c = slots.cpu()
    # FP8 pools upcast on the CPU (exact; torch has no FP8 gather there), compared bit for bit
    kc_c, vc_c, rk_c, rv_c = (x.cpu().float() if x.element_size() == 1 else x.cpu() for x in (kc, vc, rk, rv))
    got_k, ref_k, got_v, ref_v, torn = [], [], [], [], 0
    for s in slots_c.unique().tolist():
        rows = (slots_c == s).nonzero().flatten()
        for got, refs, gl, rl in ((kc_c[s], rk_c[rows], got_k, ref_k), (vc_c[s], rv_c[rows], got_v, ref_v)):
            err = (refs.float() - got.float()[None]).abs().nan_to_num(float("inf"))  # [R, n_kv, D]
            best, idx = err.min(0, keepdim=True)
            torn += int(not (err == best).flatten(1).all(1).any())  # no single row fits everywhere
            gl.append(got), rl.append(refs.gather(0, idx)[0])
    written = torch.zeros(kc.shape[0], dtype=torch.bool)
    written[slots_c] = True
    untouched = bool(kc_c[~written].isnan().all() and vc_c[~written].isnan().all())
    note = "" if untouched else "unwritten slots changed"
    note += f" {n_pad} pad rows->1 slot" if n_pad else ""
    note += f" ({torn} torn)" if torn else ""
    stack = (lambda xs: torch.stack(xs)) if t else (lambda xs: torch.empty(0, n_kv, d, dtype=cache_dtype))
    rep.compare("rotary.k_cache", case, cache_dtype, stack(got_k), stack(ref_k), untouched, note.strip())
    rep.compare("rotary.v_cache", case, cache_dtype, stack(got_v), stack(ref_v), untouched, note.strip())


def check_combine(rep: Report, device: str, gen: torch.Generator) -> None:
    for dtype in DTYPES.values():
        for b, hq, s, d in ((1, 32, 16, 128), (5, 14, 3, 64), (3, 8, 1, 128), (0, 32, 4, 128)):
            part = torch.randn(b, hq, s, d, generator=gen).to(device)
            lse = (3 * torch.randn(b, hq, s, generator=gen)).to(device)
            if s > 1 and b:  # trailing empty splits (short contexts), as the decode kernel writes
                empty = torch.arange(s)[None, :] >= torch.randint(1, s + 1, (b, 1), generator=gen)
                lse[empty.to(device)[:, None, :].expand(b, hq, s)] = float("-inf")
                part[empty.to(device)[:, None, :, None].expand(b, hq, s, d)] = 0.0
            poison_allocator(b * hq * d, device)
            got = fo.combine_splits(part, lse, dtype, use_triton=True)
            ref = fo.combine_splits(part, lse, dtype, use_triton=False)
            rep.compare("combine_splits", f"B={b} Hq={hq} S={s} D={d}", dtype, got, ref)


def check_dispatch(rep: Report, device: str, gen: torch.Generator) -> None:
    """use_triton=None: Triton exactly on CUDA; the torch reference on CPU."""
    x = torch.randn(3, 256, generator=gen).to(device)
    w = torch.ones(256, device=device)
    auto = fo.rms_norm(x, w, 1e-6)
    want = fo.rms_norm(x, w, 1e-6, use_triton=device == "cuda")
    rep.compare("dispatch(auto)", f"device={device}", torch.float32, auto, want,
                bool(torch.equal(auto, want)), "" if torch.equal(auto, want) else "not the expected path")


def check_graph(rep: Report, device: str, gen: torch.Generator) -> None:
    """CUDA only: all five ops captured in one CUDA graph, replayed on new inputs."""
    if device != "cuda":
        return
    dt, t, h, i, n_q, n_kv, d, n_slots = torch.bfloat16, 8, 1024, 2048, 14, 2, 64, 64
    nh = n_q + 2 * n_kv

    def fresh():
        return dict(
            x=torch.randn(t, h, generator=gen).to(dt), res=torch.randn(t, h, generator=gen).to(dt),
            gu=torch.randn(t, 2 * i, generator=gen).to(dt),
            qkv=torch.randn(t, nh, d, generator=gen).to(dt),
            cos=torch.rand(t, d, generator=gen).to(dt), sin=torch.rand(t, d, generator=gen).to(dt),
            slots=torch.randperm(n_slots, generator=gen)[:t],
            part=torch.randn(t, n_q, 4, d, generator=gen), lse=torch.randn(t, n_q, 4, generator=gen))

    static = {k: v.to(device) for k, v in fresh().items()}
    w = torch.ones(h, dtype=dt, device=device)
    kc = torch.zeros(n_slots, n_kv, d, dtype=dt, device=device)
    vc = torch.zeros_like(kc)

    def step():
        s = static
        return (fo.rms_norm(s["x"], w, 1e-5, use_triton=True),
                *fo.fused_add_rms_norm(s["x"], s["res"], w, 1e-5, use_triton=True),
                fo.silu_and_mul(s["gu"], use_triton=True),
                fo.rotary_and_cache(s["qkv"], s["cos"], s["sin"], n_q, n_kv, kc, vc, s["slots"],
                                    use_triton=True),
                fo.combine_splits(s["part"], s["lse"], dt, use_triton=True))

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    new = fresh()
    for k, v in new.items():
        static[k].copy_(v)
    kc.zero_(), vc.zero_()
    graph.replay()
    torch.cuda.synchronize()
    s = {k: v.to(device) for k, v in new.items()}
    rk, rv = torch.zeros_like(kc), torch.zeros_like(vc)
    refs = (fo.rms_norm(s["x"], w, 1e-5, use_triton=False),
            *fo.fused_add_rms_norm(s["x"], s["res"], w, 1e-5, use_triton=False),
            fo.silu_and_mul(s["gu"], use_triton=False),
            fo.rotary_and_cache(s["qkv"], s["cos"], s["sin"], n_q, n_kv, rk, rv, s["slots"],
                                use_triton=False),
            fo.combine_splits(s["part"], s["lse"], dt, use_triton=False))
    names = ("rms_norm", "add_rms.normed", "add_rms.residual", "silu_and_mul", "rotary.q",
             "combine_splits")
    for name, got, ref in zip(names, outs, refs):
        rep.compare("graph." + name, f"T={t} replay", dt, got, ref)
    rep.compare("graph.k_cache", f"T={t} replay", dt, kc, rk)
    rep.compare("graph.v_cache", f"T={t} replay", dt, vc, rv)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-rtne-patch", action="store_true",
                    help="keep the interpreter's truncating float32 -> bf16 cast")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if fo.triton is None:
        print("Triton is not importable: nothing to check")
        return 2
    if device == "cpu" and not interp:
        print("no CUDA device: run with TRITON_INTERPRET=1 to check the kernels on CPU")
        return 2
    patched = interp and not args.no_rtne_patch and patch_interpreter_rtne()
    gen = torch.Generator().manual_seed(args.seed)
    print(f"device={device} torch={torch.__version__} triton={fo.triton.__version__} "
          f"interpreter={interp} rtne_patch={bool(patched)} seed={args.seed}")
    rep = Report()
    for check in (check_rms, check_silu, check_fp8_out, check_rotary, check_combine, check_dispatch,
                  check_graph):
        check(rep, device, gen)
    if device == "cuda":
        torch.cuda.synchronize()
    rep.print()
    print(f"{len(rep.rows) - rep.failed}/{len(rep.rows)} passed")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
