"""Membership and the plan: who serves which layers of which replica, under which epoch.

The plan is built once enough workers have registered (stages x replicas); later workers wait as
spares. When a worker in the plan is declared dead (missed heartbeats, or a gateway's report),
its slot goes to a spare with the same layer range, or else its replica is re-partitioned over
the replica's survivors; the epoch bumps either way. A replica left with fewer stages than asked
takes a spare back in as soon as one is there (a live re-plan). The plan is persisted (when a
state file is configured) so a restarted coordinator keeps it: its slots wait as
`pending:HOST:PORT` until the worker process that held them re-registers (same instance id), and
get it back without an epoch change; a slot whose worker does not come back within a grace is
probed and failed over like any dead worker (coordinator/server.py).

Called from the coordinator's event loop only.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from coordinator.config import CoordinatorConfig
from coordinator.planner import (
    WorkerCost, partition_from_split, partition_min_max, partition_uniform, stage_times,
)


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
    decode_ms_per_layer: float = 0.0  # from the registration profile (0: unknown)
    bytes_per_layer: int = 0
    instance_id: str = ""  # the worker process (random at its start); "": unknown


@dataclass(frozen=True)
class StageSlot:
    worker_id: str
    replica: int
    stage_index: int
    layer_start: int
    layer_end: int


class Registry:
    def __init__(self, config: CoordinatorConfig, log=None):
        self.config = config
        self.log = log
        self.workers: dict[str, Worker] = {}
        self.epoch = 0
        self.replicas: list[list[StageSlot]] = []
        self.rebalances = 0
        self.failovers = 0
        # replica -> (ranges before the move, its workers' addresses, when): persisted with the plan,
        # so a coordinator restarted mid-move can still undo it.
        self._moves: dict[int, tuple[list[tuple[int, int]], list[str], float]] = {}
        self._undone: set[tuple[int, tuple]] = set()  # (replica, ranges) of moves that could not load
        self._next_id = 1  # worker ids are never reused (persisted with the plan)
        # Restored plan: address -> instance id of the process that held its slot, and when the
        # plan was restored (pending slots are judged after a grace from then).
        self._instances: dict[str, str] = {}
        self._held_ids: dict[str, str] = {}  # address -> the worker id it had before the restart
        self.restored_at: float | None = None
        self._load_state()

    # -- membership ----------------------------------------------------------------------------
    def register(self, address: str, device: str, memory_bytes: int, decode_ms_per_layer: float = 0.0,
                 bytes_per_layer: int = 0, instance_id: str = "") -> Worker:
        for old in [w.worker_id for w in self.workers.values() if w.address == address]:
            # A restarted worker at the same address: its old self (and KV) is gone. Failed over
            # before the newcomer counts as a spare, so a fresh process never inherits a slot
            # whose sequences the gateway believes are still cached there.
            if not self.fail(old):
                self._forget(old)
        slot = self.slot_of(f"pending:{address}")
        held_by = self._instances.get(address, "")
        back = slot is not None and (not (held_by and instance_id) or held_by == instance_id)
        if slot is not None and not back:  # a new process there: the one that held the slot died
            self.fail_pending(address, "a new process registered at its address")
        worker_id = self._held_ids.pop(address, "") if back else ""
        worker = Worker(worker_id or self._new_id(), address, device, memory_bytes,
                        decode_ms_per_layer=decode_ms_per_layer, bytes_per_layer=bytes_per_layer,
                        instance_id=instance_id)
        self.workers[worker.worker_id] = worker
        if back:
            # The process of the persisted plan is back, KV intact: same slot, same worker id, same
            # epoch (its first heartbeat, right after this, says which epoch it has loaded).
            self._set_slot(replace(slot, worker_id=worker.worker_id))
        # Saved before the worker learns its id: a restarted coordinator never hands an id out
        # twice (a spare heartbeating with it would otherwise pass for the newcomer).
        self._save_state()
        self._maybe_plan()
        self.fold_in_spares()
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

    def expire(self, dead_after_s: float) -> list[str]:
        """Declare workers silent for longer than dead_after_s dead; returns their ids."""
        now = time.monotonic()
        dead = [w.worker_id for w in self.workers.values() if now - w.last_seen > dead_after_s]
        for worker_id in dead:
            self.fail(worker_id)
        return dead

    def fail(self, worker_id: str) -> bool:
        """Remove a worker; re-plan its replica if it served one. Returns whether the plan changed."""
        slot = self.slot_of(worker_id)
        self._forget(worker_id)
        if slot is None:
            return False
        self._replace(slot, worker_id)
        return True

    def fail_pending(self, address: str, why: str = "unreachable") -> bool:
        """A slot of the restored plan whose worker is not coming back: fail it over like a dead
        worker. Returns whether the plan changed."""
        slot = self.slot_of(f"pending:{address}")
        if slot is None:
            return False
        self._instances.pop(address, None)
        self._held_ids.pop(address, None)
        self._replace(slot, slot.worker_id, why)
        return True

    def pending(self) -> list[str]:
        """Addresses of restored slots whose worker has not re-registered."""
        return [s.worker_id.removeprefix("pending:") for r in self.replicas for s in r
                if s.worker_id.startswith("pending:")]

    def _replace(self, slot: StageSlot, gone: str, why: str = "") -> None:
        """Give a lost slot to a spare, or spread its replica over the survivors (pending slots
        of a restored plan count as survivors: they re-register into their new range)."""
        spare = self._spare()
        if spare is not None:
            self._set_slot(replace(slot, worker_id=spare.worker_id))
            how = f"spare {spare.worker_id}"
        else:
            survivors = [s.worker_id for s in self.replicas[slot.replica] if s.worker_id != gone]
            if not survivors or len(survivors) > self.config.num_layers:
                self.replicas[slot.replica] = []
                how = "none: replica dropped"
            else:
                ranges = partition_uniform(self.config.num_layers, len(survivors))
                self.replicas[slot.replica] = [
                    StageSlot(wid, slot.replica, i, a, b) for i, (wid, (a, b)) in enumerate(zip(survivors, ranges))
                ]
                how = f"{len(survivors)} survivor(s)"
        self.replicas = [r for r in self.replicas if r]
        self.replicas = [[replace(s, replica=i) for s in r] for i, r in enumerate(self.replicas)]
        self.epoch += 1
        self.failovers += 1
        self._save_state()
        if self.log:
            self.log.warning("worker_failed", worker_id=gone, replaced_by=how, epoch=self.epoch, why=why or None)

    def fold_in_spares(self) -> list[int]:
        """Give a replica that runs with fewer stages than asked (after a spread failover) its
        stages back from the spares: a live re-plan over the longer chain, once the replica has
        loaded its current layers (no churn while it loads). Returns the replicas re-planned."""
        cfg, changed = self.config, []
        for r, slots in enumerate(self.replicas):
            missing = cfg.stages - len(slots)
            if missing <= 0 or not self._loaded(slots):
                continue
            spares = self._spares()[:missing]
            if not spares:
                break
            chain = [self.workers[s.worker_id] for s in slots] + spares
            ranges = (self._initial_ranges(chain) if len(chain) == cfg.stages
                      else partition_uniform(cfg.num_layers, len(chain)))
            self.replicas[r] = [StageSlot(w.worker_id, r, i, a, b) for i, (w, (a, b)) in enumerate(zip(chain, ranges))]
            self.epoch += 1
            self._save_state()
            changed.append(r)
            if self.log:
                self.log.warning("capacity_restored", replica=r, stages=len(chain), ranges=ranges,
                                 joined=[w.worker_id for w in spares], epoch=self.epoch)
        return changed

    # -- queries -------------------------------------------------------------------------------
    def slot_of(self, worker_id: str) -> StageSlot | None:
        for replica in self.replicas:
            for slot in replica:
                if slot.worker_id == worker_id:
                    return slot
        return None

    def next_address(self, slot: StageSlot) -> str:
        """Where the stage after `slot` listens ("" for the last); a pending slot's address too."""
        stages = self.replicas[slot.replica]
        if slot.stage_index + 1 < len(stages):
            return self.addresses([stages[slot.stage_index + 1]])[0]
        return ""

    def ready(self) -> bool:
        return bool(self.replicas) and all(self._loaded(r) for r in self.replicas)

    def not_ready_reason(self) -> str:
        """Why the plan is not ready, for `stagemesh status` and the gateway's errors ("" if ready)."""
        cfg = self.config
        if not self.replicas:
            return (f"waiting for workers: {len(self.workers)} of {cfg.stages * cfg.replicas} registered "
                    f"({cfg.replicas} replica(s) x {cfg.stages} stage(s))")
        for r, slots in enumerate(self.replicas):
            for s in slots:
                where = f"replica {r} stage {s.stage_index} (layers [{s.layer_start},{s.layer_end}))"
                if s.worker_id.startswith("pending:"):
                    return (f"{where} waits for worker {s.worker_id.removeprefix('pending:')} to re-register "
                            "after the coordinator restarted")
                w = self.workers.get(s.worker_id)
                if w is None:
                    return f"{where} has no worker"
                if w.loaded_epoch != self.epoch:
                    return f"{where}: worker {w.worker_id} at {w.address} is loading its layers for epoch {self.epoch}"
        return ""

    def spares(self) -> list[Worker]:
        """Registered workers outside the plan, in registration order."""
        return self._spares()

    # -- internals -----------------------------------------------------------------------------
    def _loaded(self, slots: list[StageSlot]) -> bool:
        return all(s.worker_id in self.workers and self.workers[s.worker_id].loaded_epoch == self.epoch
                   for s in slots)

    def _spares(self) -> list[Worker]:
        in_plan = {s.worker_id for r in self.replicas for s in r}
        return [w for w in self.workers.values() if w.worker_id not in in_plan]

    def _spare(self) -> Worker | None:
        spares = self._spares()
        return spares[0] if spares else None

    def _forget(self, worker_id: str) -> None:
        self.workers.pop(worker_id, None)

    def _set_slot(self, slot: StageSlot) -> None:
        self.replicas[slot.replica][slot.stage_index] = slot

    def _maybe_plan(self) -> None:
        cfg = self.config
        needed = cfg.stages * cfg.replicas
        if self.replicas or len(self.workers) < needed:
            return
        ids = list(self.workers)[:needed]
        self.replicas = []
        for r in range(cfg.replicas):
            chain = [self.workers[w] for w in ids[r * cfg.stages:(r + 1) * cfg.stages]]
            ranges = self._initial_ranges(chain)
            self.replicas.append([StageSlot(w.worker_id, r, i, a, b) for i, (w, (a, b)) in enumerate(zip(chain, ranges))])
            if self.log:
                self.log.info("plan_built", replica=r, ranges=ranges, policy=cfg.plan,
                              ms_per_layer=[round(w.decode_ms_per_layer, 3) for w in chain])
        self.epoch += 1
        self._save_state()

    def _initial_ranges(self, chain: list[Worker]) -> list[tuple[int, int]]:
        cfg = self.config
        if cfg.split:
            return partition_from_split(cfg.num_layers, list(cfg.split))
        if cfg.plan == "measured" and all(w.decode_ms_per_layer > 0 for w in chain):
            costs = [1.0] * cfg.num_layers
            workers = [WorkerCost(w.decode_ms_per_layer, int(w.memory_bytes * 0.9)) for w in chain]
            try:
                layer_bytes = [chain[0].bytes_per_layer] * cfg.num_layers if chain[0].bytes_per_layer else None
                return partition_min_max(costs, workers, layer_bytes)
            except ValueError as exc:
                if self.log:
                    self.log.warning("measured_plan_infeasible", error=str(exc))
        return partition_uniform(cfg.num_layers, cfg.stages)

    def rebalance(self, replica: int) -> list[tuple[int, int]] | None:
        """Move layer boundaries of one replica by measured step times; returns the new ranges,
        or None when the predicted gain is below the hysteresis margin."""
        cfg = self.config
        slots = self.replicas[replica]
        chain = [self.workers.get(s.worker_id) for s in slots]
        if any(w is None or w.mean_step_us <= 0 for w in chain):
            return None
        costs = [1.0] * cfg.num_layers
        # Every stage runs the same micro-batches, so step times compare directly.
        workers = [WorkerCost(w.mean_step_us / 1000 / (s.layer_end - s.layer_start), int(w.memory_bytes * 0.9))
                   for w, s in zip(chain, slots)]
        current = [(s.layer_start, s.layer_end) for s in slots]
        new = partition_min_max(costs, workers)
        now_max = max(stage_times(current, costs, workers))
        new_max = max(stage_times(new, costs, workers))
        if new == current or new_max > now_max * (1 - cfg.rebalance_min_gain):
            return None
        if (replica, tuple(new)) in self._undone:  # tried, not loadable: don't churn on it again
            return None
        self.replicas[replica] = [replace(s, layer_start=a, layer_end=b) for s, (a, b) in zip(slots, new)]
        self._moves[replica] = ([(s.layer_start, s.layer_end) for s in slots], self.addresses(slots),
                                time.monotonic())
        self.epoch += 1
        self.rebalances += 1
        self._save_state()
        if self.log:
            self.log.warning("rebalanced", replica=replica, old=current, new=new, epoch=self.epoch,
                             predicted_max_ms=round(new_max, 3), measured_max_ms=round(now_max, 3))
        return new

    def revert_stalled_moves(self, timeout_s: float) -> list[int]:
        """Undo moves whose new layers some stage has not loaded within timeout_s; returns the
        replicas reverted. A worker that fails to load keeps serving its old layers, so bringing
        the old ranges back (a new epoch; stages whose layers match only reset their KV) resumes
        serving instead of pausing the replica for good."""
        now = time.monotonic()
        reverted = []
        for replica, (before, addresses, when) in list(self._moves.items()):
            slots = self.replicas[replica]
            loaded = all(s.worker_id in self.workers and self.workers[s.worker_id].loaded_epoch == self.epoch
                         for s in slots)
            if loaded or self.addresses(slots) != addresses:  # done, or a failover re-planned it since
                del self._moves[replica]
                self._save_state()
                continue
            if now - when < timeout_s:
                continue
            del self._moves[replica]
            self._undone.add((replica, tuple((s.layer_start, s.layer_end) for s in slots)))
            self.replicas[replica] = [replace(s, layer_start=a, layer_end=b) for s, (a, b) in zip(slots, before)]
            self.epoch += 1
            self._save_state()
            reverted.append(replica)
            if self.log:
                self.log.warning("rebalance_reverted", replica=replica, epoch=self.epoch, ranges=before,
                                 waited_s=round(now - when, 1))
        return reverted

    def _new_id(self) -> str:
        self._next_id += 1
        return f"w{self._next_id - 1}"

    def _instance_of(self, slot: StageSlot) -> str:
        w = self.workers.get(slot.worker_id)
        return w.instance_id if w else self._instances.get(slot.worker_id.removeprefix("pending:"), "")

    def addresses(self, slots: list[StageSlot]) -> list[str]:
        """Where each slot's worker listens (a restored plan's slot names it until it re-registers)."""
        return [self.workers[s.worker_id].address if s.worker_id in self.workers
                else s.worker_id.removeprefix("pending:") for s in slots]

    def _save_state(self) -> None:
        path = self.config.state_file
        if not path:
            return
        state = {
            "epoch": self.epoch,
            "replicas": [[{**asdict(s), "worker_id": self._held_ids.get(a, s.worker_id), "address": a,
                           "instance_id": self._instance_of(s)}
                          for s, a in zip(r, self.addresses(r))] for r in self.replicas],
            "next_id": self._next_id,
            "moves": {str(r): {"ranges": before, "addresses": addrs} for r, (before, addrs, _) in self._moves.items()},
        }
        tmp = f"{path}.tmp"
        Path(tmp).write_text(json.dumps(state))
        os.replace(tmp, path)  # atomic: a crash never leaves half a plan

    def _load_state(self) -> None:
        path = self.config.state_file
        if not path or not Path(path).exists():
            return
        state = json.loads(Path(path).read_text())
        self.epoch = int(state["epoch"])
        self.replicas = []
        for r in state["replicas"]:
            slots = []
            for s in r:
                slots.append(StageSlot(f"pending:{s['address']}", s["replica"], s["stage_index"],
                                       s["layer_start"], s["layer_end"]))
                if s.get("instance_id"):
                    self._instances[s["address"]] = s["instance_id"]
                if not s["worker_id"].startswith("pending:"):
                    self._held_ids[s["address"]] = s["worker_id"]
            self.replicas.append(slots)
        for r, move in state.get("moves", {}).items():  # a move in progress: its clock starts again
            self._moves[int(r)] = ([tuple(x) for x in move["ranges"]], move["addresses"], time.monotonic())
        self._next_id = max(int(state.get("next_id", 1)), self._next_id)
        self.restored_at = time.monotonic()
        if self.log:
            self.log.info("plan_restored", epoch=self.epoch, stages=len(self.pending()), moves=len(self._moves))
