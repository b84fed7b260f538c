"""Membership and the plan: who serves which layers of which replica, under which epoch.

Called from the coordinator's event loop only. The plan is built once enough workers have
registered (stages x replicas); later workers wait as spares.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from coordinator.config import CoordinatorConfig
from coordinator.planner import partition_uniform


@dataclass
class Worker:
    worker_id: str
    address: str
    device: str
    memory_bytes: int
    last_seen: float = field(default_factory=time.monotonic)
    loaded_epoch: int = 0
    num_blocks: int = 0
    mean_step_us: float = 0.0


@dataclass(frozen=True)
class StageSlot:
    worker_id: str
    replica: int
    stage_index: int
    layer_start: int
    layer_end: int


class Registry:
    def __init__(self, config: CoordinatorConfig):
        self.config = config
        self.workers: dict[str, Worker] = {}
        self.epoch = 0
        self.replicas: list[list[StageSlot]] = []
        self._ids = itertools.count(1)

    def register(self, address: str, device: str, memory_bytes: int) -> Worker:
        worker = Worker(f"w{next(self._ids)}", address, device, memory_bytes)
        self.workers[worker.worker_id] = worker
        self._maybe_plan()
        return worker

    def heartbeat(self, worker_id: str, loaded_epoch: int, num_blocks: int, mean_step_us: float) -> Worker | None:
        worker = self.workers.get(worker_id)
        if worker is None:
            return None
        worker.last_seen = time.monotonic()
        worker.loaded_epoch = loaded_epoch
        worker.num_blocks = num_blocks
        worker.mean_step_us = mean_step_us
        return worker

    def slot_of(self, worker_id: str) -> StageSlot | None:
        for replica in self.replicas:
            for slot in replica:
                if slot.worker_id == worker_id:
                    return slot
        return None

    def next_address(self, slot: StageSlot) -> str:
        stages = self.replicas[slot.replica]
        if slot.stage_index + 1 < len(stages):
            return self.workers[stages[slot.stage_index + 1].worker_id].address
        return ""

    def ready(self) -> bool:
        return bool(self.replicas) and all(
            self.workers[s.worker_id].loaded_epoch == self.epoch for r in self.replicas for s in r
        )

    def _maybe_plan(self) -> None:
        cfg = self.config
        needed = cfg.stages * cfg.replicas
        if self.replicas or len(self.workers) < needed:
            return
        ranges = partition_uniform(cfg.num_layers, cfg.stages)
        ids = list(self.workers)[:needed]
        self.replicas = [
            [
                StageSlot(ids[r * cfg.stages + i], r, i, start, end)
                for i, (start, end) in enumerate(ranges)
            ]
            for r in range(cfg.replicas)
        ]
        self.epoch += 1
