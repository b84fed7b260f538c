"""`CacheIndexClient`: the gateway's handle on cache_service. It lives on the ground floor
because services meet only through `stagemesh` and the wire (tests/test_layers.py).

The global index is a routing hint, so the gateway must keep serving without it: every call has
a short deadline, and an unreachable cache_service, a Redis it cannot reach, or a missed
deadline all raise the one exception `IndexUnavailable`, upon which the gateway falls back to
local prefix matching. Other errors (INVALID_ARGUMENT) are bugs in the caller and propagate as
`grpc.aio.AioRpcError`.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Sequence

import grpc

from stagemesh.security import TlsConfig
from stagemesh.security import channel as secure_channel
from stagemesh.v1 import cache_pb2, cache_pb2_grpc

_FALLBACK_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class IndexUnavailable(Exception):
    """The global prefix index cannot answer now; use local prefix matching and retry later."""


class CacheIndexClient:
    """Async client of stagemesh.v1.CacheIndex; use from one event loop (`async with` closes it)."""

    def __init__(
        self, target: str, hash_size_bytes: int = 16, timeout_s: float = 0.2, clear_timeout_s: float = 5.0,
        tls: TlsConfig | None = None,
    ) -> None:
        """`hash_size_bytes` is the gateway's digest size: every hash passed in has that length.
        `timeout_s` bounds Publish and Match (a tick must not wait on a hint); clearing a
        replica with many blocks runs longer, hence `clear_timeout_s`. `tls`: mutual TLS."""
        self._target = target
        self._hash_size = hash_size_bytes
        self._timeout_s = timeout_s
        self._clear_timeout_s = clear_timeout_s
        self._channel = secure_channel(target, tls, options=[])
        self._stub = cache_pb2_grpc.CacheIndexStub(self._channel)

    async def __aenter__(self) -> "CacheIndexClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def publish(
        self,
        stored: Iterable[tuple[str, bytes]] = (),
        removed: Iterable[tuple[str, bytes]] = (),
        cleared: Iterable[str] = (),
    ) -> int:
        """Publish one batch of (replica_id, block_hash) events; returns the events applied.

        Applied as: `cleared`, then `stored`, then `removed`, each in the given order. Removing
        last means a block stored and evicted within one batch ends up absent: the index may
        miss a block (costs prefill), but never claims one that is gone.
        """
        events = [cache_pb2.BlockEvent(cleared=cache_pb2.ReplicaCleared(replica_id=r)) for r in cleared]
        events += [cache_pb2.BlockEvent(stored=cache_pb2.BlockStored(replica_id=r, block_hashes=self._pack(hashes)))
                   for r, hashes in _runs_by_replica(stored)]
        events += [cache_pb2.BlockEvent(removed=cache_pb2.BlockRemoved(replica_id=r, block_hashes=self._pack(hashes)))
                   for r, hashes in _runs_by_replica(removed)]
        if not events:
            return 0
        request = cache_pb2.PublishRequest(hash_size_bytes=self._hash_size, events=events)
        response = await self._call(self._stub.Publish, request, self._timeout_s)
        return response.applied_events

    async def match(self, chains: Sequence[Sequence[bytes]]) -> list[dict[str, int]]:
        """Per chain (one per request of the tick), {replica_id: leading blocks it holds}."""
        if not chains:
            return []
        request = cache_pb2.MatchRequest(
            hash_size_bytes=self._hash_size,
            chains=[cache_pb2.BlockChain(block_hashes=self._pack(chain)) for chain in chains],
        )
        response = await self._call(self._stub.Match, request, self._timeout_s)
        return [{o.replica_id: o.matched_blocks for o in chain.overlaps} for chain in response.chains]

    async def clear_replica(self, replica_id: str) -> int:
        """Forget every block of a restarted or re-planned replica; returns entries removed."""
        request = cache_pb2.ClearReplicaRequest(replica_id=replica_id)
        response = await self._call(self._stub.ClearReplica, request, self._clear_timeout_s)
        return response.removed_blocks

    async def epoch(self) -> str:
        """The index's epoch token; a new one means the index lost its contents (republish)."""
        response = await self._call(self._stub.GetEpoch, cache_pb2.GetEpochRequest(), self._timeout_s)
        return response.epoch

    def _pack(self, hashes: Sequence[bytes]) -> bytes:
        """Concatenate for the wire; a total length check catches a hash of the wrong size."""
        packed = b"".join(hashes)
        if len(packed) != self._hash_size * len(hashes):
            raise ValueError(f"block hashes must be {self._hash_size} bytes each (hash_size_bytes)")
        return packed

    async def _call(self, method, request, timeout_s: float):
        try:
            return await method(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _FALLBACK_CODES:
                raise IndexUnavailable(f"prefix index at {self._target}: {exc.code().name}: {exc.details()}") from exc
            raise


def _runs_by_replica(pairs: Iterable[tuple[str, bytes]]) -> list[tuple[str, list[bytes]]]:
    """Group consecutive pairs of one replica into one event, keeping the order."""
    return [(replica, [h for _, h in run]) for replica, run in itertools.groupby(pairs, key=lambda p: p[0])]
