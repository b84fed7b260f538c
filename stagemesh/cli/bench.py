"""`stagemesh bench`: drive a running mesh with a synthetic workload and report latency percentiles.

Each request has random prompt ids (seeded) of a length drawn from `--prompt-len a-b` and asks for
exactly `--output-len a-b` tokens (ignore_eos), so runs are comparable. `--concurrency` requests
are in flight at once over one `AsyncClient` channel. TTFT is measured from sending the request to
the first response carrying tokens; inter-token latency is the gap between token arrivals (tokens
arriving in one message share the gap).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from stagemesh.client import AsyncClient

PERCENTILES = (50, 90, 99)
FIRST_ORDINARY_ID = 10  # skip the ids tokenizers reserve for specials (bos, eos, pad, unk)


def parse_range(text: str) -> tuple[int, int]:
    """'a-b' or 'a' -> (a, b), both >= 1."""
    lo, _, hi = text.partition("-")
    a, b = int(lo), int(hi or lo)
    if not 1 <= a <= b:
        raise ValueError(f"expected a range like 16-64 with 1 <= a <= b, got {text!r}")
    return a, b


@dataclass
class Result:
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


async def _one(client: AsyncClient, request_id: str, prompt_ids: list[int], max_tokens: int, timeout_s: float) -> Result:
    res = Result(prompt_tokens=len(prompt_ids))
    start = last = time.perf_counter()
    try:
        async for msg in client.stream(timeout=timeout_s, prompt_ids=prompt_ids, max_tokens=max_tokens,
                                       ignore_eos=True, request_id=request_id):
            n = len(msg.token_ids)
            if not n:
                continue
            now = time.perf_counter()
            if res.ttft_s is None:
                res.ttft_s = now - start
            else:
                res.itl_s.extend([(now - last) / n] * n)
            last = now
            res.output_tokens += n
    except grpc.aio.AioRpcError as exc:
        res.error = f"{exc.code().name}: {exc.details()}"
    res.e2e_s = time.perf_counter() - start
    return res


async def run_workload(target: str, requests: int, prompt_len: tuple[int, int], output_len: tuple[int, int],
                       concurrency: int, seed: int, timeout_s: float = 600.0) -> dict:
    rng = random.Random(seed)
    async with AsyncClient(target) as client:
        vocab = (await client.list_models(timeout=30))[0].vocab_size
        low = min(FIRST_ORDINARY_ID, vocab - 1)
        work = [([rng.randrange(low, vocab) for _ in range(rng.randint(*prompt_len))], rng.randint(*output_len))
                for _ in range(requests)]
        gate = asyncio.Semaphore(concurrency)

        async def bounded(i: int, prompt_ids: list[int], max_tokens: int) -> Result:
            async with gate:
                return await _one(client, f"bench-{seed}-{i}", prompt_ids, max_tokens, timeout_s)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(i, p, m) for i, (p, m) in enumerate(work)))
        elapsed = time.perf_counter() - start
    return summarize(results, elapsed, concurrency)


def summarize(results: list[Result], elapsed_s: float, concurrency: int) -> dict:
    ok = [r for r in results if not r.error]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)

    def pct_ms(values: list[float]) -> dict:
        if not values:
            return {f"p{p}": None for p in PERCENTILES} | {"mean": None}
        arr = np.asarray(values) * 1e3
        return {f"p{p}": round(float(np.percentile(arr, p)), 3) for p in PERCENTILES} | {
            "mean": round(float(arr.mean()), 3)}

    return {
        "requests": len(results), "failed": len(results) - len(ok), "concurrency": concurrency,
        "duration_s": round(elapsed_s, 3), "prompt_tokens": prompt_tokens, "output_tokens": out_tokens,
        "requests_per_s": round(len(ok) / elapsed_s, 3) if elapsed_s else 0.0,
        "output_tokens_per_s": round(out_tokens / elapsed_s, 3) if elapsed_s else 0.0,
        "total_tokens_per_s": round((out_tokens + prompt_tokens) / elapsed_s, 3) if elapsed_s else 0.0,
        "ttft_ms": pct_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_ms": pct_ms([x for r in ok for x in r.itl_s]),
        "e2e_ms": pct_ms([r.e2e_s for r in ok]),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


def render(s: dict) -> str:
    def row(name: str, d: dict) -> str:
        cells = "  ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in d.items())
        return f"{name:<9} {cells}"

    lines = [
        f"requests: {s['requests']} ({s['failed']} failed), concurrency {s['concurrency']}, "
        f"{s['prompt_tokens']} prompt + {s['output_tokens']} output tokens in {s['duration_s']:.2f} s",
        f"throughput: {s['requests_per_s']:.2f} req/s, {s['output_tokens_per_s']:.1f} output tok/s, "
        f"{s['total_tokens_per_s']:.1f} total tok/s",
        row("TTFT ms", s["ttft_ms"]),
        row("ITL ms", s["itl_ms"]),
        row("E2E ms", s["e2e_ms"]),
    ]
    lines += [f"error: {e}" for e in s["errors"]]
    return "\n".join(lines)


def run(args) -> int:
    try:
        prompt_len, output_len = parse_range(args.prompt_len), parse_range(args.output_len)
        if args.requests < 1 or args.concurrency < 1:
            raise ValueError("--requests and --concurrency must be >= 1")
    except ValueError as exc:
        print(f"stagemesh bench: {exc}")
        return 2
    try:
        summary = asyncio.run(run_workload(args.target, args.requests, prompt_len, output_len, args.concurrency,
                                           args.seed, args.timeout))
    except grpc.aio.AioRpcError as exc:
        print(f"stagemesh bench: {args.target}: {exc.code().name}: {exc.details()}")
        return 1
    print(json.dumps(summary) if args.json else render(summary), flush=True)
    return 1 if summary["failed"] else 0
