"""The paged decode attention kernel's tiles (kernels/paged_decode.py DECODE_CONFIGS) at the mixed
workload's decode batches: K/V read per microsecond for bf16 and FP8 (e4m3) pools.

    python benchmarks/gpu/bench_decode_attention.py [--out DIR]

Llama-3.1-8B's heads (32 query, 8 KV, head dim 128), block size 16, pages scattered over the pool
as a served batch leaves them; the splits the server picks (choose_splits). Each (shape, pool,
tile) is captured as a CUDA graph of 20 calls and replayed; the figure is the K/V bytes the calls
read over the replay's time (a flash-decoding step is bound by reading the context). Every tile's
output is checked against the shipped tile's (relative error printed; they differ only in the
order of the online softmax's sums).
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

HQ, HKV, D, BS = 32, 8, 128, 16
# (sequences, mean context): the mixed workload's decode steps (256 requests, prompts 64-1023,
# outputs 32-255: ~240 rows at ~600 keys early, ~60 rows at ~800 late) and batch 1.
SHAPES = ((240, 600), (120, 700), (60, 800), (16, 900), (1, 2048))
TILES = ((64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (128, 8, 3), (32, 4, 3), (256, 8, 2))
CALLS = 20


def _case(b: int, mean_ctx: int, pool_dtype: torch.dtype, gen: torch.Generator):
    ctx = torch.randint(mean_ctx // 2, mean_ctx * 3 // 2 + 1, (b,), generator=gen, device="cuda")
    width = -(-int(ctx.max()) // BS)
    blocks = b * width + 8
    kc = torch.randn(blocks * BS, HKV, D, device="cuda", generator=gen).to(pool_dtype)
    vc = torch.randn(blocks * BS, HKV, D, device="cuda", generator=gen).to(pool_dtype)
    tables = torch.randperm(blocks, device="cuda", generator=gen)[: b * width].view(b, width)
    q = torch.randn(b, HQ, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    nbytes = int(ctx.sum()) * HKV * D * 2 * kc.element_size()
    return q, kc, vc, tables, ctx, nbytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for pool_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        shipped = pd.DECODE_CONFIGS[torch.empty(0, dtype=pool_dtype).element_size()]
        for b, mean_ctx in SHAPES:
            q, kc, vc, tables, ctx, nbytes = _case(b, mean_ctx, pool_dtype, gen)
            splits = pd.choose_splits(b, HKV, int(ctx.max()), sms)
            ref = pd.paged_decode(q, kc, vc, tables, ctx, D ** -0.5, BS, splits, config=shipped).float()
            r = {"pool": str(pool_dtype).replace("torch.", ""), "B": b, "mean_ctx": mean_ctx, "splits": splits,
                 "kv_MB": nbytes / 1e6, "shipped": list(shipped)}
            for tile in TILES:
                def call(tile=tile):
                    return pd.paged_decode(q, kc, vc, tables, ctx, D ** -0.5, BS, splits, config=tile)
                try:
                    us = graph_us(call, CALLS)
                    err = float((call().float() - ref).norm() / ref.norm())
                except Exception as exc:  # a tile that does not compile (shared memory)
                    print(f"  tile {tile} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    continue
                r[f"{tile} us"], r[f"{tile} GBps"], r[f"{tile} err"] = us, nbytes / us / 1e3, err
            best = min((r[f"{t} us"], t) for t in TILES if f"{t} us" in r)
            r["best"] = list(best[1])
            print(f"{r['pool']:>13} B={b:<4} ctx~{mean_ctx:<5} splits {splits:<2} K/V {nbytes / 1e6:7.1f} MB  "
                  + "  ".join(f"{t}: {r[f'{t} us']:7.1f}us {r[f'{t} GBps']:5.0f}GB/s"
                              for t in TILES if f"{t} us" in r)
                  + f"  | best {best[1]} ({r[f'{shipped} us'] / best[0]:.2f}x shipped)"
                  + f"  max err {max(r[f'{t} err'] for t in TILES if f'{t} err' in r):.1e}", flush=True)
            rows.append(r)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "best_total": {}}
    for pool in sorted({r["pool"] for r in rows}):  # the tile with the least time summed over the shapes
        mine = [r for r in rows if r["pool"] == pool]
        totals = {t: sum(r[f"{t} us"] for r in mine) for t in TILES if all(f"{t} us" in r for r in mine)}
        best = min(totals, key=totals.get)
        report["best_total"][pool] = list(best)
        print(f"{pool}: least total time {best} {totals[best]:.1f} us; shipped {tuple(mine[0]['shipped'])} "
              f"{totals.get(tuple(mine[0]['shipped']), float('nan')):.1f} us", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_decode_attention.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
