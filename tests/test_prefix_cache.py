"""Prefix reuse end to end: outputs with reuse equal transformers; routing follows the cache;
the global index in real Redis is fed, survives a Redis outage and is repopulated after it."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from stagemesh.client import AsyncClient, Client
from stagemesh.cli.harness import mesh
from tests.redis_server import redis_server  # noqa: F401  (fixture)
from tests.reference import hf_greedy, random_prompts

NEW = 8


@pytest.fixture(scope="module")
def model_dir(ckpt_dir):
    return ckpt_dir("llama", num_layers=4)


def test_reuse_equals_transformers_incl_mid_block_concurrent_and_evicted(model_dir):
    base = random_prompts(11, [45], 320)[0]  # 2 full 16-token blocks + 13 tokens: ends mid-block
    sharers = [base + tail for tail in random_prompts(12, [1, 7, 20, 33], 320)]
    others = random_prompts(13, [60, 60, 60, 60, 60, 60], 320)  # enough to evict the shared blocks
    expected = {tuple(p): hf_greedy(model_dir, p, NEW) for p in [base, *sharers, *others]}
    # 24 blocks of 16 tokens: the six 60-token requests alone need 24 blocks.
    with mesh(model_dir, stages=2, extra=["--kv-blocks", "24", "--max-batched-tokens", "32"]) as m:
        with Client(m.address) as client:
            first = client.generate(prompt_ids=base, max_tokens=NEW, timeout=60)
            assert first.token_ids == expected[tuple(base)] and first.cached_tokens == 0

        async def burst(prompts):
            async with AsyncClient(m.address) as c:
                return await asyncio.gather(*[c.generate(prompt_ids=p, max_tokens=NEW, timeout=60) for p in prompts])

        outs = asyncio.run(burst(sharers))  # concurrent requests sharing the cached prefix
        for p, out in zip(sharers, outs):
            assert out.token_ids == expected[tuple(p)]
            assert out.cached_tokens == 32  # the two full blocks of the shared 45 tokens
        for p, out in zip(others, asyncio.run(burst(others))):  # evicts the cached prefix blocks
            assert out.token_ids == expected[tuple(p)]
        with Client(m.address) as client:
            again = client.generate(prompt_ids=sharers[2], max_tokens=NEW, timeout=60)
        assert again.token_ids == expected[tuple(sharers[2])]


def _index_keys(url: str) -> int:
    """Block entries of the index (not its epoch key, which the gateway's poll sets by itself)."""
    return len(redis.Redis.from_url(url).keys("*:b:*"))


def _wait(pred, running=None, timeout_s=30.0):
    """Poll pred until it holds (a failure shows the mesh's last log lines). The deadline is for a
    hang, not a speed check."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, running.stderr_tail(60) if running is not None else ""
        time.sleep(0.1)


def test_two_replicas_route_by_cache_and_survive_redis_outage(model_dir, redis_server):  # noqa: F811
    prefixes = random_prompts(21, [48, 48], 320)
    with mesh(model_dir, stages=1, replicas=2, extra=["--redis", redis_server.url]) as m:
        with Client(m.address) as client:
            for prefix in prefixes:
                client.generate(prompt_ids=prefix + [7], max_tokens=2, timeout=60)
            _wait(lambda: _index_keys(redis_server.url) > 0, m)
            # Follow-ups with the same prefixes land where their blocks are.
            for i, prefix in enumerate(prefixes):
                tail = random_prompts(30 + i, [5], 320)[0]
                out = client.generate(prompt_ids=prefix + tail, max_tokens=NEW, timeout=60)
                assert out.cached_tokens == 48
                assert out.token_ids == hf_greedy(model_dir, prefix + tail, NEW)
            redis_server.stop()
            try:
                for p in random_prompts(40, [20, 30, 50], 320):  # serving goes on without Redis
                    out = client.generate(prompt_ids=p, max_tokens=NEW, timeout=60)
                    assert out.token_ids == hf_greedy(model_dir, p, NEW)
                out = client.generate(prompt_ids=prefixes[0] + [9, 9], max_tokens=2, timeout=60)
                assert out.cached_tokens == 48  # local matching still routes to the holder
            finally:
                redis_server.restart()
            _wait(lambda: _index_keys(redis_server.url) > 0, m)  # repopulated


def test_index_republished_after_redis_restarts_empty_between_calls(model_dir, redis_server):  # noqa: F811
    """No request runs while Redis is down, so no call fails: only the epoch poll can notice."""
    prefix = random_prompts(51, [48], 320)[0]
    redis.Redis.from_url(redis_server.url).flushall()  # only this mesh's entries (the module shares Redis)
    with mesh(model_dir, stages=1, extra=["--redis", redis_server.url, "--log-level", "info"]) as m:
        with Client(m.address) as client:
            client.generate(prompt_ids=prefix + [7], max_tokens=2, timeout=60)
        _wait(lambda: _index_keys(redis_server.url) > 0, m)
        before = _index_keys(redis_server.url)
        redis_server.restart()  # terminated and started again on the same port, empty
        assert _index_keys(redis_server.url) == 0
        _wait(lambda: _index_keys(redis_server.url) >= before, m)  # republished, no request sent
        with Client(m.address) as client:
            out = client.generate(prompt_ids=prefix + [9, 9], max_tokens=NEW, timeout=60)
        assert out.cached_tokens == 48 and out.token_ids == hf_greedy(model_dir, prefix + [9, 9], NEW)
