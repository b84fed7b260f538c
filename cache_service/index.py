"""The Redis schema of the global prefix index, and `PrefixIndex`, its only reader and writer.

Data flow: gateways publish block events (stored / removed / replica cleared) and, once per
scheduling tick, ask for the overlap of a batch of hash chains. Each rpc becomes exactly one
Redis call, a Lua script run by EVALSHA, so its cost does not grow with round trips per hash.

Schema (P = `IndexConfig.key_prefix`, default "sm:v1:"; hashes are raw bytes, binary-safe):

    P b:<hash>        STRING "<refreshed_at_s>\0<replica>\0<replica>\0..."   TTL block_ttl_s
                      the replicas holding the block, and when its TTL was last set
    P r:<replica_id>  SET of the block hashes the replica holds                 TTL block_ttl_s
                      (reverse index, so clearing a replica is one call)
    P epoch           STRING, a random token set by the first GetEpoch that finds none   no TTL
                      (a Redis restarted empty or flushed loses it: gateways see a new epoch
                      and republish their whole index)

Why a string and not a SET per block: Match reads a whole chain with one MGET and tests
membership with a plain substring search, ~8x cheaper inside Redis than 64 SMEMBERS whose
replies Lua must turn into tables; Match is the hot path, events are not.

* Store: add the replica to `b:<hash>` (if absent), SADD the hash to `r:<replica>`, reset both TTLs.
* Remove: drop the replica from `b:<hash>` (deleting the key when none is left), SREM the hash.
  Storing and removing are idempotent.
* Clear: for each hash in `r:<replica>`, remove as above; DEL `r:<replica>`.
* Match reads a chain h_0, h_1, ... in MGETs of 64 keys, keeping the replicas whose run is
  still unbroken, and stops at the first block none of them holds: per chain, per replica, the
  number of leading blocks it holds.

Expiry is refreshed on use, at most once per `IndexConfig.refresh_interval_s` (block_ttl_s / 8)
per block, so a hot chain costs one MGET, not 64 EXPIREs: a matched block rewritten with a new
`refreshed_at_s` and TTL lives on for between 7/8 and all of block_ttl_s after its last use. A
refresh also refreshes the reverse index of each replica in the block, which keeps this
invariant: a replica's reverse index outlives each of its block entries, so a Clear misses none.

A block entry that expired on its own stays in its replicas' reverse indexes until they are
cleared or expire; clearing such a hash is a harmless no-op. Keys are computed inside the
scripts (not passed as KEYS), so the schema needs one Redis node, not Redis Cluster. A script
blocks Redis while it runs, hence the request size bounds in `CacheServiceConfig`, and clearing
a replica with very many blocks is not free.
"""

from __future__ import annotations

import uuid
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

# Block-entry helpers shared by the Publish and ClearReplica scripts. Arguments are full keys.
_BLOCK_FUNCTIONS = r"""
local SEP = '\0'

local function now_s()
  return redis.call('TIME')[1]
end

-- The '\0r1\0r2\0' part of a block value ('\0' for none).
local function holders_of(value)
  if not value then return SEP end
  local sep = string.find(value, SEP, 1, true)
  return string.sub(value, sep)
end

local function add_holder(bkey, replica, now, ttl)
  local holders = holders_of(redis.call('GET', bkey))
  if not string.find(holders, SEP .. replica .. SEP, 1, true) then
    holders = holders .. replica .. SEP
  end
  redis.call('SET', bkey, now .. holders, 'EX', ttl)
end

local function remove_holder(bkey, replica)
  local value = redis.call('GET', bkey)
  if not value then return end
  local at = string.find(value, SEP .. replica .. SEP, 1, true)
  if not at then return end
  value = string.sub(value, 1, at) .. string.sub(value, at + #replica + 2)
  if string.find(value, SEP, 1, true) == #value then
    redis.call('DEL', bkey)
  else
    redis.call('SET', bkey, value, 'KEEPTTL')
  end
end

local function clear(prefix, replica)
  local rkey = prefix .. 'r:' .. replica
  local hashes = redis.call('SMEMBERS', rkey)
  for _, h in ipairs(hashes) do
    remove_holder(prefix .. 'b:' .. h, replica)
  end
  redis.call('DEL', rkey)
  return #hashes
end
"""

# ARGV: prefix, ttl_s, hash_len, then per event: op ('s' stored, 'r' removed, 'c' cleared),
# replica_id, the event's hashes concatenated. Events are applied in order.
_PUBLISH_SCRIPT = _BLOCK_FUNCTIONS + r"""
local prefix, ttl, hlen = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_s()
for e = 4, #ARGV, 3 do
  local op, replica, blob = ARGV[e], ARGV[e + 1], ARGV[e + 2]
  local rkey = prefix .. 'r:' .. replica
  if op == 'c' then
    clear(prefix, replica)
  else
    for pos = 1, #blob, hlen do
      local h = string.sub(blob, pos, pos + hlen - 1)
      if op == 's' then
        add_holder(prefix .. 'b:' .. h, replica, now, ttl)
        redis.call('SADD', rkey, h)
      else
        remove_holder(prefix .. 'b:' .. h, replica)
        redis.call('SREM', rkey, h)
      end
    end
    if op == 's' then redis.call('EXPIRE', rkey, ttl) end
  end
end
return (#ARGV - 3) / 3
"""

# ARGV: prefix, replica_id. Returns the number of block entries removed.
_CLEAR_SCRIPT = _BLOCK_FUNCTIONS + "return clear(ARGV[1], ARGV[2])\n"

# ARGV: prefix, a fresh token. The epoch token, set to the fresh one if there was none.
_EPOCH_SCRIPT = r"""
local key = ARGV[1] .. 'epoch'
local epoch = redis.call('GET', key)
if epoch then return epoch end
redis.call('SET', key, ARGV[2])
return ARGV[2]
"""

# ARGV: prefix, ttl_s, refresh_interval_s, hash_len, all chains' hashes concatenated, then each
# chain's length. Returns, per chain, k followed by k (replica_id, matched_blocks) pairs.
_MATCH_SCRIPT = r"""
local SEP, MGET_KEYS = '\0', 64
local bprefix, rprefix = ARGV[1] .. 'b:', ARGV[1] .. 'r:'
local ttl, interval, hlen, blob = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local now = redis.call('TIME')[1]
-- Stamps are 10-digit seconds like `now` (until 2286), so comparing a whole value with this
-- string compares its stamp, without parsing it: value < stale_below iff stamp <= now - interval.
local stale_below = tostring(tonumber(now) - interval + 1)
local refreshed_replicas = {}

-- Reset the TTL of a block whose last refresh is `interval` old; note its replicas.
local function maybe_refresh(bkey, value)
  if value >= stale_below then return end
  local sep = string.find(value, SEP, 1, true)
  redis.call('SET', bkey, now .. string.sub(value, sep), 'EX', ttl)
  for r in string.gmatch(string.sub(value, sep + 1), '([^%z]+)%z') do refreshed_replicas[r] = true end
end

-- {replica -> leading blocks held} of the chain of `n` hashes starting at byte `pos` of blob.
-- names/needles list the replicas whose run is unbroken (needle = '\0name\0'); a replica's
-- depth is written when it drops out, or at the end.
local function walk(pos, n)
  local depth, names, needles, held = {}, {}, {}, 0
  for first = 0, n - 1, MGET_KEYS do
    local keys = {}
    for i = first, math.min(n, first + MGET_KEYS) - 1 do
      local start = pos + i * hlen
      keys[#keys + 1] = bprefix .. string.sub(blob, start, start + hlen - 1)
    end
    local values = redis.call('MGET', unpack(keys))
    for j = 1, #keys do
      local value = values[j]
      if not value then break end
      if held == 0 then
        for r in string.gmatch(string.sub(value, string.find(value, SEP, 1, true) + 1), '([^%z]+)%z') do
          names[#names + 1] = r
          needles[#needles + 1] = SEP .. r .. SEP
        end
      else
        local k = 1
        while k <= #names do
          if string.find(value, needles[k], 1, true) then
            k = k + 1
          else
            depth[names[k]] = held
            names[k], needles[k] = names[#names], needles[#needles]
            names[#names], needles[#needles] = nil, nil
          end
        end
      end
      if #names == 0 then return depth end
      held = held + 1
      maybe_refresh(keys[j], value)
    end
    if held < first + #keys then break end
  end
  for _, r in ipairs(names) do depth[r] = held end
  return depth
end

local out, pos = {}, 1
for c = 6, #ARGV do
  local n = tonumber(ARGV[c])
  local count_at = #out + 1
  out[count_at] = 0
  for r, d in pairs(walk(pos, n)) do
    out[#out + 1] = r
    out[#out + 1] = d
    out[count_at] = out[count_at] + 1
  end
  pos = pos + n * hlen
end
for r in pairs(refreshed_replicas) do redis.call('EXPIRE', rprefix .. r, ttl) end
return out
"""


@dataclass(frozen=True)
class BlockStored:
    """`replica_id` now holds full KV blocks with these hashes (concatenated)."""

    replica_id: str
    block_hashes: bytes


@dataclass(frozen=True)
class BlockRemoved:
    """`replica_id` evicted the blocks with these hashes (concatenated)."""

    replica_id: str
    block_hashes: bytes


@dataclass(frozen=True)
class ReplicaCleared:
    """`replica_id` holds nothing any more (restart or new plan epoch)."""

    replica_id: str


BlockEvent = Union[BlockStored, BlockRemoved, ReplicaCleared]


def pack(hashes: Sequence[bytes]) -> bytes:
    """Concatenate a run of equally long hashes, the form every method here takes."""
    return b"".join(hashes)


class PrefixIndex:
    """Owner of the Redis schema above; every method is one Redis round trip.

    Hashes arrive packed (`pack`): a run of hashes of `hash_size_bytes` each, concatenated, as
    on the wire, so no per-hash Python object is made between the gRPC request and Redis.
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
            **({"ssl_ca_certs": config.redis_tls_ca} if config.redis_tls_ca else {}),
        )
        self._publish_script = self._redis.register_script(_PUBLISH_SCRIPT)
        self._match_script = self._redis.register_script(_MATCH_SCRIPT)
        self._clear_script = self._redis.register_script(_CLEAR_SCRIPT)
        self._epoch_script = self._redis.register_script(_EPOCH_SCRIPT)

    async def close(self) -> None:
        await self._redis.aclose()

    async def publish(self, events: Sequence[BlockEvent], hash_size_bytes: int) -> int:
        """Apply `events` in order, atomically; returns how many were applied."""
        if not events:
            return 0
        args: list = [self._config.key_prefix, self._config.block_ttl_s, hash_size_bytes]
        for event in events:
            args.extend(_event_args(event, hash_size_bytes))
        return int(await self._run(self._publish_script, args))

    async def match(self, chains: Sequence[bytes], hash_size_bytes: int) -> list[dict[str, int]]:
        """Per packed chain, {replica_id: leading blocks held}; replicas with no overlap are absent."""
        if not chains:
            return []
        for chain in chains:
            _check_packed(chain, hash_size_bytes)
        config = self._config
        args = [config.key_prefix, config.block_ttl_s, config.refresh_interval_s, hash_size_bytes, b"".join(chains)]
        args.extend(len(chain) // hash_size_bytes for chain in chains)
        return _parse_match(await self._run(self._match_script, args), len(chains))

    async def clear_replica(self, replica_id: str) -> int:
        """Forget every block of `replica_id`; returns the number of entries removed."""
        _check_replica_id(replica_id)
        return int(await self._run(self._clear_script, [self._config.key_prefix, replica_id]))

    async def epoch(self) -> str:
        """The index's epoch token (made now if Redis holds none: it restarted empty, or is new)."""
        value = await self._run(self._epoch_script, [self._config.key_prefix, uuid.uuid4().hex])
        return value.decode() if isinstance(value, bytes) else str(value)

    async def _run(self, script, args: list):
        """EVALSHA (loading the script on NOSCRIPT, e.g. after a Redis restart)."""
        try:
            return await script(args=args)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise Unavailable(
                f"prefix index unavailable: Redis at {self._config.redis_url} did not answer ({exc}); "
                "fall back to local prefix matching and retry later"
            ) from exc


def _event_args(event: BlockEvent, hash_size_bytes: int) -> tuple:
    """The (op, replica_id, hashes) triple the publish script reads for one event."""
    _check_replica_id(event.replica_id)
    if isinstance(event, ReplicaCleared):
        return ("c", event.replica_id, b"")
    _check_packed(event.block_hashes, hash_size_bytes)
    if isinstance(event, BlockStored):
        return ("s", event.replica_id, event.block_hashes)
    if isinstance(event, BlockRemoved):
        return ("r", event.replica_id, event.block_hashes)
    raise InvalidArgument(f"unknown block event {event!r}")


def _check_packed(hashes: bytes, hash_size_bytes: int) -> None:
    """The scripts slice packed hashes by `hash_size_bytes`; a ragged run would shift every key."""
    if not 1 <= hash_size_bytes <= MAX_HASH_BYTES:
        raise InvalidArgument(f"hash_size_bytes must be in 1..{MAX_HASH_BYTES}, got {hash_size_bytes}")
    if len(hashes) % hash_size_bytes:
        raise InvalidArgument(
            f"packed block hashes of {len(hashes)} bytes are not a whole number of {hash_size_bytes}-byte hashes"
        )


def _check_replica_id(replica_id: str) -> None:
    """Replica ids are opaque, but NUL separates them inside a block value."""
    if not replica_id or "\0" in replica_id:
        raise InvalidArgument(f"replica_id must be non-empty and free of NUL characters, got {replica_id!r}")


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
