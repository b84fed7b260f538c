"""Soak: a 2-stage mesh under steady concurrent load for --minutes (default 10); prints the RSS of
every process every --interval-s (default 30) and the growth from the first sample to the last,
to show memory flat. Not run in CI.

    python benchmarks/soak.py [--minutes 10] [--concurrency 64] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stagemesh.client import AsyncClient  # noqa: E402
from stagemesh.cli.demo_model import write_demo_model  # noqa: E402
from stagemesh.cli.harness import manual_mesh  # noqa: E402


def rss(procs) -> list[float]:
    return [psutil.Process(p.pid).memory_info().rss / 2**20 for p in procs]


async def drive(target: str, stop_at: float, concurrency: int, max_tokens: int, counts: dict) -> None:
    async with AsyncClient(target) as client:
        async def worker(i: int):
            rng = random.Random(i)
            while time.monotonic() < stop_at:
                ids = [rng.randrange(3, 700) for _ in range(rng.randint(4, 48))]
                try:
                    c = await client.generate(prompt_ids=ids, max_tokens=rng.randint(1, max_tokens),
                                              ignore_eos=True, timeout=120)
                    counts["ok"] += 1
                    counts["tokens"] += len(c.token_ids)
                except grpc.aio.AioRpcError as exc:
                    counts[exc.code().name] = counts.get(exc.code().name, 0) + 1
        await asyncio.gather(*(worker(i) for i in range(concurrency)))


async def report(procs, names, stop_at: float, interval_s: float, counts: dict, samples: list) -> None:
    t0 = time.monotonic()
    while True:
        samples.append(rss(procs))
        print(f"t={time.monotonic() - t0:6.0f}s  " + "  ".join(f"{n}={r:.0f}MB" for n, r in zip(names, samples[-1]))
              + f"  requests={counts['ok']} tokens={counts['tokens']}", flush=True)
        if time.monotonic() >= stop_at:
            return
        await asyncio.sleep(min(interval_s, max(0.0, stop_at - time.monotonic())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--interval-s", type=float, default=30.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = write_demo_model(Path(tmp) / "demo", num_layers=4)
        with manual_mesh(model, stages=2, kv_blocks=1024) as m:
            procs, names = m["procs"], ["coordinator", "stage0", "stage1", "gateway"]
            counts: dict = {"ok": 0, "tokens": 0}
            samples: list = []

            async def run():
                stop_at = time.monotonic() + args.minutes * 60
                await asyncio.gather(drive(m["gateway"], stop_at, args.concurrency, args.max_tokens, counts),
                                     report(procs, names, stop_at, args.interval_s, counts, samples))
            asyncio.run(run())
            time.sleep(2)
            samples.append(rss(procs))
            growth = [b - a for a, b in zip(samples[1 if len(samples) > 2 else 0], samples[-1])]
            print("RSS growth after warm-up (MB): " + "  ".join(f"{n}={g:+.1f}" for n, g in zip(names, growth)))
            print("answers:", counts)


if __name__ == "__main__":
    main()
