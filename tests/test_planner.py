"""The measured planner: minimise the slowest stage, respect memory, and compare objectives
with DeepSpeed's partition helpers (pure, milliseconds)."""

import pytest

from coordinator.planner import (
    WorkerCost, partition_from_split, partition_min_max, partition_uniform, stage_times,
)


def test_slow_worker_gets_fewer_layers():
    workers = [WorkerCost(1.0), WorkerCost(2.0), WorkerCost(1.0)]
    ranges = partition_min_max([1.0] * 12, workers)
    sizes = [b - a for a, b in ranges]
    assert sizes[1] < sizes[0] and sizes[1] < sizes[2]
    assert max(stage_times(ranges, [1.0] * 12, workers)) == 5.0  # 5 / 2.5 / 5 is optimal for 12 layers


def test_min_max_is_optimal_by_brute_force():
    import itertools

    costs = [1, 3, 1, 1, 2, 1, 4, 1, 1]
    workers = [WorkerCost(1.0), WorkerCost(1.5), WorkerCost(0.7)]
    best = min(
        max(stage_times([(0, a), (a, b), (b, len(costs))], costs, workers))
        for a, b in itertools.combinations(range(1, len(costs)), 2)
    )
    ranges = partition_min_max(costs, workers)
    assert max(stage_times(ranges, costs, workers)) == pytest.approx(best)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(costs)
    assert all(a < b for a, b in ranges) and all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))


def test_memory_limits_are_respected():
    workers = [WorkerCost(1.0, memory_bytes=3), WorkerCost(5.0, memory_bytes=100)]
    ranges = partition_min_max([1.0] * 8, workers, layer_bytes=[1] * 8)
    assert ranges[0] == (0, 3)  # the fast worker would take more, but only 3 layers fit
    with pytest.raises(ValueError):
        partition_min_max([1.0] * 8, [WorkerCost(1, 2), WorkerCost(1, 2)], layer_bytes=[1] * 8)


def test_explicit_split_and_uniform():
    assert partition_from_split(10, [3, 3, 4]) == [(0, 3), (3, 6), (6, 10)]
    with pytest.raises(ValueError):
        partition_from_split(10, [3, 3])
    assert partition_uniform(10, 3) == [(0, 4), (4, 7), (7, 10)]


def test_min_max_beats_deepspeed_balanced_on_the_slowest_stage():
    """DeepSpeed's partition_balanced minimises max - min of part weights and ignores worker speed;
    the pipeline's throughput is set by the slowest stage, which min-max minimises."""
    from deepspeed.runtime.utils import partition_balanced, partition_uniform as ds_uniform

    costs = [1.0] * 12
    workers = [WorkerCost(1.0), WorkerCost(2.0), WorkerCost(1.0)]
    ours = max(stage_times(partition_min_max(costs, workers), costs, workers))
    for parts in (partition_balanced(costs, 3), ds_uniform(12, 3)):
        ranges = list(zip(parts[:-1], parts[1:]))
        theirs = max(stage_times(ranges, costs, workers))
        assert ours < theirs  # 5.0 vs 8.0: the slow worker got a third of the layers
    # Homogeneous workers, uneven layer costs (MoE after dense layers): min-max is never worse.
    costs = [1, 1, 4, 4, 4, 4, 4, 4]
    same = [WorkerCost(1.0)] * 3
    parts = partition_balanced(costs, 3)
    balanced = max(stage_times(list(zip(parts[:-1], parts[1:])), costs, same))
    assert max(stage_times(partition_min_max(costs, same), costs, same)) <= balanced


def test_stages_that_do_not_set_the_pace_are_balanced_too():
    ranges = partition_min_max([1.0] * 6, [WorkerCost(1.0), WorkerCost(6.0), WorkerCost(1.0)])
    assert [b - a for a, b in ranges] == [3, 1, 2] or [b - a for a, b in ranges] == [2, 1, 3]


def test_a_move_not_loaded_in_time_is_undone_and_not_proposed_again():
    """Registry: a rebalance whose new layers a worker never reports loaded comes back to the old
    ranges after the timeout (new epoch), and the same move is not tried again."""
    from coordinator.config import CoordinatorConfig
    from coordinator.registry import Registry

    reg = Registry(CoordinatorConfig(num_layers=6, stages=2, plan="uniform"))
    w1, w2 = reg.register("a:1", "cpu", 1 << 30), reg.register("a:2", "cpu", 1 << 30)
    for w in (w1, w2):
        reg.heartbeat(w.worker_id, reg.epoch, 64, 1000.0)
    assert reg.ready() and [(s.layer_start, s.layer_end) for s in reg.replicas[0]] == [(0, 3), (3, 6)]
    reg.heartbeat(w1.worker_id, reg.epoch, 64, 8000.0)  # the first stage became 8x slower
    moved = reg.rebalance(0)
    assert moved is not None and moved[0][1] < 3 and not reg.ready()
    epoch = reg.epoch
    reg.heartbeat(w2.worker_id, epoch, 64, 1000.0)  # w2 loaded the move, w1 never does
    assert reg.revert_stalled_moves(timeout_s=60.0) == []  # not yet
    assert reg.revert_stalled_moves(timeout_s=0.0) == [0]
    assert reg.epoch == epoch + 1 and [(s.layer_start, s.layer_end) for s in reg.replicas[0]] == [(0, 3), (3, 6)]
    for w in (w1, w2):
        reg.heartbeat(w.worker_id, reg.epoch, 64, 8000.0 if w is w1 else 1000.0)
    assert reg.ready() and reg.rebalance(0) is None  # the undone move is not proposed again


def test_a_coordinator_restarted_mid_move_still_undoes_it(tmp_path):
    """The move in progress is persisted with the plan: a restarted coordinator (or its standby)
    whose workers come back without the moved layers undoes it like the first one would have."""
    from coordinator.config import CoordinatorConfig
    from coordinator.registry import Registry

    config = CoordinatorConfig(num_layers=6, stages=2, plan="uniform", state_file=str(tmp_path / "plan.json"))
    reg = Registry(config)
    w1, w2 = reg.register("a:1", "cpu", 1 << 30), reg.register("a:2", "cpu", 1 << 30)
    reg.heartbeat(w1.worker_id, reg.epoch, 64, 8000.0)
    reg.heartbeat(w2.worker_id, reg.epoch, 64, 1000.0)
    old_epoch = reg.epoch
    assert reg.rebalance(0) is not None
    moved_epoch = reg.epoch

    again = Registry(config)  # the coordinator restarts before anyone loaded the move
    assert again.epoch == moved_epoch and again.revert_stalled_moves(timeout_s=60.0) == []
    v1, v2 = again.register("a:1", "cpu", 1 << 30), again.register("a:2", "cpu", 1 << 30)
    again.heartbeat(v1.worker_id, old_epoch, 64, 8000.0)  # still serving the old layers
    again.heartbeat(v2.worker_id, old_epoch, 64, 1000.0)
    assert not again.ready() and again.revert_stalled_moves(timeout_s=0.0) == [0]
    assert [(s.layer_start, s.layer_end) for s in again.replicas[0]] == [(0, 3), (3, 6)]
    assert again.epoch == moved_epoch + 1 and Registry(config).revert_stalled_moves(timeout_s=0.0) == []
