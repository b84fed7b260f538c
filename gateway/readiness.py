"""What the gateway knows of the plan's health: its gRPC health status and its not-ready errors.

The gateway answers SERVING only while it can serve: once a ready plan has been applied, and
unless the plan has been not ready for longer than `bound_s` while no replica makes progress
(then requests fail with UNAVAILABLE saying why, instead of waiting forever). The reason comes
from the coordinator (`Plan.not_ready_reason`, e.g. which slot waits for which worker), or is
the coordinator being unreachable.

Runs on the gateway's event loop only.
"""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2

from stagemesh.v1 import stagemesh_pb2 as pb

# finish_reason of sequences failed because the plan stayed not ready (the handler raises UNAVAILABLE).
NOT_READY = "error:not_ready"


def servable(plan: pb.Plan) -> bool:
    """Every stage of every replica has loaded its layers and sized its KV pool."""
    return plan.ready and bool(plan.replicas) and all(r.num_blocks > 0 for r in plan.replicas)


class Readiness:
    def __init__(self, bound_s: float, coordinator: str):
        self.bound_s = bound_s
        self.coordinator = coordinator
        self.health = None  # grpc_health HealthServicer of the gateway's port, set by serve()
        self.reason = "no plan from the coordinator yet"
        self._unready_since: float | None = time.monotonic()
        self._serving: bool | None = None

    def saw_plan(self, plan: pb.Plan) -> None:
        if servable(plan):
            self.reason, self._unready_since = "", None
            return
        self.reason = plan.not_ready_reason or (
            "the plan has no replica" if not plan.replicas else "stages are loading their layers")
        self._mark_unready()

    def saw_error(self, exc: grpc.aio.AioRpcError) -> None:
        self.reason = f"coordinator {self.coordinator} unreachable ({exc.code().name}: {exc.details()})"
        self._mark_unready()

    def unready_s(self) -> float:
        return 0.0 if self._unready_since is None else time.monotonic() - self._unready_since

    def past_bound(self) -> bool:
        return self._unready_since is not None and self.unready_s() > self.bound_s

    def message(self, starting: bool = False) -> str:
        if starting:
            return (f"the mesh is not ready yet (waiting {self.unready_s():.0f}s for a ready plan): "
                    f"{self.reason or 'applying the plan'}; retry shortly")
        return f"the mesh is not ready (for {self.unready_s():.0f}s): {self.reason}"

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING / NOT_SERVING on the gateway's gRPC health service (on changes only)."""
        if serving == self._serving or self.health is None:
            return
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)

    def _mark_unready(self) -> None:
        if self._unready_since is None:
            self._unready_since = time.monotonic()
