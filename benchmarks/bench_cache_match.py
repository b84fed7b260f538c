"""Prefix look-ups per second of cache_service `Match`, against the Redis baselines of the issue.

Starts a real redis-server and `python -m cache_service`, loads N chains of 64 16-byte hashes
(each held in full by a home replica and in part by one other of 4 replicas), then, per
scenario, drives look-ups of random loaded chains for a fixed time from 1 and from 16
concurrent clients (asyncio tasks of this one process, each cache_service client with its own
channel). Every look-up walks all 64 blocks, the most expensive case. Run side by side:

  grpc Match xB        cache_service Match with B chains per rpc (the service under test)
  index lua xB         PrefixIndex's Match script called directly, B chains per call: the
                       service minus its gRPC hop
  ref pipeline 64      the issue's baseline: redis-py pipeline of 64 HKEYS per chain, then
                       the walk in Python, on a copy of the data in a HASH-per-block schema
  ref lua walk         the issue's other baseline: one Lua call per chain walking that copy
                       with HKEYS and refreshing each visited block with EXPIRE

Look-ups/s counts chains answered; latency is per call. Ratios are against `ref lua walk` from
one client, the issue's ~1,900/s reference. The target: >= 5,000 look-ups/s, p99 <= 5 ms.
Usage: python benchmarks/bench_cache_match.py [--chains 10000] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stagemesh.cache_client import CacheIndexClient  # noqa: E402
from cache_service.config import IndexConfig  # noqa: E402
from cache_service.index import PrefixIndex, pack  # noqa: E402
from stagemesh.cli.harness import RedisServer  # noqa: E402

CHAIN_BLOCKS = 64
REPLICAS = [f"gw0/r{i}@epoch1" for i in range(4)]


@dataclass
class Result:
    name: str
    clients: int
    chains: int
    calls: int
    seconds: float
    latencies_s: list[float]

    @property
    def lookups_per_s(self) -> float:
        return self.chains / self.seconds

    def pct_ms(self, q: float) -> float:
        lat = sorted(self.latencies_s)
        return 1e3 * lat[min(len(lat) - 1, int(q * len(lat)))]


def make_chains(n: int, seed: int) -> list[list[bytes]]:
    rng = random.Random(seed)
    return [[hashlib.blake2b(f"{seed}/{c}/{i}/{rng.random()}".encode(), digest_size=16).digest()
             for i in range(CHAIN_BLOCKS)] for c in range(n)]


def place(chains: list[list[bytes]], seed: int) -> list[tuple[str, list[bytes]]]:
    """Each chain in full on a home replica and a random prefix of it on one other replica."""
    rng = random.Random(seed)
    placements = []
    for c, chain in enumerate(chains):
        home, other = REPLICAS[c % 4], REPLICAS[(c + 1 + rng.randrange(3)) % 4]
        placements += [(home, chain), (other, chain[: rng.randrange(CHAIN_BLOCKS)])]
    return placements


async def load(target: str, placements: list[tuple[str, list[bytes]]]) -> None:
    async with CacheIndexClient(target, timeout_s=30) as client:
        for start in range(0, len(placements), 200):
            await client.publish(stored=[(r, h) for r, hashes in placements[start : start + 200] for h in hashes])


async def drive(name: str, clients: int, batch: int, seconds: float, make_caller, chains, seed: int) -> Result:
    """Run `clients` loops of `await call(batch of chains)` for `seconds` after a short warm-up."""
    callers = [await make_caller() for _ in range(clients)]
    latencies: list[float] = []
    counts = [0, 0]  # chains, calls
    measuring = False

    async def loop(call, rng: random.Random, deadline: float) -> None:
        while (now := time.perf_counter()) < deadline:
            picked = [chains[rng.randrange(len(chains))] for _ in range(batch)]
            await call(picked)
            if measuring:
                latencies.append(time.perf_counter() - now)
                counts[0] += batch
                counts[1] += 1

    start = time.perf_counter()
    warm_end, end = start + 0.5, start + 0.5 + seconds
    tasks = [asyncio.create_task(loop(c.call, random.Random(seed + i), end)) for i, c in enumerate(callers)]
    await asyncio.sleep(max(0.0, warm_end - time.perf_counter()))
    measuring, t0 = True, time.perf_counter()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    for c in callers:
        await c.close()
    return Result(name, clients, counts[0], counts[1], elapsed, latencies)


class GrpcCaller:
    def __init__(self, target: str) -> None:
        self.client = CacheIndexClient(target, timeout_s=5)

    async def call(self, batch):
        return await self.client.match(batch)

    async def close(self):
        await self.client.close()


REF_PREFIX = b"ref:b:"

# The reference schema: HASH ref:b:<hash> {replica_id: 1}. ARGV: hash_len, blob, replica, ...
_REF_LOAD = """
local hlen, blob = tonumber(ARGV[1]), ARGV[2]
for e = 3, #ARGV, 2 do
  local replica, hashes = ARGV[e], ARGV[e + 1]
  for pos = 1, #hashes, hlen do
    local key = 'ref:b:' .. string.sub(hashes, pos, pos + hlen - 1)
    redis.call('HSET', key, replica, 1)
    redis.call('EXPIRE', key, 3600)
  end
end
"""

# One chain per call: walk with HKEYS, refresh each visited block. ARGV: the chain's hashes.
_REF_WALK = """
local depth, alive = {}, nil
for i = 1, #ARGV do
  local key = 'ref:b:' .. ARGV[i]
  local still, any = {}, false
  for _, r in ipairs(redis.call('HKEYS', key)) do
    if alive == nil or alive[r] then still[r] = true; any = true end
  end
  if not any then break end
  redis.call('EXPIRE', key, 3600)
  for r in pairs(still) do depth[r] = i end
  alive = still
end
local out = {}
for r, d in pairs(depth) do out[#out + 1] = r; out[#out + 1] = d end
return out
"""


class SharedCaller:
    """Concurrent tasks share one redis-py client (its pool), as a gateway would."""

    def __init__(self, call) -> None:
        self.call = call

    async def close(self) -> None:
        pass


def shared_caller(call):
    async def make():
        return SharedCaller(call)

    return make


def ref_pipeline_caller(client: aioredis.Redis):
    async def call(batch):
        for chain in batch:
            pipe = client.pipeline(transaction=False)
            for h in chain:
                pipe.hkeys(REF_PREFIX + h)
            walk_in_python([set(keys) for keys in await pipe.execute()])

    return shared_caller(call)


def ref_lua_caller(client: aioredis.Redis):
    script = client.register_script(_REF_WALK)

    async def call(batch):
        for chain in batch:
            await script(args=chain)

    return shared_caller(call)


async def load_reference(client: aioredis.Redis, placements: list[tuple[str, list[bytes]]]) -> None:
    script = client.register_script(_REF_LOAD)
    for start in range(0, len(placements), 200):
        args: list = [16, b""]
        for replica, hashes in placements[start : start + 200]:
            args += [replica, b"".join(hashes)]
        await script(args=args)


def walk_in_python(holders: list[set]) -> dict[bytes, int]:
    depth: dict[bytes, int] = {}
    alive = None
    for i, members in enumerate(holders):
        still = members if alive is None else alive & members
        if not still:
            break
        for r in still:
            depth[r] = i + 1
        alive = still
    return depth


def index_caller(index: PrefixIndex):
    async def call(batch):
        return await index.match([pack(chain) for chain in batch], hash_size_bytes=16)

    return shared_caller(call)


def start_service(redis_url: str) -> tuple[subprocess.Popen, str]:
    argv = [sys.executable, "-m", "cache_service", "--port", "0", "--redis", redis_url, "--log-level", "warning"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(15):
            proc.kill()
            raise RuntimeError("cache_service did not become ready")
    line = proc.stdout.readline()
    return proc, f"127.0.0.1:{int(line.rsplit('port=', 1)[1])}"


def print_table(results: list[Result], reference: Result) -> None:
    print(f"\n{'scenario':<22}{'clients':>8}{'look-ups/s':>12}{'calls/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'x ref':>8}  target")
    for r in results:
        ok = r.lookups_per_s >= 5000 and r.pct_ms(0.99) <= 5.0
        print(f"{r.name:<22}{r.clients:>8}{r.lookups_per_s:>12,.0f}{r.calls / r.seconds:>10,.0f}"
              f"{r.pct_ms(0.5):>9.2f}{r.pct_ms(0.99):>9.2f}{r.lookups_per_s / reference.lookups_per_s:>8.2f}"
              f"  {'met' if ok else '-'}")
    print("\nx ref = look-ups/s relative to 'ref lua walk' from 1 client; target = >= 5,000/s and p99 <= 5 ms")


async def run(args) -> None:
    redis_server = RedisServer().start()
    proc, target = start_service(redis_server.url)
    index = PrefixIndex(IndexConfig(redis_url=redis_server.url, max_connections=32))
    try:
        chains = make_chains(args.chains, args.seed)
        placements = place(chains, args.seed)
        t = time.perf_counter()
        await load(target, placements)
        print(f"loaded {len(chains):,} chains x {CHAIN_BLOCKS} blocks over {len(REPLICAS)} replicas "
              f"in {time.perf_counter() - t:.1f} s via Publish")
        ref_client = aioredis.Redis.from_url(redis_server.url, max_connections=32)
        await load_reference(ref_client, placements)
        scenarios = [("ref lua walk", 1, ref_lua_caller(ref_client)),
                     ("ref pipeline 64", 1, ref_pipeline_caller(ref_client))]
        scenarios += [(f"index lua x{b}", b, index_caller(index)) for b in (1, 16)]
        scenarios += [(f"grpc Match x{b}", b, lambda: _grpc_make(target)) for b in (1, 8, 16, 32)]
        await check_answers(target, ref_client, chains[:200])
        results = []
        for clients in (1, 16):
            for name, batch, make in scenarios:
                results.append(await drive(name, clients, batch, args.seconds, make, chains, args.seed))
                r = results[-1]
                print(f"  {name:<20} clients={clients:<3} {r.lookups_per_s:>9,.0f} look-ups/s  p99 {r.pct_ms(0.99):.2f} ms",
                      flush=True)
        await ref_client.aclose()
        print_table(results, results[0])
    finally:
        await index.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        redis_server.close()


async def check_answers(target: str, ref_client: aioredis.Redis, chains: list[list[bytes]]) -> None:
    """Never time wrong answers: the service must agree with the reference walk."""
    script = ref_client.register_script(_REF_WALK)
    async with CacheIndexClient(target, timeout_s=5) as client:
        got = await client.match(chains)
    for chain, answer in zip(chains, got):
        flat = await script(args=chain)
        expected = {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}
        assert answer == expected and max(answer.values()) == CHAIN_BLOCKS, (answer, expected)


async def _grpc_make(target: str) -> GrpcCaller:
    return GrpcCaller(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
