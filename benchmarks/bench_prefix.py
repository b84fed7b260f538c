"""Prefix-cache benchmarks (CPU, tiny model, real Redis); ratios from one run.

1. Time to first token of a request whose 2,048-token prefix is cached vs the same request cold.
2. The "shared prefix" workload (BENCHMARKS.md: first 2,048 tokens one of 4 system prompts, then a
   distinct 64-256-token suffix; all submitted at once) on 2 replicas: cache-aware routing vs
   round-robin, throughput and prefix hit rate against the ideal (every request after the first
   of its system prompt reuses all 2,048 prefix tokens).

    python benchmarks/bench_prefix.py [--requests 96] [--routing-weight 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stagemesh.client import AsyncClient  # noqa: E402
from stagemesh.cli.demo_model import write_demo_model  # noqa: E402
from stagemesh.cli.harness import RedisServer, mesh  # noqa: E402

PREFIX = 2048
VOCAB = 760


def ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n)]


async def ttft(address: str, prompt: list[int]) -> float:
    async with AsyncClient(address) as client:
        t = time.perf_counter()
        async for msg in client.stream(prompt_ids=prompt, max_tokens=2, ignore_eos=True, timeout=300):
            if msg.token_ids:
                return time.perf_counter() - t
    raise RuntimeError("no token")


def ttft_ratio(model_dir: Path, reps: int) -> tuple[float, float]:
    rng = random.Random(1)
    with mesh(model_dir, stages=1, extra=["--max-batched-tokens", "2048"]) as m:
        cold, warm = [], []
        for _ in range(reps):
            prefix = ids(rng, PREFIX)
            cold.append(asyncio.run(ttft(m.address, prefix + ids(rng, 16))))
            warm.append(asyncio.run(ttft(m.address, prefix + ids(rng, 16))))
    return statistics.median(cold), statistics.median(warm)


def shared_prefix_workload(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    systems = [ids(rng, PREFIX) for _ in range(4)]
    return [rng.choice(systems) + ids(rng, rng.randrange(64, 257)) for _ in range(n)]


async def run_workload(address: str, prompts: list[list[int]], new: int):
    async with AsyncClient(address) as client:
        t = time.perf_counter()
        outs = await asyncio.gather(*[
            client.generate(prompt_ids=p, max_tokens=new, ignore_eos=True, timeout=900) for p in prompts
        ])
        return time.perf_counter() - t, outs


def workload_run(model_dir: Path, redis_url: str, routing: str, prompts, new: int, kv_blocks: int, running: int,
                 weight: float = 1.0):
    extra = ["--routing", routing, "--routing-weight", str(weight), "--redis", redis_url, "--kv-blocks", str(kv_blocks), "--max-running", str(running),
             "--max-batched-tokens", "1024"]
    with mesh(model_dir, stages=1, replicas=2, extra=extra) as m:
        wall, outs = asyncio.run(run_workload(m.address, prompts, new))
    completion = sum(o.completion_tokens for o in outs)
    hit = sum(o.cached_tokens for o in outs) / sum(o.prompt_tokens for o in outs)
    return completion / wall, hit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--kv-blocks", type=int, default=460,
                    help="per replica: 3 of the 4 system prompts + the running sequences own blocks")
    ap.add_argument("--max-running", type=int, default=4)
    ap.add_argument("--routing-weight", type=float, default=2.0)
    ap.add_argument("--hidden", type=int, default=256, help="model width: prefill cost per token grows with it")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    model_dir = write_demo_model(tmp / "m", num_layers=4, hidden_size=args.hidden, num_heads=8, num_kv_heads=4,
                                 intermediate_size=args.hidden * 11 // 4, max_positions=4096)
    cold, warm = ttft_ratio(model_dir, reps=3)
    prompts = shared_prefix_workload(args.requests)
    ideal = (len(prompts) - 4) * PREFIX / sum(len(p) for p in prompts)
    redis = RedisServer().start()
    try:
        rr_tps, rr_hit = workload_run(model_dir, redis.url, "round_robin", prompts, args.new, args.kv_blocks, args.max_running)
        ca_tps, ca_hit = workload_run(model_dir, redis.url, "cache_aware", prompts, args.new, args.kv_blocks, args.max_running,
                                      args.routing_weight)
    finally:
        redis.close()
    rows = [
        ("TTFT cold, 2,048-token prefix + 16 (ms)", cold * 1e3, ""),
        ("TTFT with the 2,048-token prefix cached (ms)", warm * 1e3, ""),
        ("ratio cached / cold (target <= 0.2)", warm / cold, "met" if warm / cold <= 0.2 else "MISSED"),
        (f"shared prefix, {len(prompts)} req, 2 replicas: round-robin tok/s", rr_tps, ""),
        ("shared prefix: cache-aware tok/s", ca_tps, ""),
        ("ratio cache-aware / round-robin (target >= 1.5)", ca_tps / rr_tps, "met" if ca_tps / rr_tps >= 1.5 else "MISSED"),
        ("prefix hit rate, ideal", ideal, ""),
        ("prefix hit rate, round-robin", rr_hit, ""),
        ("prefix hit rate, cache-aware", ca_hit, ""),
        ("cache-aware hit rate / ideal (target >= 0.9)", ca_hit / ideal, "met" if ca_hit / ideal >= 0.9 else "MISSED"),
    ]
    print(f"{'figure':<62} {'value':>10}")
    for name, v, verdict in rows:
        print(f"{name:<62} {v:>10.3f} {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v, _ in rows}, indent=2))


if __name__ == "__main__":
    main()
