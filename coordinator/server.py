"""Coordinator gRPC service: Register, Heartbeat (answers with the assignment), GetPlan."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stagemesh import metrics
from stagemesh import security
from stagemesh.grpc_status import grpc_errors
from stagemesh.service import ServiceSpec, run_service
from stagemesh.v1 import stagemesh_pb2 as pb
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc

from coordinator.config import CoordinatorConfig
from coordinator.registry import Registry


class CoordinatorService(pb_grpc.CoordinatorServicer):
    """All state lives in `Registry`; handlers run on the event loop, one at a time."""

    def __init__(self, config: CoordinatorConfig, log):
        self.config = config
        self.registry = Registry(config, log)
        self.log = log
        self._epoch_seen = 0  # for the rebalance counter
        self._not_ready_since: float | None = None  # event-loop time the plan last stopped being ready

    @grpc_errors
    async def Register(self, request, context):
        worker = self.registry.register(request.address, request.device, request.memory_bytes,
                                        decode_ms_per_layer=request.profile.decode_ms_per_layer,
                                        bytes_per_layer=request.profile.bytes_per_layer,
                                        instance_id=request.instance_id)
        self.log.info("worker_registered", worker_id=worker.worker_id, address=request.address, device=request.device)
        return pb.RegisterResponse(worker_id=worker.worker_id, heartbeat_interval_ms=self.config.heartbeat_interval_ms)

    @grpc_errors
    async def Heartbeat(self, request, context):
        self._count_epoch_changes()
        worker = self.registry.heartbeat(request.worker_id, request.loaded_epoch, request.num_blocks, request.mean_step_us)
        if worker is None:
            return pb.HeartbeatResponse(reregister=True)
        slot = self.registry.slot_of(worker.worker_id)
        if slot is None:  # a spare once the plan is built: what it still holds belongs to nobody
            return pb.HeartbeatResponse(spare=bool(self.registry.replicas))
        return pb.HeartbeatResponse(
            assignment=pb.Assignment(
                epoch=self.registry.epoch,
                replica=slot.replica,
                stage_index=slot.stage_index,
                layer_start=slot.layer_start,
                layer_end=slot.layer_end,
                num_layers_total=self.config.num_layers,
                next_address=self.registry.next_address(slot),
            )
        )

    @grpc_errors
    async def ReportFailure(self, request, context):
        reg = self.registry
        if request.epoch != reg.epoch or not 0 <= request.replica < len(reg.replicas):
            return pb.ReportFailureResponse()
        slots = list(reg.replicas[request.replica])
        # Every slot, a restored plan's pending ones included (probed at the address they wait on).
        alive = await asyncio.gather(*[_probe(a, self.config.tls) for a in reg.addresses(slots)])
        dead = [s.worker_id for s, ok in zip(slots, alive) if not ok]
        for worker_id in dead:  # the plan may have changed while probing: each call checks its slot
            if worker_id.startswith("pending:"):
                reg.fail_pending(worker_id.removeprefix("pending:"), "reported by a gateway, unreachable")
            else:
                reg.fail(worker_id)
        self.log.info("failure_reported", replica=request.replica, detail=request.detail[:200], dead=dead)
        return pb.ReportFailureResponse(dead_worker_ids=dead)

    @grpc_errors
    async def GetPlan(self, request, context):
        self._count_epoch_changes()
        reg = self.registry
        ready = reg.ready()
        now = asyncio.get_running_loop().time()
        self._not_ready_since = None if ready else (self._not_ready_since or now)
        plan = pb.Plan(
            epoch=reg.epoch, ready=ready, num_layers_total=self.config.num_layers, block_size=self.config.block_size,
            not_ready_reason="" if ready else reg.not_ready_reason(),
            not_ready_ms=0 if ready else int((now - self._not_ready_since) * 1000),
            spares=[pb.SpareWorker(worker_id=w.worker_id, address=w.address) for w in reg.spares()],
        )
        for replica in reg.replicas:
            rp = plan.replicas.add()
            for slot in replica:
                w = reg.workers.get(slot.worker_id)  # None: restored plan, worker not back yet
                blocks = w.num_blocks if w and w.loaded_epoch == reg.epoch else 0
                rp.stages.add(
                    worker_id=slot.worker_id, address=w.address if w else slot.worker_id.removeprefix("pending:"),
                    layer_start=slot.layer_start, layer_end=slot.layer_end, num_blocks=blocks,
                    loaded=bool(w and w.loaded_epoch == reg.epoch),
                )
            rp.num_blocks = min(s.num_blocks for s in rp.stages)
        return plan

    def _count_epoch_changes(self) -> None:
        """Every epoch after the first this process serves is a re-plan (rebalance or failover).

        Read on Heartbeat and GetPlan, which workers and gateways send every fraction of a second,
        so the Registry stays free of metrics code.
        """
        epoch = self.registry.epoch
        if self._epoch_seen and epoch > self._epoch_seen:
            metrics.REBALANCES.inc(epoch - self._epoch_seen)
        self._epoch_seen = max(self._epoch_seen, epoch)


async def serve(config: CoordinatorConfig, log) -> None:
    service = CoordinatorService(config, log)

    def watchers(_running) -> list[asyncio.Task]:
        tasks = [asyncio.create_task(_expire_loop(service.registry, config))]
        if config.rebalance:
            tasks.append(asyncio.create_task(_rebalance_loop(service.registry, config)))
        return tasks

    await run_service(ServiceSpec(
        name="coordinator", host=config.host, port=config.port, tls=config.tls, log=log,
        metrics_port=config.metrics_port, descriptor=pb.DESCRIPTOR, services=("Coordinator",),
        add_servicers=lambda server: pb_grpc.add_CoordinatorServicer_to_server(service, server),
        tasks=watchers))


async def _rebalance_loop(registry: Registry, config: CoordinatorConfig) -> None:
    """Watch stage times; move layer boundaries when a replica stays imbalanced (with hysteresis)."""
    imbalanced_since: dict[int, float] = {}
    last_move = -float("inf")
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(0.5)
        if registry.revert_stalled_moves(config.rebalance_load_timeout_s):
            last_move = loop.time()
        if not registry.ready():
            continue
        now = loop.time()
        for r, slots in enumerate(registry.replicas):
            times = [registry.workers[s.worker_id].mean_step_us for s in slots if s.worker_id in registry.workers]
            if len(times) < 2 or min(times) <= 0:
                imbalanced_since.pop(r, None)
                continue
            ratio = max(times) / (sum(times) / len(times))
            if ratio <= config.rebalance_threshold:
                imbalanced_since.pop(r, None)
                continue
            since = imbalanced_since.setdefault(r, now)
            if now - since >= config.rebalance_window_s and now - last_move >= config.rebalance_min_interval_s:
                imbalanced_since.pop(r, None)
                if registry.rebalance(r) is not None:
                    last_move = now


async def _probe(address: str, tls=None, timeout_s: float = 0.5) -> bool:
    """Whether a worker answers its gRPC health check in time (a frozen process does not)."""
    try:
        async with security.channel(address, tls) as channel:
            resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.aio.AioRpcError:
        return False


async def _expire_loop(registry: Registry, config: CoordinatorConfig) -> None:
    """Declare silent workers dead (a killed or frozen process stops heartbeating), judge the
    restored plan's pending slots, and fold spares back into replicas short of stages."""
    while True:
        await asyncio.sleep(config.heartbeat_interval_ms / 4000)
        registry.expire(config.dead_after_s)
        await _judge_pending(registry, config)
        registry.fold_in_spares()


async def _judge_pending(registry: Registry, config: CoordinatorConfig) -> None:
    """Slots of a restored plan whose worker has not re-registered within the grace (a live worker
    does at its next heartbeat): an unreachable one is dead and fails over; one that answers but
    still has not re-registered after restore_wait_s is taken as lost too (it serves someone else,
    or cannot reach this coordinator), so the plan never waits forever."""
    if registry.restored_at is None:
        return
    waited = time.monotonic() - registry.restored_at
    if waited < config.restore_grace_s:
        return
    addresses = registry.pending()
    if not addresses:
        registry.restored_at = None  # every slot is settled: nothing left to judge
        return
    alive = await asyncio.gather(*[_probe(a, config.tls) for a in addresses])
    for address, ok in zip(addresses, alive):
        if not ok:
            registry.fail_pending(address, "unreachable after the coordinator restarted")
        elif waited >= config.restore_wait_s:
            registry.fail_pending(address, f"answers but did not re-register within {config.restore_wait_s:g}s")


