"""Registry restart paths, pure and fast: a plan restored from the state file, pending slots that
come back, never come back, or come back as a new process; spread failovers folded back in."""

from __future__ import annotations

from coordinator.config import CoordinatorConfig
from coordinator.registry import Registry


def _config(tmp_path, stages=3, **kw) -> CoordinatorConfig:
    return CoordinatorConfig(num_layers=6, stages=stages, plan="uniform", state_file=str(tmp_path / "plan.json"), **kw)


def _load_all(reg: Registry) -> None:
    """Every worker reports the current epoch loaded, as its heartbeat does after loading."""
    for w in list(reg.workers.values()):
        reg.heartbeat(w.worker_id, reg.epoch, 64, 0.0)


def _chain(reg: Registry, replica=0) -> list[tuple[str, int, int]]:
    return [(a, s.layer_start, s.layer_end) for s, a in zip(reg.replicas[replica], reg.addresses(reg.replicas[replica]))]


def _serving(tmp_path, stages=3, spares=0):
    reg = Registry(_config(tmp_path, stages))
    for i in range(stages + spares):
        reg.register(f"h:{i}", "cpu", 1 << 30, instance_id=f"p{i}")
    _load_all(reg)
    assert reg.ready()
    return reg


def test_restored_plan_comes_back_whole_when_its_workers_reregister(tmp_path):
    old = _serving(tmp_path)
    ids = [s.worker_id for s in old.replicas[0]]
    reg = Registry(old.config)  # the coordinator restarts
    assert reg.epoch == old.epoch and reg.pending() == ["h:0", "h:1", "h:2"]
    assert not reg.ready() and "waits for worker h:0 to re-register" in reg.not_ready_reason()
    # The stage before a pending one gets the pending one's address: nothing raises.
    first = reg.register("h:0", "cpu", 1 << 30, instance_id="p0")
    assert reg.next_address(reg.slot_of(first.worker_id)) == "h:1"
    for i in (1, 2):
        reg.register(f"h:{i}", "cpu", 1 << 30, instance_id=f"p{i}")
    _load_all(reg)
    # Same slots, same worker ids, same epoch: the gateway keeps its KV.
    assert reg.ready() and reg.epoch == old.epoch and [s.worker_id for s in reg.replicas[0]] == ids
    assert reg.not_ready_reason() == ""


def test_pending_slot_whose_worker_died_fails_over_to_a_spare(tmp_path):
    old = _serving(tmp_path, spares=1)
    reg = Registry(old.config)
    for i in (0, 2, 3):  # h:1 died while the coordinator was down; h:3 is the spare
        reg.register(f"h:{i}", "cpu", 1 << 30, instance_id=f"p{i}")
    assert [w.address for w in reg.spares()] == ["h:3"]
    epoch = reg.epoch
    assert reg.fail_pending("h:1")
    assert reg.epoch == epoch + 1 and reg.pending() == []
    assert _chain(reg) == [("h:0", 0, 2), ("h:3", 2, 4), ("h:2", 4, 6)]
    _load_all(reg)
    assert reg.ready()


def test_pending_slot_without_spare_spreads_over_survivors_pending_ones_included(tmp_path):
    old = _serving(tmp_path)
    reg = Registry(old.config)
    reg.register("h:0", "cpu", 1 << 30, instance_id="p0")  # h:2 is slow to come back, h:1 is dead
    assert reg.fail_pending("h:1")
    assert _chain(reg) == [("h:0", 0, 3), ("h:2", 3, 6)]
    assert reg.pending() == ["h:2"]
    # A survivor still pending re-registers into its new range (the assignment reloads it).
    w2 = reg.register("h:2", "cpu", 1 << 30, instance_id="p2")
    assert reg.slot_of(w2.worker_id).layer_start == 3
    _load_all(reg)
    assert reg.ready() and len(reg.replicas[0]) == 2


def test_new_process_at_a_pending_address_does_not_inherit_the_slot(tmp_path):
    old = _serving(tmp_path, spares=1)
    reg = Registry(old.config)
    for i in (0, 2, 3):
        reg.register(f"h:{i}", "cpu", 1 << 30, instance_id=f"p{i}")
    # h:1 was restarted (a new process, its KV gone) while the coordinator was down.
    newcomer = reg.register("h:1", "cpu", 1 << 30, instance_id="p1-restarted")
    assert reg.slot_of(newcomer.worker_id) is None and reg.pending() == []
    assert [w.address for w in reg.spares()] == ["h:1"]
    assert _chain(reg) == [("h:0", 0, 2), ("h:3", 2, 4), ("h:2", 4, 6)]


def test_restarted_worker_with_live_coordinator_is_failed_over_not_reused(tmp_path):
    reg = _serving(tmp_path)
    old_ids = [s.worker_id for s in reg.replicas[0]]
    epoch = reg.epoch
    again = reg.register("h:2", "cpu", 1 << 30, instance_id="p2-restarted")
    # The dead process's slot was spread over the survivors before the newcomer could take it.
    assert reg.epoch > epoch and again.worker_id not in old_ids
    assert [s.worker_id for s in reg.replicas[0]] == old_ids[:2]
    assert reg.slot_of(again.worker_id) is None  # a spare, until the short replica has loaded
    _load_all(reg)
    assert reg.fold_in_spares() == [0]
    assert [s.worker_id for s in reg.replicas[0]] == [*old_ids[:2], again.worker_id]


def test_spread_replica_takes_a_joining_worker_back_in(tmp_path):
    reg = _serving(tmp_path)
    victim = reg.replicas[0][1].worker_id
    assert reg.fail(victim)
    assert _chain(reg) == [("h:0", 0, 3), ("h:2", 3, 6)]
    joiner = reg.register("h:9", "cpu", 1 << 30, instance_id="p9")
    assert reg.slot_of(joiner.worker_id) is None, "folded in while the short replica was still loading"
    assert "loading its layers" in reg.not_ready_reason()
    _load_all(reg)
    epoch = reg.epoch
    assert reg.fold_in_spares() == [0]
    assert reg.epoch == epoch + 1 and _chain(reg) == [("h:0", 0, 2), ("h:2", 2, 4), ("h:9", 4, 6)]
    assert reg.fold_in_spares() == []  # full again: nothing to do
    _load_all(reg)
    assert reg.ready()


def test_state_survives_two_restarts_and_ids_are_never_reused(tmp_path):
    old = _serving(tmp_path)
    ids = {w.worker_id for w in old.workers.values()}
    second = Registry(old.config)
    second.register("h:0", "cpu", 1 << 30, instance_id="p0")
    third = Registry(old.config)  # restarted again before h:1, h:2 came back
    for i in range(3):
        third.register(f"h:{i}", "cpu", 1 << 30, instance_id=f"p{i}")
    assert {s.worker_id for s in third.replicas[0]} == ids
    fresh = third.register("h:7", "cpu", 1 << 30)
    assert fresh.worker_id not in ids


def test_not_ready_reason_before_the_plan_is_built(tmp_path):
    reg = Registry(_config(tmp_path, stages=2))
    reg.register("h:0", "cpu", 1 << 30)
    assert reg.not_ready_reason().startswith("waiting for workers: 1 of 2 registered")


def test_worker_ids_never_repeat_across_a_restart(tmp_path):
    """A spare registered after the plan was last saved keeps heartbeating the restarted
    coordinator with its old id; a newcomer must never be handed that id, or the two processes
    would share one registry entry (the spare lost, its heartbeats keeping the newcomer alive)."""
    old = _serving(tmp_path, spares=1)
    spare_id = old.spares()[0].worker_id
    reg = Registry(old.config)  # the coordinator restarts
    newcomer = reg.register("h:9", "cpu", 1 << 30, instance_id="p9")
    assert newcomer.worker_id != spare_id
    assert reg.heartbeat(spare_id, 0, 0, 0.0) is None  # so the spare is told to re-register
