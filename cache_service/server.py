"""gRPC front of the prefix index: proto <-> `PrefixIndex` translation, and the process lifecycle.

The servicer stays thin on purpose: Match is on every gateway's scheduling tick, so each rpc
does one validation pass, one Redis call and one response build. Errors become status codes in
one place, `stagemesh.grpc_status.grpc_errors` (UNAVAILABLE when Redis is down, INVALID_ARGUMENT for
bad input); the process itself never exits because Redis went away.
"""

from __future__ import annotations

import structlog

from cache_service.config import CacheServiceConfig
from cache_service.index import BlockEvent, BlockRemoved, BlockStored, PrefixIndex, ReplicaCleared
from stagemesh import discovery
from stagemesh.errors import InvalidArgument
from stagemesh.grpc_status import grpc_errors
from stagemesh.membership import redact_url
from stagemesh.service import ServiceSpec, run_service
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


async def serve(config: CacheServiceConfig, consul: discovery.ConsulConfig | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain in-flight rpcs for `config.grace_s` and close Redis.

    Prints `cache_service ready port=<P>` once serving (the actual port when config.port is 0);
    registered in Consul (given `consul`) while it runs.
    Redis is not contacted at start-up: a Redis that is down yields UNAVAILABLE per rpc.
    """
    index = PrefixIndex(config.index)
    servicer = CacheIndexServicer(index, config)
    await run_service(ServiceSpec(
        name="cache_service", host=config.host, port=config.port, tls=config.tls, log=log,
        metrics_port=config.metrics_port, descriptor=cache_pb2.DESCRIPTOR, services=("CacheIndex",),
        add_servicers=lambda server: cache_pb2_grpc.add_CacheIndexServicer_to_server(servicer, server),
        options=[("grpc.so_reuseport", 0)], ready_line="cache_service ready port={port}",
        ready_fields={"redis_url": redact_url(config.index.redis_url)},
        consul=discovery.Discovery(consul) if consul else None, consul_kind="cache", grace_s=config.grace_s, stop=index.close))
