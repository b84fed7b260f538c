"""The Redis schema of the global prefix index, and `PrefixIndex`, its only reader and writer.

Data flow: gateways publish block events (stored / removed / replica cleared) and, once per
scheduling tick, ask for the overlap of a batch of hash chains. Each rpc becomes exactly one
Redis call, a Lua script run by EVALSHA, so its cost does not grow with round trips per hash.

Schema (P = `IndexConfig.key_prefix`, default "sm:v1:"; hashes are raw bytes, binary-safe):

    P b:<hash>        SET of replica ids holding the block        TTL block_ttl_s
    P r:<replica_id>  SET of block hashes the replica holds       TTL block_ttl_s
                      (reverse index, so clearing a replica is one call)

* Store: SADD replica to `b:<hash>`, SADD hash to `r:<replica>`, refresh both TTLs.
* Remove: SREM from both sets (Redis deletes a set when it empties). Both are idempotent.
* Clear: for each hash in `r:<replica>`, SREM the replica from `b:<hash>`; DEL `r:<replica>`.
* Match walks a chain h_0, h_1, ... keeping the replicas whose run is still unbroken, and stops
  at the first block none of them holds: per chain, per replica, the number of leading blocks
  it holds. Every block key it visits gets its TTL refreshed, and so does the reverse index of
  every replica seen in one, which keeps this invariant: a replica's reverse index outlives each
  of its block entries, so a Clear never misses one.

A block entry of a replica that expired on its own stays in that replica's reverse index until
the replica is cleared or its reverse index expires; clearing such a hash is a harmless no-op.
Block keys are computed inside the scripts (not passed as KEYS), so the schema needs one Redis
node, not Redis Cluster. A script blocks Redis while it runs, which is why request sizes are
bounded (`CacheServiceConfig`) and why clearing a replica with very many blocks is not free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cache_service.config import IndexConfig
from stagemesh.errors import InvalidArgument, Unavailable

MAX_HASH_BYTES = 64

# `clear(prefix, replica)` is shared by the Publish and ClearReplica scripts.
_CLEAR_FUNCTION = """
local function clear(prefix, replica)
  local rkey = prefix .. 'r:' .. replica
  local hashes = redis.call('SMEMBERS', rkey)
  for _, h in ipairs(hashes) do
    redis.call('SREM', prefix .. 'b:' .. h, replica)
  end
  redis.call('DEL', rkey)
  return #hashes
end
"""

# ARGV: prefix, ttl_s, hash_len, then per event: op ('s' stored, 'r' removed, 'c' cleared),
# replica_id, the event's hashes concatenated. Events are applied in order.
_PUBLISH_SCRIPT = _CLEAR_FUNCTION + """
local prefix, ttl, hlen = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for e = 4, #ARGV, 3 do
  local op, replica, blob = ARGV[e], ARGV[e + 1], ARGV[e + 2]
  local rkey = prefix .. 'r:' .. replica
  if op == 'c' then
    clear(prefix, replica)
  else
    for pos = 1, #blob, hlen do
      local h = string.sub(blob, pos, pos + hlen - 1)
      local bkey = prefix .. 'b:' .. h
      if op == 's' then
        redis.call('SADD', bkey, replica)
        redis.call('EXPIRE', bkey, ttl)
        redis.call('SADD', rkey, h)
      else
        redis.call('SREM', bkey, replica)
        redis.call('SREM', rkey, h)
      end
    end
    if op == 's' then redis.call('EXPIRE', rkey, ttl) end
  end
end
return (#ARGV - 3) / 3
"""

# ARGV: prefix, replica_id. Returns the number of block entries removed.
_CLEAR_SCRIPT = _CLEAR_FUNCTION + "return clear(ARGV[1], ARGV[2])\n"

# ARGV: prefix, ttl_s, hash_len, all chains' hashes concatenated, then each chain's length.
# Returns, per chain, k followed by k (replica_id, matched_blocks) pairs.
_MATCH_SCRIPT = """
local prefix, ttl, hlen, blob = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local out, seen, pos = {}, {}, 1
for c = 5, #ARGV do
  local n = tonumber(ARGV[c])
  local depth, alive = {}, nil
  for i = 0, n - 1 do
    local start = pos + i * hlen
    local bkey = prefix .. 'b:' .. string.sub(blob, start, start + hlen - 1)
    local holders = redis.call('SMEMBERS', bkey)
    local still, any = {}, false
    for _, r in ipairs(holders) do
      if alive == nil or alive[r] then still[r] = true; any = true end
    end
    if not any then break end
    redis.call('EXPIRE', bkey, ttl)
    for _, r in ipairs(holders) do seen[r] = true end
    for r in pairs(still) do depth[r] = i + 1 end
    alive = still
  end
  pos = pos + n * hlen
  local count_at = #out + 1
  out[count_at] = 0
  for r, d in pairs(depth) do
    out[#out + 1] = r
    out[#out + 1] = d
    out[count_at] = out[count_at] + 1
  end
end
for r in pairs(seen) do redis.call('EXPIRE', prefix .. 'r:' .. r, ttl) end
return out
"""


@dataclass(frozen=True)
class BlockStored:
    """`replica_id` now holds full KV blocks with these hashes."""

    replica_id: str
    block_hashes: Sequence[bytes]


@dataclass(frozen=True)
class BlockRemoved:
    """`replica_id` evicted the blocks with these hashes."""

    replica_id: str
    block_hashes: Sequence[bytes]


@dataclass(frozen=True)
class ReplicaCleared:
    """`replica_id` holds nothing any more (restart or new plan epoch)."""

    replica_id: str


BlockEvent = Union[BlockStored, BlockRemoved, ReplicaCleared]


class PrefixIndex:
    """Owner of the Redis schema above; every method is one Redis round trip.

    Safe to call concurrently from one event loop (the pool hands each call its own
    connection). Redis being unreachable raises `stagemesh.errors.Unavailable`; the pool
    reconnects on a later call, so the index recovers by itself when Redis comes back.
    """

    def __init__(self, config: IndexConfig) -> None:
        self._config = config
        self._redis = redis.Redis.from_url(
            config.redis_url,
            socket_timeout=config.redis_timeout_s,
            socket_connect_timeout=config.redis_timeout_s,
            max_connections=config.max_connections,
            # One quick retry replaces a pooled connection that died with a restarted Redis;
            # more would only delay the UNAVAILABLE the gateway needs to fall back.
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
        )
        self._publish_script = self._redis.register_script(_PUBLISH_SCRIPT)
        self._match_script = self._redis.register_script(_MATCH_SCRIPT)
        self._clear_script = self._redis.register_script(_CLEAR_SCRIPT)

    async def close(self) -> None:
        await self._redis.aclose()

    async def publish(self, events: Sequence[BlockEvent]) -> int:
        """Apply `events` in order, atomically; returns how many were applied."""
        if not events:
            return 0
        hash_len = _common_hash_len(e.block_hashes for e in events if not isinstance(e, ReplicaCleared))
        args: list = [self._config.key_prefix, self._config.block_ttl_s, hash_len]
        for event in events:
            args.extend(_event_args(event))
        return int(await self._run(self._publish_script, args))

    async def match(self, chains: Sequence[Sequence[bytes]]) -> list[dict[str, int]]:
        """Per chain, {replica_id: leading blocks held}; replicas with no overlap are absent."""
        if not chains:
            return []
        hash_len = _common_hash_len(chains)
        blob = b"".join(b"".join(chain) for chain in chains)
        args = [self._config.key_prefix, self._config.block_ttl_s, hash_len, blob]
        args.extend(len(chain) for chain in chains)
        return _parse_match(await self._run(self._match_script, args), len(chains))

    async def clear_replica(self, replica_id: str) -> int:
        """Forget every block of `replica_id`; returns the number of entries removed."""
        _check_replica_id(replica_id)
        return int(await self._run(self._clear_script, [self._config.key_prefix, replica_id]))

    async def _run(self, script, args: list):
        """EVALSHA (loading the script on NOSCRIPT, e.g. after a Redis restart)."""
        try:
            return await script(args=args)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise Unavailable(
                f"prefix index unavailable: Redis at {self._config.redis_url} did not answer ({exc}); "
                "fall back to local prefix matching and retry later"
            ) from exc


def _event_args(event: BlockEvent) -> tuple:
    """The (op, replica_id, hashes) triple the publish script reads for one event."""
    _check_replica_id(event.replica_id)
    if isinstance(event, BlockStored):
        return ("s", event.replica_id, b"".join(event.block_hashes))
    if isinstance(event, BlockRemoved):
        return ("r", event.replica_id, b"".join(event.block_hashes))
    if isinstance(event, ReplicaCleared):
        return ("c", event.replica_id, b"")
    raise InvalidArgument(f"unknown block event {event!r}")


def _common_hash_len(groups) -> int:
    """The one hash length of a request; the scripts slice concatenated hashes by it."""
    lengths: set[int] = set()
    for group in groups:
        lengths.update(map(len, group))
    if len(lengths) > 1:
        raise InvalidArgument(f"all block hashes of one request must have the same length, got {sorted(lengths)}")
    hash_len = lengths.pop() if lengths else 1
    if not 1 <= hash_len <= MAX_HASH_BYTES:
        raise InvalidArgument(f"block hashes must be 1..{MAX_HASH_BYTES} bytes, got {hash_len}")
    return hash_len


def _check_replica_id(replica_id: str) -> None:
    if not replica_id:
        raise InvalidArgument("replica_id must not be empty")


def _parse_match(flat: list, n_chains: int) -> list[dict[str, int]]:
    """Undo the match script's flat encoding: per chain, k then k (replica, depth) pairs."""
    result: list[dict[str, int]] = []
    i = 0
    for _ in range(n_chains):
        k = flat[i]
        pairs = flat[i + 1 : i + 1 + 2 * k]
        result.append({pairs[j].decode(): pairs[j + 1] for j in range(0, 2 * k, 2)})
        i += 1 + 2 * k
    return result
