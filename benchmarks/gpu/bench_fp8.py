"""Block-scaled FP8 GEMM at DeepSeek-V3 shapes, and a real-size dummy V3 stage in FP8 vs bf16.

    python benchmarks/gpu/bench_fp8.py [--out DIR] [--tune] [--skip-stage] [--split-k N[,N...]]
    python benchmarks/gpu/bench_fp8.py --llama [--tune] [--split-k 1,2,4]   # 1. at Llama-3.1-8B's shapes
    python benchmarks/gpu/bench_fp8.py --rowwise [--out DIR]   # 4. per-channel weights, Llama-3.1-8B

1. GEMM (y = x @ W^T, W e4m3 with 128x128 scales, x quantized per token in 1x128 groups on the
   device): bf16 torch.mm on the dequantized weights, torch._scaled_mm's blockwise recipe
   (kernels/fp8.scaled_mm_blockwise) and our Triton kernel (kernels/fp8.w8a8_block_gemm), each
   timed with triton.testing.do_bench (median, L2 flushed) at M in {1, 16, 64, 128, 512, 4096}.
   FP8 times include the activation quant (what a layer pays). Printed: TFLOP/s, ratios, and the
   relative error ||y - ref|| / ||ref|| against an fp32 matmul of the dequantized operands' source
   (x in fp32, W dequantized): the FP8 rows show activation-quant noise, bf16 its rounding.
   `--tune` times every Triton tile candidate per (shape, M) and reports the best per M bucket
   (what kernels/fp8.GEMM_CONFIGS holds).
2. Stage: a V3-shape config (hidden 7168, MLA, 256 routed + 1 shared experts, FP8 config) with
   one dense and one MoE layer, loaded with --load-format dummy on the GPU, FP8 and bf16: weight
   bytes and allocated memory; one prefill of 256 tokens and the FP8 stage's hidden states
   against the same stage run dequantized (FP8 compute vs dequantize-then-run). From the per-layer
   bytes: the 8-layer stage's share (3 dense + 5 MoE + embeddings + head) in FP8 and bf16.
3. `--act-quant`: the 1x128 activation quant's groups per program (`act_quant_rows`).
4. `--rowwise`: Llama-3.1-8B's linears with per-channel weight scales at 1-4,096 rows
   (`rowwise_rows`): quant + rowwise _scaled_mm and the GEMM alone, the per-tensor GEMM, the
   shipped block-scaled dispatch, our GEMV and W8A16 kernels on the per-channel scales, bf16.

The decode GEMV's tiles (one to four rows) are benchmarks/gpu/bench_gemv.py's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from stage_worker.kernels import fp8 as k  # noqa: E402
from stage_worker.kernels import fp8_act as fa  # noqa: E402
from stage_worker.kernels import tuning  # noqa: E402
from stage_worker.models import quant  # noqa: E402
from benchmarks.gpu.checkpoint import V3  # noqa: E402

SHAPES = {  # name: (N, K) of DeepSeek-V3's linears
    "q_a+kv_a": (2112, 7168), "kv_a": (576, 7168), "q_b": (24576, 1536), "o_proj": (7168, 16384),
    "shared gate_up": (4096, 7168), "dense down": (7168, 18432),
}
LLAMA8B_SHAPES = {"llama qkv": (6144, 4096), "llama o": (4096, 4096), "llama gate_up": (28672, 4096),
                  "llama down": (4096, 14336)}
MS = (1, 16, 64, 128, 512, 4096)
LLAMA_MS = (16, 64, 128, 256)  # --llama: the mixed workload's decode batch sizes
CANDIDATES = [(16, 64, 4, 4), (16, 128, 4, 4), (32, 64, 4, 4), (32, 128, 4, 3), (64, 64, 4, 3),
              (64, 128, 4, 3), (64, 128, 8, 4), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 4, 4)]
LLAMA_CANDIDATES = [(16, 64, 4, 4), (16, 128, 4, 4), (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3),
                    (64, 128, 8, 4)]  # --llama --tune: decode-size tiles only


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50)  # ms, median


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


SPLIT_K = (1,)  # --split-k: K slices of the Triton GEMM tried (kernels/fp8.py; 1 when shipped)


def gemm_rows(tune: bool, shapes: dict = SHAPES, ms: tuple = MS) -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for name, (n, kk) in shapes.items():
        gen = torch.Generator(device="cuda").manual_seed(n + kk)
        w = torch.randn(n, kk, device="cuda", generator=gen) * 0.02
        wq, ws = quant.quantize_blocks(w)
        w_deq = quant.dequantize_blocks(wq, ws)
        wb = w_deq.to(torch.bfloat16)
        ws_mm = k.scaled_mm_weight_scale(ws) if k.scaled_mm_ok(n, kk, 128) else None
        for m in ms:
            rows.append(_one(name, m, n, kk, gen, wq, ws, w_deq, wb, ws_mm, tune))
            r = rows[-1]
            print(f"{name:>15} M={m:<5} N={n:<6} K={kk:<6} bf16 {r['bf16_tflops']:7.1f}  "
                  f"scaled_mm {r.get('scaled_mm_tflops', float('nan')):7.1f}  triton {r['triton_tflops']:7.1f} "
                  f"{tuple(r['triton_config'])} split {r['triton_split_k']}  triton/bf16 {r['triton_over_bf16']:.2f}  "
                  f"triton/scaled_mm {r.get('triton_over_scaled_mm', float('nan')):.2f}  "
                  f"w8a16 {r.get('w8a16_tflops', float('nan')):7.1f} {r.get('w8a16_config')} "
                  f"split {r.get('w8a16_split_k')} (prescale={not tuning.active().w8a16_prescale}: "
                  f"{r.get(f'w8a16_prescale_{not tuning.active().w8a16_prescale}_tflops', float('nan')):7.1f})  err bf16 {r['err_bf16']:.4f} triton {r['err_triton']:.4f} "
                  f"w8a16 {r.get('err_w8a16', float('nan')):.4f} "
                  f"scaled_mm {r.get('err_scaled_mm', float('nan')):.4f} kernel-vs-ref {r['err_kernel_vs_reference']:.1e}"
                  + (f" scaled_mm failed: {r['scaled_mm_error']}" if "scaled_mm_error" in r else ""), flush=True)
    return rows


def _sweep(label: str, configs, run) -> tuple | None:
    """(ms, config, split) of the fastest run(config, split) over configs x SPLIT_K; None if none compiled."""
    best = None
    for cfg in configs:
        for split in SPLIT_K:
            try:
                t = bench(lambda: run(cfg, split))
            except Exception as exc:  # a tile that does not compile (shared memory): skip it
                print(f"  config {cfg} split {split} failed ({label}): {type(exc).__name__}", flush=True)
                continue
            if best is None or t < best[0]:
                best = (t, cfg, split)
    return best


def _one(name, m, n, kk, gen, wq, ws, w_deq, wb, ws_mm, tune) -> dict:
    x = torch.randn(m, kk, device="cuda", generator=gen).to(torch.bfloat16)
    ref = x.float() @ w_deq.t()
    flop = 2.0 * m * n * kk
    tf = lambda ms: flop / ms / 1e9  # noqa: E731 - ms -> TFLOP/s
    out = {"shape": name, "M": m, "N": n, "K": kk}
    out["bf16_ms"] = bench(lambda: torch.mm(x, wb.t()))
    out["err_bf16"] = rel(torch.mm(x, wb.t()), ref)
    xq, xs = fa.per_token_group_quant_fp8(x)
    best = _sweep("w8a8", CANDIDATES if tune else [k.gemm_config(m)],
                  lambda cfg, split: k.w8a8_block_gemm(xq, xs, wq, ws, 128, torch.bfloat16, config=cfg, split_k=split))
    out["triton_gemm_ms"], cfg, split = best
    out["triton_config"], out["triton_split_k"] = list(cfg), split
    # The kernel against its torch reference on the same quantized operands (summation order only).
    out["err_kernel_vs_reference"] = rel(k.w8a8_block_gemm(xq, xs, wq, ws, 128, torch.float32, config=cfg),
                                         k.w8a8_block_gemm_torch(xq, xs, wq, ws, 128, torch.float32))

    def triton_path():
        a, s = fa.per_token_group_quant_fp8(x)
        return k.w8a8_block_gemm(a, s, wq, ws, 128, torch.bfloat16, config=cfg, split_k=split)

    out["triton_ms"] = bench(triton_path)
    out["err_triton"] = rel(triton_path(), ref)
    out["act_quant_ms"] = bench(lambda: fa.per_token_group_quant_fp8(x))
    if m <= 512:  # the W8A16 tensor-core form (no activation quant): decode sizes
        best16 = _sweep("w8a16", CANDIDATES if tune else [None],
                        lambda cfg, split: k.w8a16_block_gemm(x, wq, ws, 128, config=cfg, split_k=split))
        if best16 is not None:
            out["w8a16_ms"], cfg16, out["w8a16_split_k"] = best16
            out["w8a16_config"] = list(cfg16) if cfg16 else "default"
            out["w8a16_tflops"] = flop / out["w8a16_ms"] / 1e9
            out["err_w8a16"] = rel(k.w8a16_block_gemm(x, wq, ws, 128, config=cfg16, split_k=out["w8a16_split_k"]), ref)
            other = not tuning.active().w8a16_prescale  # the other form, at the same tile
            out[f"w8a16_prescale_{other}_tflops"] = flop / bench(lambda: k.w8a16_block_gemm(
                x, wq, ws, 128, config=cfg16, split_k=out["w8a16_split_k"], prescale=other)) / 1e9
    if ws_mm is not None:
        try:
            path = lambda: k.fp8_gemm(x, wq, ws, 128, "scaled_mm", ws_mm)  # noqa: E731
            out["err_scaled_mm"] = rel(path(), ref)
            out["scaled_mm_ms"] = bench(path)
            out["scaled_mm_tflops"] = tf(out["scaled_mm_ms"])
            out["triton_over_scaled_mm"] = out["scaled_mm_ms"] / out["triton_ms"]
        except Exception as exc:
            out["scaled_mm_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    out["bf16_tflops"], out["triton_tflops"] = tf(out["bf16_ms"]), tf(out["triton_ms"])
    out["triton_over_bf16"] = out["bf16_ms"] / out["triton_ms"]
    return out


def act_quant_rows() -> list[dict]:
    """1x128 activation quant at decode and prefill row counts of the V3 stage's GEMM inputs:
    the tuning's act_quant_groups per program (1: the kernel before) in GB/s of bf16 read + e4m3 and
    scales written; outputs (row- and column-major scales) checked equal to the shipped setting's."""
    shipped = tuning.active()
    rows = []
    for m in (1, 242, 1936, 4096):
        for kk in (1536, 2048, 7168, 7232, 16384, 18432):  # 7232: a ragged last group
            x = torch.randn(m, kk, device="cuda", dtype=torch.bfloat16)
            ref = fa.per_token_group_quant_fp8(x)
            ref_cm = fa.per_token_group_quant_fp8(x, column_major_scales=True)
            r = {"M": m, "K": kk}
            for groups in (1, 4, 8, 16):
                tuning.use(dataclasses.replace(shipped, act_quant_groups=groups))
                try:
                    for (q, s), (q0, s0) in ((fa.per_token_group_quant_fp8(x), ref),
                                             (fa.per_token_group_quant_fp8(x, column_major_scales=True), ref_cm)):
                        assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s, s0), \
                            f"act quant M={m} K={kk}: {groups} groups per program differ from {shipped.act_quant_groups}"
                    nbytes = 3 * m * kk + 4 * m * fa.cdiv(kk, 128)  # bf16 read, e4m3 and fp32 scales written
                    r[f"groups {groups} GB/s"] = nbytes / bench(lambda: fa.per_token_group_quant_fp8(x)) / 1e6
                finally:
                    tuning.use(shipped)
            print(f"act quant M={m:<5} K={kk:<6} GB/s by groups per program: "
                  + "  ".join(f"{g}: {r[f'groups {g} GB/s']:6.0f}" for g in (1, 4, 8, 16)), flush=True)
            rows.append(r)
    return rows


ROWWISE_MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048, 4096)


def rowwise_rows() -> list[dict]:
    """--rowwise: Llama-3.1-8B's linears with per-channel weight scales (one per output row) and
    per-token activation scales, torch._scaled_mm's rowwise recipe (quant + GEMM, and the GEMM
    alone), beside bf16, the per-tensor recipe (GEMM alone), the shipped block-scaled dispatch, and
    our Triton kernels fed the per-channel scales (GEMV at <= 4 rows, W8A16 tensor-core form);
    microseconds, ratios to bf16, errors against x @ dequant(W)^T in fp32."""
    rows = []
    for name, (n, kk) in LLAMA8B_SHAPES.items():
        gen = torch.Generator(device="cuda").manual_seed(n + kk)
        w = torch.randn(n, kk, device="cuda", generator=gen) * 0.02
        wq, ws = quant.quantize_blocks(w)
        ws_mm = k.scaled_mm_weight_scale(ws)
        w_blk = quant.dequantize_blocks(wq, ws)
        wq_ch, s_ch = quant.quantize_blocks(w, (1, kk))  # per channel: s_ch [N, 1]
        w_ch = quant.dequantize_blocks(wq_ch, s_ch, 1, kk)
        ws_row = s_ch.view(1, n).contiguous()
        ws_grid = s_ch.expand(n, fa.cdiv(kk, 128))  # the block kernels' scale grid at group_n 1, stride 0
        wb = w.to(torch.bfloat16)
        one = torch.ones((), device="cuda")
        for m in ROWWISE_MS:
            x = torch.randn(m, kk, device="cuda", generator=gen).to(torch.bfloat16)
            ref_ch, ref_blk = x.float() @ w_ch.t(), x.float() @ w_blk.t()
            us = lambda fn: bench(fn) * 1e3  # noqa: E731
            r = {"shape": name, "M": m, "N": n, "K": kk, "bf16_us": us(lambda: torch.mm(x, wb.t()))}
            xq, xs = fa.per_token_quant_fp8(x)
            try:
                r["rowwise_us"] = us(lambda: k.scaled_mm_rowwise(*fa.per_token_quant_fp8(x), wq_ch, ws_row))
                r["rowwise_gemm_us"] = us(lambda: k.scaled_mm_rowwise(xq, xs, wq_ch, ws_row))
                r["err_rowwise"] = rel(k.scaled_mm_rowwise(*fa.per_token_quant_fp8(x), wq_ch, ws_row), ref_ch)
                r["tensorwise_gemm_us"] = us(lambda: torch._scaled_mm(xq, wq_ch.t(), scale_a=one, scale_b=one,
                                                                      out_dtype=torch.bfloat16))
            except Exception as exc:
                r["rowwise_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            backend = quant.gemm_backend(m, n, kk, True)
            r["block_backend"] = backend
            r["block_us"] = us(lambda: k.fp8_gemm(x, wq, ws, 128, backend, ws_mm))
            r["err_block"] = rel(k.fp8_gemm(x, wq, ws, 128, backend, ws_mm), ref_blk)
            if m <= k.GEMV_MAX_M:
                r["gemv_channel_us"] = us(lambda: k.w8a16_gemv(x, wq_ch, ws_grid, 1))
                r["err_gemv_channel"] = rel(k.w8a16_gemv(x, wq_ch, ws_grid, 1), ref_ch)
            if m <= 256:
                r["w8a16_channel_us"] = us(lambda: k.w8a16_block_gemm(x, wq_ch, ws_grid, 1))
                r["err_w8a16_channel"] = rel(k.w8a16_block_gemm(x, wq_ch, ws_grid, 1), ref_ch)
            for key in [key for key in r if key.endswith("_us") and key != "bf16_us"]:
                r[key.replace("_us", "_over_bf16")] = r["bf16_us"] / r[key]
            print(f"{name:>13} M={m:<5} us: bf16 {r['bf16_us']:7.1f} | rowwise {r.get('rowwise_us', 0):7.1f} "
                  f"(gemm {r.get('rowwise_gemm_us', 0):7.1f}, x{r.get('rowwise_over_bf16', 0):.2f}) "
                  f"tensorwise gemm {r.get('tensorwise_gemm_us', 0):7.1f} | block[{backend}] {r['block_us']:7.1f} "
                  f"(x{r['block_over_bf16']:.2f}) | gemv-ch {r.get('gemv_channel_us', 0):6.1f} "
                  f"w8a16-ch {r.get('w8a16_channel_us', 0):6.1f} | err row {r.get('err_rowwise', 0):.4f} "
                  f"block {r['err_block']:.4f} gemv-ch {r.get('err_gemv_channel', 0):.4f}"
                  + (f" {r['rowwise_error']}" if "rowwise_error" in r else ""), flush=True)
            rows.append(r)
    return rows


def best_configs(rows: list[dict]) -> dict:
    """Per M: the candidate with the least total GEMM time over the shapes (tuned rows only)."""
    out = {}
    for m in MS:
        votes: dict[tuple, int] = {}
        for r in rows:
            if r["M"] == m:
                votes[tuple(r["triton_config"])] = votes.get(tuple(r["triton_config"]), 0) + 1
        out[m] = max(votes.items(), key=lambda kv: kv[1])[0] if votes else None
    return out


# -- a real-size dummy V3 stage ------------------------------------------------------------------------


def layer_bytes(layer: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def stage_figures() -> dict:
    from stage_worker.loader import load_stage

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, raw in (("fp8", V3), ("bf16", {k_: v for k_, v in V3.items() if k_ != "quantization_config"})):
            d = Path(tmp) / label
            d.mkdir()
            (d / "config.json").write_text(json.dumps(raw))
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()  # the FP8 stage is gone before the bf16 one loads
            model, _ = load_stage(d, 0, 2, device="cuda", load_format="dummy")
            torch.cuda.synchronize()
            fig = {"allocated_bytes": torch.cuda.memory_allocated() - before, "weight_bytes": quant.weight_bytes(model),
                   "dense_layer_bytes": layer_bytes(model.layers["0"]), "moe_layer_bytes": layer_bytes(model.layers["1"]),
                   "embed_bytes": layer_bytes(model.embed_tokens)}
            fig["head_bytes"] = fig["embed_bytes"]  # lm_head [V, H] in the stage dtype, as embed_tokens
            fig["stage8_bytes"] = (fig["embed_bytes"] + fig["head_bytes"] + 3 * fig["dense_layer_bytes"]
                                   + 5 * fig["moe_layer_bytes"])
            try:
                _stage_run(model, label, fig)
            except Exception as exc:  # report the memory figures even if a kernel fails
                fig["run_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            out[label] = fig
            print(label, {k_: (round(v / 2**30, 3) if k_.endswith("bytes") else v) for k_, v in fig.items()}, flush=True)
            del model
    return out


def _stage_run(model, label: str, fig: dict) -> None:
    from stage_worker.attention import AttnMetadata

    ids = torch.randint(3, 129280, (256,), device="cuda")
    kv = model.make_kv_cache(17, 16)
    meta = AttnMetadata.build([(0, 256, list(range(16)))], 16, "cuda")
    h = model(ids, None, meta, kv)
    torch.cuda.synchronize()
    fig["prefill256_ms"] = bench(lambda: model(ids, None, meta, kv))
    fig["finite"] = bool(torch.isfinite(h).all())
    if label == "fp8":
        fig["err_fp8_vs_dequantized"] = _fp8_vs_dequantized(model, ids, meta, kv, h)


def _fp8_vs_dequantized(model, ids, meta, kv, h) -> dict:
    """FP8 compute against dequantize-then-run, layer by layer on the same inputs (every FP8
    linear's output vs F.linear with its dequantized weight; the MoE's experts vs the dequantized
    grouped GEMMs under the same routing), and the stage's output against the whole stage run
    dequantized (there routing flips and attention amplify the per-GEMM noise)."""
    seen: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] = []
    moes = [m for m in model.modules() if hasattr(m, "fp8_prepare") and getattr(m, "fp8", False)]
    hooked = [m for m in model.modules() if isinstance(m, quant.Fp8Linear)] + moes
    handles = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0], out))) for m in hooked]
    model(ids, None, meta, kv)
    for hd in handles:
        hd.remove()
    for m in model.modules():
        if isinstance(m, quant.Fp8Linear):
            m.backend, m._dense = "dequant", m.dense_weight()
    for m in moes:  # one expert at a time: a float32 copy of a whole V3 stack would be 30 GB
        m._dense = tuple(torch.stack([quant.dequantize_blocks(w[e], s[e], gn).to(m.compute_dtype)
                                      for e in range(w.shape[0])])
                         for w, s, gn in ((m.w_gate_up, m.w_gate_up_scale_inv, m.group_n[0]),
                                          (m.w_down, m.w_down_scale_inv, m.group_n[1])))
        m.backend = "torch"
    errs = {}
    for mod, inp, out in seen:
        ref = mod(inp)
        kind = "moe" if mod in moes else "linear"
        errs.setdefault(kind, []).append(rel(out, ref.float()))
    whole = rel(h, model(ids, None, meta, kv).float())
    return {"linear_max": max(errs.get("linear", [0])), "moe_max": max(errs.get("moe", [0])), "stage_output": whole}


def scaled_mm_odd_m() -> dict:
    """torch._scaled_mm's blockwise recipe at M not a multiple of 16 (prefill chunks have any M)."""
    n, kk = 7168, 2048
    w = torch.randn(n, kk, device="cuda") * 0.02
    wq, ws = quant.quantize_blocks(w)
    ws_mm = k.scaled_mm_weight_scale(ws)
    out = {}
    for m in (2, 4, 8, 17, 33, 70, 129, 1000):
        x = torch.randn(m, kk, device="cuda").to(torch.bfloat16)
        try:
            y = k.fp8_gemm(x, wq, ws, 128, "scaled_mm", ws_mm)
            out[m] = f"ok err {rel(y, x.float() @ quant.dequantize_blocks(wq, ws).t()):.4f}"
        except Exception as exc:
            out[m] = f"{type(exc).__name__}: {str(exc)[:80]}"
    print("scaled_mm at odd M:", out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--skip-stage", action="store_true")
    ap.add_argument("--act-quant", action="store_true", help="only the activation quant: groups per program")
    ap.add_argument("--split-k", default="1", help="K slices of the Triton GEMM to try, e.g. 1,2,4 (1: as shipped)")
    ap.add_argument("--llama", action="store_true", help="GEMMs at Llama-3.1-8B's shapes and decode-size M only")
    ap.add_argument("--rowwise", action="store_true", help="Llama-3.1-8B's shapes, per-channel weight scales")
    args = ap.parse_args()
    global SPLIT_K, CANDIDATES
    SPLIT_K = tuple(int(v) for v in args.split_k.split(","))
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"scaled_mm blockwise: {quant.scaled_mm_available(torch.device('cuda'))}", flush=True)
    report = {"device": dev, "torch": torch.__version__, "cuda": torch.version.cuda}

    def save(name: str) -> None:
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / name).write_text(json.dumps(report, indent=1))

    if args.act_quant:
        report["act_quant"] = act_quant_rows()
        return save("bench_fp8_act_quant.json")
    if args.rowwise:
        report["rowwise"] = rowwise_rows()
        return save("bench_fp8_rowwise.json")
    if args.llama:
        CANDIDATES = LLAMA_CANDIDATES
        report["gemm_llama"] = gemm_rows(args.tune, LLAMA8B_SHAPES, LLAMA_MS)
        return save("bench_fp8_llama.json")
    report["scaled_mm_odd_m"] = scaled_mm_odd_m()
    report["gemm"] = gemm_rows(args.tune)
    if args.tune:
        report["best_configs"] = {str(m): c for m, c in best_configs(report["gemm"]).items()}
        print("best Triton config per M:", report["best_configs"], flush=True)
    if not args.skip_stage:
        report["stage"] = stage_figures()
    save("bench_fp8.json")


if __name__ == "__main__":
    main()
