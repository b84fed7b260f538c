"""gRPC front of the prefix index: proto <-> `PrefixIndex` translation, and the process lifecycle.

The servicer stays thin on purpose: Match is on every gateway's scheduling tick, so each rpc
does one validation pass, one Redis call and one response build. Errors become status codes in
one place, `stagemesh.grpc_status.grpc_errors` (UNAVAILABLE when Redis is down, INVALID_ARGUMENT for
bad input); the process itself never exits because Redis went away.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Callable, Optional

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cache_service.config import CacheServiceConfig
from cache_service.index import BlockEvent, BlockRemoved, BlockStored, PrefixIndex, ReplicaCleared
from stagemesh.errors import InvalidArgument
from stagemesh.grpc_status import grpc_errors
from stagemesh.membership import redact_url, server_interceptors
from stagemesh.metrics import start_metrics_server
from stagemesh.reflection import enable_reflection
from stagemesh.security import add_port
from stagemesh.v1 import cache_pb2, cache_pb2_grpc

log = structlog.get_logger(service="cache_service")


class CacheIndexServicer(cache_pb2_grpc.CacheIndexServicer):
    """Implements stagemesh.v1.CacheIndex over one `PrefixIndex`; called from the event loop only."""

    def __init__(self, index: PrefixIndex, config: CacheServiceConfig) -> None:
        self._index = index
        self._max_chains = config.max_chains_per_match
        self._max_hashes = config.max_hashes_per_request

    @grpc_errors
    async def Publish(self, request: cache_pb2.PublishRequest, context) -> cache_pb2.PublishResponse:
        events = [_event_from_proto(e) for e in request.events]
        self._check_size(sum(len(getattr(e, "block_hashes", b"")) for e in events), request.hash_size_bytes)
        applied = await self._index.publish(events, request.hash_size_bytes)
        return cache_pb2.PublishResponse(applied_events=applied)

    @grpc_errors
    async def Match(self, request: cache_pb2.MatchRequest, context) -> cache_pb2.MatchResponse:
        chains = [chain.block_hashes for chain in request.chains]
        if len(chains) > self._max_chains:
            raise InvalidArgument(f"at most {self._max_chains} chains per Match, got {len(chains)}")
        self._check_size(sum(map(len, chains)), request.hash_size_bytes)
        matches = await self._index.match(chains, request.hash_size_bytes)
        return cache_pb2.MatchResponse(chains=[_chain_match(m) for m in matches])

    @grpc_errors
    async def ClearReplica(self, request: cache_pb2.ClearReplicaRequest, context) -> cache_pb2.ClearReplicaResponse:
        removed = await self._index.clear_replica(request.replica_id)
        log.info("replica_cleared", replica_id=request.replica_id, removed_blocks=removed)
        return cache_pb2.ClearReplicaResponse(removed_blocks=removed)

    @grpc_errors
    async def GetEpoch(self, request: cache_pb2.GetEpochRequest, context) -> cache_pb2.GetEpochResponse:
        return cache_pb2.GetEpochResponse(epoch=await self._index.epoch())

    def _check_size(self, packed_bytes: int, hash_size_bytes: int) -> None:
        count = packed_bytes // max(1, hash_size_bytes)
        if count > self._max_hashes:
            raise InvalidArgument(f"at most {self._max_hashes} block hashes per request, got {count}")


def _event_from_proto(event: cache_pb2.BlockEvent) -> BlockEvent:
    kind = event.WhichOneof("event")
    if kind == "stored":
        return BlockStored(event.stored.replica_id, event.stored.block_hashes)
    if kind == "removed":
        return BlockRemoved(event.removed.replica_id, event.removed.block_hashes)
    if kind == "cleared":
        return ReplicaCleared(event.cleared.replica_id)
    raise InvalidArgument("a BlockEvent must set one of stored / removed / cleared")


def _chain_match(overlaps: dict[str, int]) -> cache_pb2.ChainMatch:
    return cache_pb2.ChainMatch(
        overlaps=[cache_pb2.ReplicaOverlap(replica_id=r, matched_blocks=n) for r, n in overlaps.items()]
    )


async def serve(config: CacheServiceConfig, on_ready: Optional[Callable[[int], None]] = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain in-flight rpcs for `config.grace_s` and close Redis.

    `on_ready(port)` is called once the port is bound (the actual port when config.port is 0).
    Redis is not contacted at start-up: a Redis that is down yields UNAVAILABLE per rpc.
    """
    index = PrefixIndex(config.index)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)],  # mesh members only (stagemesh/membership.py)
                             interceptors=server_interceptors(config.host, config.tls, "cache_service"))
    cache_pb2_grpc.add_CacheIndexServicer_to_server(CacheIndexServicer(index, config), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(server, cache_pb2.DESCRIPTOR, "CacheIndex")
    port = add_port(server, f"{config.host}:{config.port}", config.tls)  # OSError if it cannot bind
    await server.start()
    start_metrics_server(config.metrics_port, config.host)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = _stop_event_on_signals()
    log.info("cache_service ready", host=config.host, port=port, redis_url=redact_url(config.index.redis_url),
             metrics_port=config.metrics_port or None)
    if on_ready is not None:
        on_ready(port)
    await stop.wait()
    log.info("stopping", grace_s=config.grace_s)
    await server.stop(config.grace_s)
    await index.close()


def _stop_event_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
