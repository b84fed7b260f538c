"""Load: 1,000 concurrent streams through a real 2-stage mesh; queue bounds; nothing left behind.

Coordinator, two stage workers and the gateway are separate processes on loopback. After the
load every stage holds zero KV blocks and zero sequences, and the gateway's and workers' RSS is
back near where it was after warm-up.
"""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import psutil
import pytest

from stagemesh.client import AsyncClient
from stagemesh.cli.harness import manual_mesh, wait_kv_free

STREAMS = int(os.environ.get("STAGEMESH_LOAD_STREAMS", "1000"))
RSS_SLACK_MB = 150


def wait_all_free(m, timeout_s: float = 15.0) -> None:
    wait_kv_free(m, timeout_s, sequences=True)


def rss_mb(m) -> list[float]:
    """RSS of the workers and the gateway (procs[1:]; procs[0] is the coordinator)."""
    return [psutil.Process(p.pid).memory_info().rss / 2**20 for p in m["procs"][1:]]


async def _streams(target: str, n: int, max_tokens: int = 4, concurrency: int | None = None):
    """n concurrent streams on one channel; returns (completions, errors by status code)."""
    results, errors = [], {}
    async with AsyncClient(target) as client:
        async def one(i: int):
            try:
                c = await client.generate(prompt_ids=[3 + i % 200, 7, 11 + i % 50], max_tokens=max_tokens,
                                          ignore_eos=True, timeout=120)
                results.append(c)
            except grpc.aio.AioRpcError as exc:
                errors.setdefault(exc.code(), []).append(exc.details())
        await asyncio.gather(*(one(i) for i in range(n)))
    return results, errors


@pytest.fixture(scope="module")
def load_mesh(ckpt_dir):
    model_dir = ckpt_dir("llama", num_layers=4)
    with manual_mesh(model_dir, stages=2, kv_blocks=1024,
                     gateway_args=("--max-running", "256", "--max-batched-tokens", "1024")) as m:
        yield m


def test_1000_concurrent_streams_complete_and_free_everything(load_mesh):
    m = load_mesh
    asyncio.run(_streams(m["gateway"], 64))  # warm-up: imports, allocator pools, gRPC buffers
    wait_all_free(m)
    before = rss_mb(m)
    t0 = time.monotonic()
    results, errors = asyncio.run(_streams(m["gateway"], STREAMS))
    elapsed = time.monotonic() - t0
    assert not errors, {code.name: (len(d), d[0]) for code, d in errors.items()}
    assert len(results) == STREAMS
    assert all(len(c.token_ids) == 4 and c.finish_reason == "length" for c in results)
    wait_all_free(m)
    after = rss_mb(m)
    print(f"\n{STREAMS} streams x 4 tokens in {elapsed:.1f}s ({STREAMS * 4 / elapsed:.0f} tok/s); "
          f"RSS MB before {[round(x) for x in before]} after {[round(x) for x in after]}")
    assert all(a - b < RSS_SLACK_MB for a, b in zip(after, before)), (before, after)
    assert all(p.poll() is None for p in m["procs"])


def test_burst_beyond_the_queue_bound_is_refused_not_buffered(ckpt_dir):
    model_dir = ckpt_dir("llama", num_layers=4)
    with manual_mesh(model_dir, stages=2, kv_blocks=256,
                     gateway_args=("--max-waiting", "16", "--max-running", "8")) as m:
        results, errors = asyncio.run(_streams(m["gateway"], 300, max_tokens=8))
        assert set(errors) == {grpc.StatusCode.RESOURCE_EXHAUSTED}, {c.name: d[0] for c, d in errors.items()}
        assert "queue is full" in errors[grpc.StatusCode.RESOURCE_EXHAUSTED][0]
        assert len(results) >= 16 and len(results) + len(errors[grpc.StatusCode.RESOURCE_EXHAUSTED]) == 300
        assert all(len(c.token_ids) == 8 for c in results)
        wait_all_free(m)
        results, errors = asyncio.run(_streams(m["gateway"], 8))  # and it still serves
        assert not errors and len(results) == 8
