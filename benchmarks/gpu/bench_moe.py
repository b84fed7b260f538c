"""One MoE layer on the GPU: the old torch path against the fused Triton kernels (bf16 and FP8).

    python benchmarks/gpu/bench_moe.py [--shapes v2lite,v3] [--tokens 1,16,64,256,1024,4096] [--json PATH]
    python benchmarks/gpu/bench_moe.py --sweep [--tuning-out FILE]   # tiles per bucket; FILE: the winners

Shapes (random weights drawn on the device; routers with a random correction bias):
- v2lite: DeepSeek-V2-Lite, 64 routed experts top-6 (softmax greedy), hidden 2048, expert
  intermediate 1408, 2 shared experts (one 2816-wide MLP).
- v3: DeepSeek-V3, 256 routed top-8 (sigmoid + bias, top-4 of 8 groups, scale 2.5), hidden
  7168, intermediate 2048, 1 shared expert.

Per token count, the whole layer (router + routed experts + shared experts, bf16 activations):
- old: models/moe.py's torch path, the code DeepseekMoE ran before (sort by expert, index_select,
  bf16 torch._grouped_mm x2, float32 weighting, index_copy back, sum over k);
- fused: the Triton path (routing in torch ops, moe_align_block_size, two fused grouped GEMM
  launches, routed weight in the epilogue), bf16 expert stacks;
- fused_fp8: the same with block-FP8 expert stacks (128x128 scales; activations quantized per
  token in 1x128 groups), shared experts bf16 in every variant;
- graph: `fused` / `fused_fp8` captured in a CUDA graph and replayed (proves no host sync);
- grouped_mm: the two bf16 torch._grouped_mm calls + SiLU alone on pre-sorted rows (the GEMM work
  of `old` without routing, sorting or scatter: a floor for the torch approach).
Effective TB/s counts the expert weights the batch touches (distinct experts hit, plus shared and
router weights) once; TFLOP/s counts 2 * tokens * (k + shared) * 3 * H * I. A correctness check
against a float32 reference runs first for each shape.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.gpu.graph_timing import graphed  # noqa: E402
from stage_worker.kernels import fused_moe, tuning  # noqa: E402
from stage_worker.models.moe import MoESpec, RouterSpec, SparseMoE, grouped_linear  # noqa: E402

SHAPES = {
    "v2lite": dict(hidden=2048, inter=1408, shared=2,
                   router=RouterSpec(64, 6, "softmax", "greedy", scaling=1.0)),
    "v3": dict(hidden=7168, inter=2048, shared=1,
               router=RouterSpec(256, 8, "sigmoid", "noaux_tc", 8, 4, norm_topk_prob=True, scaling=2.5)),
}


class SharedMLP(nn.Module):
    def __init__(self, h: int, i: int):
        super().__init__()
        self.gate_up = nn.Linear(h, 2 * i, bias=False)
        self.down = nn.Linear(i, h, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


def build(shape: str, dev) -> SparseMoE:
    """Built on the meta device, cast to bf16 there, then materialised once on the GPU (a V3
    layer's float32 stacks would take 45 GB)."""
    s = SHAPES[shape]
    h, i = s["hidden"], s["inter"]
    with torch.device("meta"):
        moe = SparseMoE(MoESpec(h, i, s["router"]), SharedMLP(h, i * s["shared"]))
    moe.to(torch.bfloat16)
    moe.gate.fix_dtypes(torch.float32)
    moe.to_empty(device=dev)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
        if hasattr(moe.gate, "e_score_correction_bias"):
            moe.gate.e_score_correction_bias.normal_(0, 0.1)
    return moe


def fp8_copy(moe: SparseMoE) -> SparseMoE:
    """A layer sharing moe's router and shared experts, its expert stacks quantized to FP8."""
    with torch.device("meta"):
        q = SparseMoE(moe.spec)
    q.gate, q.shared_experts = moe.gate, moe.shared_experts
    q.w_gate_up = nn.Parameter(moe.w_gate_up.data, requires_grad=False)  # shared storage: quantize_fp8_
    q.w_down = nn.Parameter(moe.w_down.data, requires_grad=False)  # swaps in new tensors, moe keeps its own
    q.quantize_fp8_()
    q.backend = "triton"
    return q


def bench(fn, reps_ms: int = 100) -> float:
    """Median ms over CUDA events (triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=reps_ms, return_mode="median")


def syncs(fn) -> bool:
    """Does fn synchronise with the host? (torch's sync debug mode raises on it.)"""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return False
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode(0)


def check(moe: SparseMoE, moe8: SparseMoE, dev) -> dict:
    """Relative error (||y - ref|| / ||ref||) against float32 math on the same bf16 weights."""
    out = {}
    for t in (5, 300):
        x = torch.randn(t, moe.spec.hidden, device=dev, dtype=torch.bfloat16)
        w, ids = moe.gate(x)
        ref = fused_moe.fused_experts_torch(x.float(), moe.w_gate_up.float(), moe.w_down.float(), w, ids)
        for name, m in (("old", moe), ("fused", moe), ("fused_fp8", moe8)):
            m.backend = "torch" if name == "old" else "triton"
            y = m.experts(x, w, ids).float()
            out[f"{name}_t{t}"] = float((y - ref).norm() / ref.norm())
        m8 = fused_moe.fused_experts_torch(x, moe8.w_gate_up, moe8.w_down, w, ids, None, None,
                                           moe8.w_gate_up_scale_inv, moe8.w_down_scale_inv)
        y8 = moe8.experts(x, w, ids).float()
        out[f"fused_fp8_vs_fp8_reference_t{t}"] = float((y8 - m8.float()).norm() / m8.float().norm())
    return out


def grouped_mm_only(moe: SparseMoE, x: torch.Tensor, ids: torch.Tensor):
    """The two bf16 grouped GEMMs (+ SiLU) on rows already sorted by expert."""
    k = ids.shape[1]
    flat, order = torch.sort(ids.reshape(-1), stable=True)
    offs = torch.searchsorted(flat, torch.arange(moe.w_gate_up.shape[0], device=x.device), right=True).int()
    xs = x.index_select(0, order // k).contiguous()
    inter = moe.spec.inter

    def run():
        gu = grouped_linear(xs, moe.w_gate_up, offs)
        return grouped_linear(F.silu(gu[:, :inter]) * gu[:, inter:], moe.w_down, offs)
    return run


def measure(shape: str, tokens: list[int], dev) -> dict:
    moe = build(shape, dev)
    moe8 = fp8_copy(moe)
    s, res = SHAPES[shape], {"check": check(moe, moe8, dev), "rows": []}
    h, i, k, e = s["hidden"], s["inter"], s["router"].top_k, s["router"].n_experts
    expert_bytes = 3 * h * i
    shared_bytes = 3 * h * i * s["shared"] * 2 + e * h * 4  # shared bf16 + router fp32
    for t in tokens:
        x = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
        _, ids = moe.gate(x)
        hit = int(torch.unique(ids).numel())
        row = {"tokens": t, "experts_hit": hit}
        moe.backend = "torch"
        row["old_ms"] = bench(lambda: moe(x))
        moe.backend = "triton"
        row["fused_ms"] = bench(lambda: moe(x))
        row["fused_fp8_ms"] = bench(lambda: moe8(x))
        if t <= 256:
            moe.backend = "torch"
            row["old_syncs"] = syncs(lambda: moe(x))
            row["old_graph_ms"] = float("nan") if row["old_syncs"] else bench(graphed(lambda: moe(x)))
            moe.backend = "triton"
            row["fused_syncs"] = syncs(lambda: moe(x)) or syncs(lambda: moe8(x))
            row["fused_graph_ms"] = bench(graphed(lambda: moe(x)))
            row["fused_fp8_graph_ms"] = bench(graphed(lambda: moe8(x)))
        row["grouped_mm_ms"] = bench(grouped_mm_only(moe, x, ids))
        flops = 2 * t * (k + s["shared"]) * expert_bytes
        for name, wbytes in (("old", 2), ("fused", 2), ("fused_fp8", 1)):
            ms = min(row[f"{name}_ms"], row.get(f"{name}_graph_ms", float("inf")))  # graph replay where taken
            moved = hit * expert_bytes * wbytes + shared_bytes + 4 * t * h
            row[f"{name}_TBps"] = moved / ms / 1e9
            row[f"{name}_TFLOPs"] = flops / ms / 1e9
        row["old_over_fused"] = row["old_ms"] / row["fused_ms"]
        row["old_over_fused_fp8"] = row["old_ms"] / row["fused_fp8_ms"]
        res["rows"].append(row)
        print(f"  {shape} T={t}: " + ", ".join(f"{k_}={v:.3g}" for k_, v in row.items() if k_ != "tokens"),
              flush=True)
    del moe, moe8
    torch.cuda.empty_cache()
    return res


# Candidate tiles per rows-per-expert bucket (fused_moe.CONFIGS_* keys): (BM, BN, BK, GROUP_M, warps, stages).
# FP8: BK 256 = two 128-wide quant groups per loop step (two dots in flight, then scaled).
SWEEP = {
    False: {0: [(16, 64, 128, 1, 4, 4), (16, 128, 64, 1, 4, 4), (16, 64, 64, 1, 4, 5), (32, 64, 128, 1, 4, 4)],
            8: [(32, 64, 128, 8, 4, 4), (64, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4), (32, 128, 64, 8, 4, 4)],
            32: [(64, 128, 64, 8, 4, 4), (64, 64, 64, 8, 4, 4), (128, 128, 64, 8, 8, 3), (64, 256, 64, 8, 8, 3)],
            128: [(128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4), (128, 256, 64, 8, 8, 3), (64, 256, 64, 8, 8, 4)]},
    True: {0: [(16, 64, 128, 1, 4, 5), (16, 64, 256, 1, 4, 4), (16, 128, 256, 1, 4, 3), (32, 64, 256, 1, 4, 3)],
           8: [(64, 64, 128, 8, 4, 4), (64, 64, 256, 8, 4, 4), (32, 64, 256, 8, 4, 4), (64, 128, 256, 8, 4, 3)],
           32: [(64, 128, 128, 8, 4, 3), (64, 128, 256, 8, 4, 3), (64, 64, 256, 8, 4, 4), (64, 128, 128, 16, 4, 3),
                (128, 128, 256, 8, 8, 3)],
           128: [(64, 128, 128, 8, 4, 4), (64, 128, 256, 8, 4, 4), (64, 128, 256, 8, 4, 3), (128, 128, 256, 8, 8, 3),
                 (128, 128, 128, 8, 8, 4), (64, 256, 128, 8, 8, 4), (64, 128, 128, 16, 4, 4), (64, 128, 128, 8, 4, 5),
                 (128, 64, 128, 8, 4, 4)]},
}


def sweep(shape: str, tokens: list[int], dev, dtypes: tuple = (False, True)) -> list[dict]:
    """Each candidate tile of the token count's bucket, routed experts only, replayed in a CUDA graph."""
    moe = build(shape, dev)
    moe8 = fp8_copy(moe)
    e = moe.spec.router.n_experts
    rows = []
    for t in tokens:
        x = torch.randn(t, moe.spec.hidden, device=dev, dtype=torch.bfloat16)
        w, ids = moe.gate(x)
        for fp8, m in ((False, moe), (True, moe8)):
            if fp8 not in dtypes:
                continue
            table = fused_moe.CONFIGS_FP8 if fp8 else fused_moe.CONFIGS_16BIT
            bucket = max(b for b in table if b <= t * ids.shape[1] / e)
            # FP8: the table's tile first with a weight scale per column (the kernel before the
            # one-scale-per-K-group load), then every candidate as the kernel runs now
            runs = [(table[bucket], False)] if fp8 else []
            for i, (cfg, scalar) in enumerate(runs + [(c, True) for c in SWEEP[fp8][bucket]]):
                def run(m=m, cfg=cfg):
                    return fused_moe.fused_experts(x, m.w_gate_up, m.w_down, w, ids, None, None, m.w_gate_up_scale_inv,
                                                   m.w_down_scale_inv, m.group_n, config=cfg, use_triton=True)
                fused_moe.SCALAR_WEIGHT_SCALE = scalar
                try:
                    out = run().float()
                    first = out if i == 0 else first
                    ms = bench(graphed(run), 50)
                finally:
                    fused_moe.SCALAR_WEIGHT_SCALE = True
                rows.append({"shape": shape, "tokens": t, "fp8": fp8, "bucket": bucket, "config": cfg, "ms": ms,
                             "scalar_weight_scale": scalar,  # relative difference from the first tile's output
                             "rel_diff": ((out - first).norm() / first.norm()).item()})
            best = min((r for r in rows if r["tokens"] == t and r["fp8"] == fp8 and r["scalar_weight_scale"]),
                       key=lambda r: r["ms"])  # among the kernel as it runs now
            print(f"  {shape} T={t} fp8={fp8} bucket={bucket}: best {best['config']} {best['ms']:.3f} ms; "
                  + " ".join(f"{r['ms']:.3f}" for r in rows if r["tokens"] == t and r["fp8"] == fp8)
                  + "; max rel diff " + f"{max(r['rel_diff'] for r in rows if r['tokens'] == t and r['fp8'] == fp8):.1e}",
                  flush=True)
    del moe, moe8
    torch.cuda.empty_cache()
    return rows


MAX_REL_DIFF = 1e-2  # a tile whose output differs more from the table's tile is never picked


def sweep_tables(rows: list[dict]) -> dict[str, dict[int, tuple]]:
    """The swept buckets' winners as kernel tuning tables ({"fp8"|"16bit": {bucket: tile}}): per
    weight type and bucket, the candidate with the least time summed over every shape and token
    count that fell in the bucket (the kernel as it runs now, outputs within MAX_REL_DIFF); buckets
    not swept keep the shipped tile."""
    tables = {}
    for fp8, kind, shipped in ((True, "fp8", fused_moe.CONFIGS_FP8), (False, "16bit", fused_moe.CONFIGS_16BIT)):
        mine = [r for r in rows if r["fp8"] == fp8 and r["scalar_weight_scale"]]
        if not mine:
            continue
        table = dict(shipped)
        for bucket in sorted({r["bucket"] for r in mine}):
            cases = {(r["shape"], r["tokens"]) for r in mine if r["bucket"] == bucket}
            totals: dict[tuple, float] = {}
            for cfg in {tuple(r["config"]) for r in mine if r["bucket"] == bucket}:
                runs = [r for r in mine if r["bucket"] == bucket and tuple(r["config"]) == cfg]
                if len(runs) == len(cases) and all(r["rel_diff"] <= MAX_REL_DIFF for r in runs):
                    totals[cfg] = sum(r["ms"] for r in runs)
            if totals:
                table[bucket] = min(totals, key=totals.get)
        tables[kind] = table
    return tables


def report(device: str, results: dict) -> None:
    print(f"\nMoE layer on {device} (median ms; g.* = replayed CUDA graph; gmm = the two bf16 grouped GEMMs "
          f"alone; TB/s = weights touched once / time, the graph's where replayed; host syncs: sync debug mode)")
    head = ("shape", "T", "hit", "old", "fused", "fp8", "g.old", "g.fused", "g.fp8", "gmm", "old/fused", "old/fp8",
            "TB/s bf16", "TB/s fp8", "TF/s fp8")
    print(" ".join(f"{c:>9}" for c in head))
    for shape, res in results.items():
        for r in res["rows"]:
            vals = (shape, r["tokens"], r["experts_hit"], r["old_ms"], r["fused_ms"], r["fused_fp8_ms"],
                    r.get("old_graph_ms", float("nan")), r.get("fused_graph_ms", float("nan")),
                    r.get("fused_fp8_graph_ms", float("nan")),
                    r["grouped_mm_ms"], r["old_over_fused"], r["old_over_fused_fp8"], r["fused_TBps"],
                    r["fused_fp8_TBps"], r["fused_fp8_TFLOPs"])
            print(" ".join(f"{v:>9.3f}" if isinstance(v, float) else f"{v:>9}" for v in vals))
        synced = {n: any(r.get(f"{n}_syncs", False) for r in res["rows"]) for n in ("old", "fused")}
        print(f"  {shape} host syncs in a layer call: {synced}")
        print(f"  {shape} accuracy (rel. error vs fp32 math): "
              + ", ".join(f"{k}={v:.2e}" for k, v in res["check"].items()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="v2lite,v3")
    ap.add_argument("--tokens", default="1,16,64,256,1024,4096")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--sweep", action="store_true", help="time candidate tiles instead (fused_moe.CONFIGS_*)")
    ap.add_argument("--sweep-dtypes", default="bf16,fp8", help="the sweep's expert weights: bf16, fp8 or both")
    ap.add_argument("--tuning-out", default="", help="--sweep: write each bucket's best tile (summed over the "
                    "shapes and token counts) into this kernel tuning file (stage_worker/kernels/tuning.py)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    device = torch.cuda.get_device_name(dev)
    tokens = [int(t) for t in args.tokens.split(",")]
    t0, results = time.time(), {}
    for shape in args.shapes.split(","):
        dtypes = tuple({"bf16": False, "fp8": True}[name] for name in args.sweep_dtypes.split(","))
        results[shape] = sweep(shape, tokens, dev, dtypes) if args.sweep else measure(shape, tokens, dev)
    if not args.sweep:
        report(device, results)
    elif args.tuning_out:
        tables = sweep_tables([r for rows in results.values() for r in rows])
        print(f"tuning: {tuning.merge(Path(args.tuning_out), device=device, moe=tables).moe}", flush=True)
    print(f"(total {time.time() - t0:.0f} s; torch {torch.__version__})")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "torch": torch.__version__,
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
