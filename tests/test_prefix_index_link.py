"""The gateway's link to the prefix index survives answers other than UNAVAILABLE.

A CacheIndex gRPC server on loopback answers INTERNAL to its first calls (as a cache_service
whose Redis raised something other than a connection error would), then serves. The link must
log it, treat the index as down, and publish its full state once the index answers: its
background task must not die on the first unexpected status, which would leave the index
unwritten for the rest of the gateway's life.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import structlog

from gateway.prefix_index import PrefixIndexLink
from stagemesh.v1 import cache_pb2, cache_pb2_grpc

BLOCK = b"\x01" * 16


class FailingFirst(cache_pb2_grpc.CacheIndexServicer):
    """INTERNAL for the first `failures` calls of any method, then a working index of one replica."""

    def __init__(self, failures: int):
        self.failures = failures
        self.published: list[bytes] = []

    async def _maybe_fail(self, context) -> None:
        if self.failures > 0:
            self.failures -= 1
            await context.abort(grpc.StatusCode.INTERNAL, "injected: the index raised")

    async def Publish(self, request, context):
        await self._maybe_fail(context)
        for event in request.events:
            if event.HasField("stored"):
                self.published.append(event.stored.block_hashes)
        return cache_pb2.PublishResponse(applied_events=len(request.events))

    async def GetEpoch(self, request, context):
        await self._maybe_fail(context)
        return cache_pb2.GetEpochResponse(epoch="e1")

    async def Match(self, request, context):
        await self._maybe_fail(context)
        return cache_pb2.MatchResponse(chains=[cache_pb2.ChainMatch() for _ in request.chains])


@contextlib.asynccontextmanager
async def _link_to(servicer, **link_kw):
    """A loopback CacheIndex server running `servicer` and a PrefixIndexLink to it; both closed
    at exit."""
    server = grpc.aio.server()
    cache_pb2_grpc.add_CacheIndexServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    link = PrefixIndexLink(f"127.0.0.1:{port}", structlog.get_logger(), **link_kw)
    try:
        yield link
    finally:
        await link.close()
        await server.stop(None)


async def _until(pred) -> None:
    """Poll pred for 10 s at most (the callers assert on what they saw)."""
    for _ in range(200):
        if pred():
            return
        await asyncio.sleep(0.05)


async def _scenario() -> tuple[FailingFirst, PrefixIndexLink, bool]:
    servicer = FailingFirst(failures=3)
    async with _link_to(servicer, retry_interval_s=0.05, epoch_interval_s=0.05) as link:
        assert await link.match([[BLOCK]]) is None  # an INTERNAL answer: local matching, no raise
        link.start(lambda: [("replica-0", [BLOCK])])
        await _until(lambda: servicer.published)  # a few retries of 50 ms are expected
        alive = not link._task.done()
    return servicer, link, alive


def test_link_survives_internal_errors_and_publishes_its_state():
    servicer, link, alive = asyncio.run(_scenario())
    assert servicer.failures == 0  # every injected failure was met
    assert alive, "the link's task died"
    assert servicer.published == [BLOCK]  # the full state, once the index answered
    assert link.resyncs >= 1 and link.available


class SlowFirstPublish(FailingFirst):
    """The first Publish (the link's initial resync) waits for the test's go before answering."""

    def __init__(self):
        super().__init__(failures=0)
        self.in_first, self.go = asyncio.Event(), asyncio.Event()

    async def Publish(self, request, context):
        if not self.in_first.is_set():
            self.in_first.set()
            await self.go.wait()
        return await super().Publish(request, context)


@contextlib.asynccontextmanager
async def _resync_held(servicer: SlowFirstPublish):
    """A link whose first resync (snapshot: BLOCK on replica-0) is in flight, held by the server
    until the body sets `servicer.go`; the client's deadline raised so the held Publish does not
    meet the 0.2 s one on a loaded machine."""
    async with _link_to(servicer) as link:
        link.client._timeout_s = 10.0
        link.start(lambda: [("replica-0", [BLOCK])])  # the snapshot, taken before the body's events
        await asyncio.wait_for(servicer.in_first.wait(), 10)
        yield link


async def _events_during_resync() -> list[bytes]:
    servicer = SlowFirstPublish()
    late = b"\x02" * 16
    async with _resync_held(servicer) as link:
        link.publish("replica-0", [late], [])  # a request's blocks, stored while the resync is in flight
        servicer.go.set()
        await _until(lambda: late in servicer.published)
    return servicer.published


def test_blocks_stored_during_the_first_resync_are_published():
    """A gateway's first request can finish while the link's first resync (its snapshot taken
    before that request) is still in flight: its blocks must reach the index after it, not be
    dropped as 'the resync covers them' (the index then missed them until the next epoch change)."""
    assert asyncio.run(_events_during_resync()) == [BLOCK, b"\x02" * 16]


class HeldResyncFailingMatch(SlowFirstPublish):
    """SlowFirstPublish whose Match answers UNAVAILABLE (the router's hint call timing out) and
    which records removals."""

    def __init__(self):
        super().__init__()
        self.removed: list[bytes] = []

    async def Publish(self, request, context):
        self.removed += [e.removed.block_hashes for e in request.events if e.HasField("removed")]
        return await super().Publish(request, context)

    async def Match(self, request, context):
        await context.abort(grpc.StatusCode.UNAVAILABLE, "injected: match timed out")


async def _removal_and_failed_match_during_resync() -> list[bytes]:
    servicer = HeldResyncFailingMatch()
    async with _resync_held(servicer) as link:
        link.publish("replica-0", [], [BLOCK])  # evicted after the snapshot that holds it was taken
        assert await link.match([[BLOCK]]) is None  # the index looks down to the router meanwhile
        servicer.go.set()
        await _until(lambda: servicer.removed)
    return servicer.removed


def test_a_failed_match_during_the_resync_keeps_later_removals():
    """The resync in flight then succeeds: the removal that came after its snapshot must still
    reach the index, or the index claims a block the replica no longer holds."""
    assert asyncio.run(_removal_and_failed_match_during_resync()) == [BLOCK]
