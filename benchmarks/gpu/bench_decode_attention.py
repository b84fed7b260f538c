"""The paged decode attention kernel's tiles (kernels/paged_decode.py DECODE_CONFIG) at the mixed
workload's decode batches: K/V read per microsecond for bf16 and FP8 (e4m3) pools.

    python benchmarks/gpu/bench_decode_attention.py [--out DIR] [--tuning-out FILE]

Llama-3.1-8B's heads (32 query, 8 KV, head dim 128), block size 16, pages scattered over the pool
as a served batch leaves them; the splits a decode step's CUDA graph takes (choose_splits with no
context cap: the graph is captured before the contexts are known), the same for every tile. Each
(shape, pool, tile) is captured as a CUDA graph of 20 calls and replayed, the calls cycling over
disjoint sets of pages that together exceed twice the L2 (as a step's layers each read their
own); the figure is the K/V bytes a call reads over its time (a flash-decoding step is bound by
reading the context). Every tile's output is checked against the shipped tile's: they differ only
in the order of the online softmax's sums, and a tile past MAX_ERR is reported and never picked.
`--tuning-out FILE`: each pool's least-total-time tile into a kernel tuning file (stage_worker/
kernels/tuning.py), which `stagemesh up --kernel-tuning FILE` runs with.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.gpu.graph_timing import graph_us  # noqa: E402
from stage_worker.kernels import paged_decode as pd  # noqa: E402
from stage_worker.kernels import tuning  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 16
# (sequences, mean context): the mixed workload's decode steps (256 requests, prompts 64-1023,
# outputs 32-255: ~240 rows at ~600 keys early, ~60 rows at ~800 late) and batch 1.
SHAPES = ((240, 600), (120, 700), (60, 800), (16, 900), (1, 2048))
TILES = ((64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (128, 8, 3), (32, 4, 3), (256, 8, 2))
CALLS = 20
MAX_ERR = 1e-2  # a tile whose output differs more from the shipped tile's is reported, never picked


def _case(b: int, mean_ctx: int, pool_dtype: torch.dtype, gen: torch.Generator, l2_bytes: int):
    """One batch's queries and contexts over a pool holding `copies` disjoint sets of its pages,
    enough that the calls of one replay, each on the next set, read more than twice the L2 (as
    a step's layers each read their own K/V): HBM is measured, not L2."""
    ctx = torch.randint(mean_ctx // 2, mean_ctx * 3 // 2 + 1, (b,), generator=gen, device="cuda")
    width = -(-int(ctx.max()) // BS)
    nbytes = int(ctx.sum()) * HKV * D * 2 * torch.empty(0, dtype=pool_dtype).element_size()
    copies = max(1, -(-2 * l2_bytes // nbytes))
    blocks = copies * b * width + 8
    kc = torch.randn(blocks * BS, HKV, D, device="cuda", generator=gen).to(pool_dtype)
    vc = torch.randn(blocks * BS, HKV, D, device="cuda", generator=gen).to(pool_dtype)
    tables = torch.randperm(blocks, device="cuda", generator=gen)[: copies * b * width].view(copies, b, width)
    q = torch.randn(b, HQ, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    return q, kc, vc, tables, ctx, nbytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--tuning-out", default="", help="write each pool's best tile into this kernel tuning file")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    sms, l2_bytes = props.multi_processor_count, props.L2_cache_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for pool_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        for b, mean_ctx in SHAPES:
            q, kc, vc, tables, ctx, nbytes = _case(b, mean_ctx, pool_dtype, gen, l2_bytes)
            shipped = pd.DECODE_CONFIG
            splits = pd.choose_splits(b, HKV, None, sms)  # as cuda_graphs.py: the decode steps run as graphs

            def run(tile, table):
                return pd.paged_decode(q, kc, vc, table, ctx, D ** -0.5, BS, splits, config=tile)

            ref = run(shipped, tables[0]).float()
            r = {"pool": str(pool_dtype).replace("torch.", ""), "B": b, "mean_ctx": mean_ctx,
                 "kv_MB": nbytes / 1e6, "table_sets": tables.shape[0], "shipped": list(shipped)}
            for tile in TILES:
                turn = iter(range(1 << 30))

                def call(tile=tile, turn=turn):  # each call of the graph on the next set of pages
                    return run(tile, tables[next(turn) % tables.shape[0]])
                try:
                    us = graph_us(call, CALLS)
                    err = float((run(tile, tables[0]).float() - ref).norm() / ref.norm())
                except Exception as exc:  # a tile that does not compile (shared memory)
                    print(f"  tile {tile} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    continue
                r[f"{tile} us"], r[f"{tile} GBps"], r[f"{tile} err"] = us, nbytes / us / 1e3, err
            timed = [t for t in TILES if f"{t} us" in r and r[f"{t} err"] <= MAX_ERR]
            wrong = [t for t in TILES if f"{t} err" in r and r[f"{t} err"] > MAX_ERR]
            best = min(timed, key=lambda t: r[f"{t} us"]) if timed else None
            r["best"] = list(best) if best else None
            ratio = (f"{r[f'{shipped} us'] / r[f'{best} us']:.2f}x shipped" if best and f"{shipped} us" in r
                     else "shipped not timed")
            print(f"{r['pool']:>13} B={b:<4} ctx~{mean_ctx:<5} K/V {nbytes / 1e6:7.1f} MB x{tables.shape[0]}  "
                  + "  ".join(f"{t}: {r[f'{t} us']:7.1f}us {r[f'{t} GBps']:5.0f}GB/s" for t in TILES if f"{t} us" in r)
                  + f"  | best {best} ({ratio})" + (f"  WRONG OUTPUT: {wrong}" if wrong else ""), flush=True)
            rows.append(r)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "best_total": {}}
    for pool in sorted({r["pool"] for r in rows}):  # the tile with the least time summed over the shapes
        mine = [r for r in rows if r["pool"] == pool]
        totals = {t: sum(r[f"{t} us"] for r in mine) for t in TILES
                  if all(f"{t} us" in r and r[f"{t} err"] <= MAX_ERR for r in mine)}
        if not totals:
            print(f"{pool}: no tile ran every shape correctly", flush=True)
            continue
        best = min(totals, key=totals.get)
        shipped = tuple(mine[0]["shipped"])
        report["best_total"][pool] = list(best)
        print(f"{pool}: least total time {best} {totals[best]:.1f} us; shipped {shipped} "
              f"{totals.get(shipped, float('nan')):.1f} us", flush=True)
    if args.tuning_out and report["best_total"]:
        tuning.merge(Path(args.tuning_out), device=report["device"],
                    decode={pool: tuple(t) for pool, t in report["best_total"].items()})
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_decode_attention.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
