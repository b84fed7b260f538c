"""The FP8 decode GEMV's tiles and scale forms (kernels/fp8.w8a16_gemv: one to four rows).

    python benchmarks/gpu/bench_gemv.py [--out DIR]                 # do_bench per shape
    python benchmarks/gpu/bench_gemv.py --layers [--out DIR] [--tuning-out FILE]   # as a step runs them

Without --layers: M = 1 and 4 at DeepSeek-V3's and Llama-3.1-8B's shapes: bf16 torch.mm, the
tensor-core path (activation quant + kernels/fp8.w8a8_block_gemm, as dispatched before the GEMV)
and every GEMV_CANDIDATES tile (also in the "shared" scale form; at M = 1 also with the other
summation order, `late_sum`), each as GB/s on the weight bytes, with the GEMV's error against
x @ dequant(W)^T; the tile with the least total time over the shapes at the dispatched rows.

--layers: the same tiles and forms, and split-K (2 and 4 programs per N block) on the tiles of
the fewest programs, on the four projections of 8 Llama layers at one row, replayed in one CUDA
graph (do_bench cannot rank tiles at these sizes), bf16 beside; with --tuning-out the fastest
variant's tile, form and split go into a kernel tuning file (stage_worker/kernels/tuning.py) that
`stagemesh up --kernel-tuning FILE` serves with.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.gpu.bench_fp8 import LLAMA8B_SHAPES, SHAPES, bench, rel  # noqa: E402
from benchmarks.gpu.graph_timing import graph_us  # noqa: E402
from stage_worker.kernels import fp8 as k  # noqa: E402
from stage_worker.kernels import tuning  # noqa: E402
from stage_worker.models import quant  # noqa: E402

GEMV_CANDIDATES = [(4, 1024, 4, 2), (8, 512, 4, 3), (8, 1024, 4, 2), (16, 512, 8, 2), (32, 256, 8, 3),
                   (2, 1024, 4, 2), (4, 2048, 4, 2), (8, 2048, 8, 2), (16, 1024, 8, 2), (4, 1024, 2, 3), (8, 1024, 8, 3),
                   (4, 512, 4, 4)]


def gemv_rows() -> dict:
    """Without --layers (the module docstring)."""
    rows, totals, other_totals, shared_totals = [], {}, {}, {}
    for name, (n, kk) in {**SHAPES, **LLAMA8B_SHAPES}.items():
        gen = torch.Generator(device="cuda").manual_seed(n + kk)
        wq, ws = quant.quantize_blocks(torch.randn(n, kk, device="cuda", generator=gen) * 0.02)
        w_deq = quant.dequantize_blocks(wq, ws)
        wb = w_deq.to(torch.bfloat16)
        for m in (1, 4):
            x = torch.randn(m, kk, device="cuda", generator=gen).to(torch.bfloat16)
            ref = x.float() @ w_deq.t()
            gbs = lambda ms, nbytes=n * kk: nbytes / ms / 1e6  # noqa: E731 - ms -> GB/s on the FP8 weight
            r = {"shape": name, "M": m, "N": n, "K": kk, "bf16_GBps_on_bf16": gbs(bench(lambda: torch.mm(x, wb.t())), 2 * n * kk),
                 "tensor_core_GBps": gbs(bench(lambda: k.fp8_gemm(x, wq, ws, 128, "triton")))}
            for cfg in GEMV_CANDIDATES:
                try:
                    ms = bench(lambda: k.w8a16_gemv(x, wq, ws, 128, config=cfg))
                    if k.gemv_scale_fits("shared", 128, cfg[0]):  # x scaled once per group, the alternative
                        shared_ms = bench(lambda: k.w8a16_gemv(x, wq, ws, 128, config=cfg, scale_mode="shared"))
                        r[f"gemv-shared {cfg}"] = gbs(shared_ms)
                        if m <= tuning.active().gemv_max_m:
                            shared_totals[cfg] = shared_totals.get(cfg, 0.0) + shared_ms
                    if m == 1:  # the other summation order, for comparison
                        other_ms = bench(lambda: k.w8a16_gemv(x, wq, ws, 128, config=cfg, late_sum=not tuning.active().gemv_late_sum))
                        r[f"gemv-other-sum {cfg}"] = gbs(other_ms)
                        other_totals[cfg] = other_totals.get(cfg, 0.0) + other_ms
                except Exception as exc:  # a tile that does not compile
                    print(f"  gemv {cfg} failed: {type(exc).__name__}", flush=True)
                    continue
                r[f"gemv {cfg}"] = gbs(ms)
                if m <= tuning.active().gemv_max_m:  # the tile is chosen for the rows it is dispatched at
                    totals[cfg] = totals.get(cfg, 0.0) + ms
            r["gemv_err"] = rel(k.w8a16_gemv(x, wq, ws, 128), ref)
            best = max((v, key) for key, v in r.items() if key.startswith("gemv ("))
            print(f"{name:>15} M={m} N={n:<6} K={kk:<6} GB/s: bf16 {r['bf16_GBps_on_bf16']:6.0f} (bf16 bytes)  "
                  f"tensor-core FP8 {r['tensor_core_GBps']:6.0f}  gemv default {r.get(f'gemv {k.GEMV_CONFIG}', 0):6.0f}  "
                  f"best {best[0]:6.0f} {best[1]}  err {r['gemv_err']:.4f}"
                  + (f"  late_sum={not tuning.active().gemv_late_sum}: default {r.get(f'gemv-other-sum {k.GEMV_CONFIG}', 0):6.0f} "
                     f"best {max(v for key, v in r.items() if key.startswith('gemv-other-sum')):6.0f}"
                     if m == 1 else ""),
                  flush=True)
            rows.append(r)
    best_cfg = min(totals, key=totals.get)
    print("gemv: total ms over the shapes at the dispatched rows: "
          + ", ".join(f"{c} {t:.3f}" for c, t in sorted(totals.items(), key=lambda ct: ct[1])), flush=True)
    print(f"gemv: least total time over the shapes: {best_cfg} ({totals[best_cfg]:.3f} ms; default "
          f"{k.GEMV_CONFIG}: {totals.get(k.GEMV_CONFIG, float('nan')):.3f} ms)", flush=True)
    other = other_totals.get(k.GEMV_CONFIG, float("nan"))
    print(f"gemv: summation at one row, tile {k.GEMV_CONFIG}: late_sum={tuning.active().gemv_late_sum} (default) "
          f"{totals.get(k.GEMV_CONFIG, float('nan')):.3f} ms, late_sum={not tuning.active().gemv_late_sum} {other:.3f} ms", flush=True)
    print(f"gemv: scales, tile {k.GEMV_CONFIG}: grid (default) {totals.get(k.GEMV_CONFIG, float('nan')):.3f} "
          f"ms, shared {shared_totals.get(k.GEMV_CONFIG, float('nan')):.3f} ms", flush=True)
    return {"rows": rows, "best": list(best_cfg), "total_ms": {str(c): t for c, t in totals.items()},
            "other_sum_total_ms": {str(c): t for c, t in other_totals.items()},
            "shared_total_ms": {str(c): t for c, t in shared_totals.items()}}


GEMV_LAYERS = 8  # distinct layers' weights in --layers (1.7 GB of FP8: no L2 reuse between layers)
SPLITS = (2, 4)  # --layers: split-K tried on the tiles of >= SPLIT_MIN_BLOCK_N rows (fewest programs)
SPLIT_MIN_BLOCK_N = 8


def layer_variants() -> list[tuple[tuple, str, int]]:
    """(tile, scale form, split_k) of --layers: every tile in each form that fits, unsplit; the
    tiles of the fewest programs also split."""
    out = []
    for cfg in GEMV_CANDIDATES:
        for mode in [m for m in k.GEMV_SCALE_MODES if k.gemv_scale_fits(m, 128, cfg[0])]:
            splits = (1, *SPLITS) if cfg[0] >= SPLIT_MIN_BLOCK_N else (1,)
            out += [(cfg, mode, s) for s in splits]
    return out


def gemv_layer_rows() -> dict:
    """`--layers`: the GEMVs of batch-1 decode as a step runs them: Llama-3.1-8B's four
    projections (128x128 blocks) over GEMV_LAYERS layers, one row, captured in a CUDA graph and
    replayed, per tile, scale form and split-K (layer_variants, graph_timing); bf16 torch.mm on the
    same weights beside. Microseconds per layer and GB/s of weight bytes; every variant's output
    equal to the shipped one's within fp32 summation order (else reported, never picked)."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    layers = []
    for _ in range(GEMV_LAYERS):
        layer = []
        for n, kk in LLAMA8B_SHAPES.values():
            wq, ws = quant.quantize_blocks(torch.randn(n, kk, device="cuda", generator=gen) * 0.02)
            layer.append((wq, ws))
        layers.append(layer)
    xs = {kk: torch.randn(1, kk, device="cuda", generator=gen).to(torch.bfloat16) for _, kk in LLAMA8B_SHAPES.values()}
    fp8_bytes = sum(n * kk for n, kk in LLAMA8B_SHAPES.values())

    def gemv(layer, cfg, mode, split):
        return [k.w8a16_gemv(xs[wq.shape[1]], wq, ws, 128, config=cfg, scale_mode=mode, split_k=split)
                for wq, ws in layer]

    def run(cfg, mode, split):
        def step():
            for layer in layers:
                gemv(layer, cfg, mode, split)
        return step

    out = {"layers": GEMV_LAYERS, "fp8_bytes_per_layer": fp8_bytes, "us_per_layer": {}, "rel_diff": {}, "variants": {}}
    shipped = (k.GEMV_CONFIG, "grid", 1)
    ref = gemv(layers[0], *shipped)
    for cfg, mode, split in layer_variants():
        key = f"{cfg} {mode} split {split}"
        try:
            us = graph_us(run(cfg, mode, split), calls=3) / GEMV_LAYERS
            got = [gemv(layers[0], cfg, mode, split) for _ in range(2)]  # split-K: the same bits twice
        except Exception as exc:  # a tile that does not compile
            print(f"  gemv {key} failed: {type(exc).__name__}", flush=True)
            continue
        err = max(rel(g, r.float()) for g, r in zip(got[0], ref))  # fp32 summation order only: ~1e-6
        same = all(torch.equal(a, b) for a, b in zip(*got))
        out["rel_diff"][key] = err
        if err <= 1e-3 and same:  # wrong or unrepeatable output is reported, never picked
            out["us_per_layer"][key] = us
            out["variants"][key] = {"gemv": list(cfg), "gemv_scales": mode, "gemv_split_k": split}
        print(f"gemv layers {key:>32}: {us:6.1f} us per layer, {fp8_bytes / us / 1e3:5.0f} GB/s, "
              f"rel diff to shipped {err:.1e}" + ("" if err <= 1e-3 else "  WRONG OUTPUT")
              + ("" if same else "  NOT REPEATABLE"), flush=True)
    layers.clear()  # the FP8 weights freed before the bf16 ones are drawn
    wb = [[torch.randn(n, kk, device="cuda", generator=gen).to(torch.bfloat16) for n, kk in LLAMA8B_SHAPES.values()]
          for _ in range(GEMV_LAYERS)]

    def bf16_step():
        for layer in wb:
            for w in layer:
                torch.mm(xs[w.shape[1]], w.t())
    out["bf16_us_per_layer"] = graph_us(bf16_step, calls=3) / GEMV_LAYERS
    best = min(out["us_per_layer"], key=out["us_per_layer"].get) if out["us_per_layer"] else None
    out["best"] = out["variants"].get(best)  # the tuning fields of the fastest variant
    shipped_key = f"{shipped[0]} {shipped[1]} split {shipped[2]}"
    print(f"gemv layers: bf16 {out['bf16_us_per_layer']:.1f} us per layer ({2 * fp8_bytes / out['bf16_us_per_layer'] / 1e3:.0f}"
          f" GB/s); shipped {shipped_key} {out['us_per_layer'].get(shipped_key, float('nan')):.1f}; "
          f"best {best} {out['us_per_layer'].get(best, float('nan')):.1f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--layers", action="store_true", help="batch-1 GEMVs of 8 Llama-8B layers in a CUDA graph")
    ap.add_argument("--tuning-out", default="", help="--layers: write the best tile, scale form and split-K into "
                    "this kernel tuning file (stage_worker/kernels/tuning.py)")
    args = ap.parse_args()
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    report = {"device": dev, "torch": torch.__version__, "cuda": torch.version.cuda}
    if args.layers:
        report["gemv_layers"] = gemv_layer_rows()
        best, name = report["gemv_layers"]["best"], "bench_gemv_layers.json"
        if args.tuning_out and best:
            tuning.merge(Path(args.tuning_out), device=dev, gemv=tuple(best["gemv"]), gemv_scales=best["gemv_scales"],
                         gemv_split_k=best["gemv_split_k"])
    else:
        report["gemv"], name = gemv_rows(), "bench_gemv.json"
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / name).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
