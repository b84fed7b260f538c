"""Component tests of cache_service: a real redis-server and the real process on loopback.

Each test names its own replicas and hashes, so the module shares one Redis and one service.
Redis state is inspected with a plain redis-py client to check the schema, not just the answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import redis

from stagemesh.cache_client import CacheIndexClient, IndexUnavailable
from stagemesh.v1 import cache_pb2, cache_pb2_grpc
from tests.redis_server import redis_server  # noqa: F401  (pytest fixture)

REPO = Path(__file__).resolve().parents[1]
PREFIX = "test:"


class Service:
    """A `python -m cache_service` subprocess; `target` is its gRPC address."""

    def __init__(self, redis_url: str, *extra_args: str) -> None:
        argv = [sys.executable, "-m", "cache_service", "--port", "0", "--redis", redis_url,
                "--key-prefix", PREFIX, "--redis-timeout-s", "0.3", *extra_args]
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
        self.target = f"127.0.0.1:{self._wait_ready(timeout_s=10)}"

    def _wait_ready(self, timeout_s: float) -> int:
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout_s):
                self.proc.kill()
                raise RuntimeError("cache_service printed no ready line")
        line = self.proc.stdout.readline()
        assert "ready" in line, f"unexpected first line {line!r} (exit code {self.proc.poll()})"
        return int(line.rsplit("port=", 1)[1])

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=10)
        self.proc.stdout.close()
        return code


@pytest.fixture(scope="module")
def service(redis_server):  # noqa: F811
    svc = Service(redis_server.url)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def rdb(redis_server):  # noqa: F811
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def holders(rdb: redis.Redis, block_hash: bytes) -> list[bytes]:
    """Replica ids in a block entry (schema: b"<refreshed_at_s>\\0<replica>\\0...")."""
    value = rdb.get(PREFIX.encode() + b"b:" + block_hash)
    return [] if value is None else value.split(b"\0")[1:-1]


def chain(tag: str, n: int) -> list[bytes]:
    """n distinct 16-byte hashes, stable per tag (a stand-in for the gateway's chained hashes)."""
    return [hashlib.blake2b(f"{tag}/{i}".encode(), digest_size=16).digest() for i in range(n)]


def call(service: Service, method: str, *args, **kwargs):
    """Run one client call in a fresh event loop (the tests are synchronous)."""

    async def go():
        async with CacheIndexClient(service.target, timeout_s=2.0) as client:
            return await getattr(client, method)(*args, **kwargs)

    return asyncio.run(go())


def test_walk_stops_at_first_gap(service):
    h = chain("gap", 6)
    call(service, "publish", stored=[("gap/a", x) for x in (h[0], h[1], h[3], h[4])])
    assert call(service, "match", [h]) == [{"gap/a": 2}]
    assert call(service, "match", [h[3:]]) == [{"gap/a": 2}]
    assert call(service, "match", [h[2:]]) == [{}]


def test_walk_crosses_read_chunks(service):
    h = chain("long", 150)
    call(service, "publish", stored=[("long/a", x) for x in h[:130]] + [("long/b", x) for x in h[:64]])
    assert call(service, "match", [h, h[:64], h[:65]]) == [{"long/a": 130, "long/b": 64}] + [{"long/a": 64, "long/b": 64}] + [{"long/a": 65, "long/b": 64}]


def test_remove_one_of_several_holders(service, rdb):
    h = chain("rm3", 1)
    call(service, "publish", stored=[("rm3/a", h[0]), ("rm3/b", h[0]), ("rm3/c", h[0])])
    call(service, "publish", removed=[("rm3/b", h[0])])
    assert holders(rdb, h[0]) == [b"rm3/a", b"rm3/c"]


def test_each_replica_gets_its_own_overlap(service):
    h = chain("multi", 8)
    stored = [("multi/a", x) for x in h] + [("multi/b", x) for x in h[:3]] + [("multi/c", x) for x in h[1:]]
    call(service, "publish", stored=stored)
    assert call(service, "match", [h]) == [{"multi/a": 8, "multi/b": 3}]


def test_events_are_idempotent(service):
    h = chain("idem", 4)
    for _ in range(2):
        call(service, "publish", stored=[("idem/a", x) for x in h])
    call(service, "publish", removed=[("idem/a", x) for x in chain("idem-absent", 3)] + [("idem/nobody", h[0])])
    assert call(service, "match", [h]) == [{"idem/a": 4}]


def test_remove_cuts_the_run(service, rdb):
    h = chain("rm", 5)
    call(service, "publish", stored=[("rm/a", x) for x in h])
    call(service, "publish", removed=[("rm/a", h[2])])
    assert call(service, "match", [h]) == [{"rm/a": 2}]
    assert not rdb.exists(PREFIX.encode() + b"b:" + h[2])
    assert h[2] not in rdb.smembers(PREFIX + "r:rm/a")


def test_stored_then_removed_in_one_batch_ends_absent(service):
    h = chain("order", 2)
    call(service, "publish", stored=[("order/a", x) for x in h], removed=[("order/a", h[1])])
    assert call(service, "match", [h]) == [{"order/a": 1}]


def test_clear_replica_removes_it_everywhere(service, rdb):
    h = chain("clear", 10)
    call(service, "publish", stored=[("clear/a", x) for x in h] + [("clear/b", x) for x in h[:4]])
    assert holders(rdb, h[0]) == [b"clear/a", b"clear/b"]
    assert call(service, "clear_replica", "clear/a") == 10
    assert call(service, "match", [h]) == [{"clear/b": 4}]
    assert holders(rdb, h[0]) == [b"clear/b"]
    assert not rdb.exists(PREFIX + "r:clear/a")
    for x in h:
        assert b"clear/a" not in holders(rdb, x)
    assert not rdb.exists(PREFIX.encode() + b"b:" + h[9]), "a block held by nobody is deleted"
    assert call(service, "clear_replica", "clear/a") == 0


def test_replica_cleared_event_in_a_batch(service):
    h = chain("cleared-event", 3)
    call(service, "publish", stored=[("ce/a@epoch1", x) for x in h])
    call(service, "publish", cleared=["ce/a@epoch1"], stored=[("ce/a@epoch2", h[0])])
    assert call(service, "match", [h]) == [{"ce/a@epoch2": 1}]


def test_batch_of_chains_is_one_redis_call(service, rdb):
    chains = [chain(f"batch{i}", 64) for i in range(16)]
    call(service, "publish", stored=[(f"batch/r{i % 3}", x) for i, c in enumerate(chains) for x in c[: 4 * i]])
    before = rdb.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    answers = call(service, "match", chains + [[]])
    after = rdb.info("commandstats")["cmdstat_evalsha"]["calls"]
    assert after - before == 1
    assert answers == [{f"batch/r{i % 3}": 4 * i} if i else {} for i in range(16)] + [{}]


def test_script_reloaded_after_script_flush(service, rdb):
    h = chain("noscript", 2)
    call(service, "publish", stored=[("noscript/a", x) for x in h])
    rdb.script_flush()
    assert call(service, "match", [h]) == [{"noscript/a": 2}]


def test_client_rejects_hashes_of_the_wrong_size(service):
    with pytest.raises(ValueError, match="16 bytes"):
        call(service, "match", [[b"x" * 16, b"y" * 8]])


@pytest.mark.parametrize("hash_size, packed", [(16, b"x" * 20), (0, b"x" * 16), (65, b"x" * 65)])
def test_malformed_packing_is_invalid_argument(service, hash_size, packed):
    async def go():
        async with grpc.aio.insecure_channel(service.target) as channel:
            request = cache_pb2.MatchRequest(hash_size_bytes=hash_size, chains=[cache_pb2.BlockChain(block_hashes=packed)])
            await cache_pb2_grpc.CacheIndexStub(channel).Match(request, timeout=2)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(go())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hash" in info.value.details()


def test_nul_in_replica_id_is_invalid_argument(service):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        call(service, "publish", stored=[("bad\0id", b"x" * 16)])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_expiry_refreshed_by_match(redis_server, rdb):  # noqa: F811
    svc = Service(redis_server.url, "--block-ttl-s", "2")
    try:
        used, unused = chain("ttl-used", 3), chain("ttl-unused", 3)
        call(svc, "publish", stored=[("ttl/a", x) for x in used + unused])
        keys = [PREFIX.encode() + b"b:" + h for h in used + unused]
        assert 0 < rdb.pttl(keys[0]) <= 2000
        _until(lambda: all(0 <= rdb.pttl(k) < 1000 for k in keys), "half the TTL gone")
        assert call(svc, "match", [used]) == [{"ttl/a": 3}]
        assert rdb.pttl(PREFIX.encode() + b"b:" + used[2]) > 1500
        assert rdb.pttl(PREFIX + "r:ttl/a") > 1500, "the reverse index outlives its blocks"
        _until(lambda: not any(rdb.exists(k) for k in keys[len(used):]), "the unmatched chain expired")
        assert all(rdb.exists(k) for k in keys[:len(used)]), "the matched chain expired with it"
        assert call(svc, "match", [used, unused]) == [{"ttl/a": 3}, {}]
    finally:
        assert svc.stop() == 0


def _until(pred, what: str, timeout_s: float = 10.0) -> None:
    """Poll a Redis-side condition (key TTLs) instead of sleeping a guessed time."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s}s"
        time.sleep(0.02)


def test_redis_outage_is_unavailable_then_recovers(service, redis_server):  # noqa: F811
    h = chain("outage", 3)
    redis_server.stop()
    try:
        with pytest.raises(IndexUnavailable, match="Redis"):
            call(service, "match", [h])
        with pytest.raises(IndexUnavailable):
            call(service, "publish", stored=[("outage/a", x) for x in h])
        assert service.proc.poll() is None, "cache_service must outlive Redis"
    finally:
        redis_server.restart()
    assert call(service, "match", [h]) == [{}]
    call(service, "publish", stored=[("outage/a", x) for x in h])
    assert call(service, "match", [h]) == [{"outage/a": 3}]


def test_unreachable_service_is_index_unavailable():
    async def go():
        async with CacheIndexClient("127.0.0.1:1", timeout_s=0.2) as client:
            await client.match([[b"x" * 16]])

    with pytest.raises(IndexUnavailable):
        asyncio.run(go())


def test_epoch_is_stable_and_changes_when_redis_comes_back_empty(service, redis_server, rdb):  # noqa: F811
    first = call(service, "epoch")
    assert first and call(service, "epoch") == first  # stable while Redis keeps its data
    assert rdb.get(PREFIX + "epoch") == first.encode()
    redis_server.restart()  # empty: no persistence
    again = call(service, "epoch")
    assert again and again != first
    assert call(service, "epoch") == again
