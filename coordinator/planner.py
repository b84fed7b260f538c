"""Layer partitioning: which contiguous layer range each stage serves. Pure functions.

`partition_min_max` is the measured planner: given each worker's time per unit of layer cost
and its memory, it picks contiguous ranges that minimise the slowest stage (the pipeline's
throughput is set by its slowest stage). DeepSpeed's `partition_balanced` minimises max - min of
the parts' weights instead and knows nothing of worker speed, so it is not used for planning;
tests/test_planner.py shows both objectives side by side.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerCost:
    """What the planner knows of one worker (in chain order)."""

    ms_per_cost: float  # stage time per unit of layer cost (a decode step), measured
    memory_bytes: int = 0  # 0: unconstrained


def partition_uniform(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges whose sizes differ by at most one (earlier stages larger).

    The last stage also runs the LM head, so when the split is uneven the extra layers go first.
    """
    if num_stages <= 0 or num_layers < num_stages:
        raise ValueError(f"cannot split {num_layers} layers into {num_stages} stages")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for i in range(num_stages):
        size = base + (1 if i < extra else 0)
        ranges.append((start, start + size))
        start += size
    return ranges


def partition_from_split(num_layers: int, split: list[int]) -> list[tuple[int, int]]:
    """An explicit override: layer counts per stage, e.g. [10, 12, 10]."""
    if any(n < 1 for n in split) or sum(split) != num_layers:
        raise ValueError(f"--split {','.join(map(str, split))} must be positive counts summing to {num_layers}")
    ranges, start = [], 0
    for n in split:
        ranges.append((start, start + n))
        start += n
    return ranges


def partition_min_max(layer_costs: list[float], workers: list[WorkerCost],
                      layer_bytes: list[int] | None = None) -> list[tuple[int, int]]:
    """Contiguous ranges, one per worker in order, minimising max_w(ms_per_cost_w * cost(range_w)).

    Among the plans with that minimal maximum, the one with the smallest sum of squared stage
    times is returned, so the stages that do not set the pace are balanced too. Exact dynamic
    programmes, O(stages x layers^2); ranges must fit each worker's memory. Raises ValueError
    when no assignment fits.
    """
    if not workers or len(layer_costs) < len(workers):
        raise ValueError(f"cannot split {len(layer_costs)} layers into {len(workers)} stages")
    best_max = _dp(layer_costs, workers, layer_bytes, combine=max, cap=float("inf"))[0]
    _, ranges = _dp(layer_costs, workers, layer_bytes, combine=lambda acc, t: acc + t * t,
                    cap=best_max * (1 + 1e-9) + 1e-12)
    return ranges


def _dp(layer_costs, workers, layer_bytes, combine, cap):
    """min over contiguous splits of fold(combine, stage times), every stage time <= cap."""
    n, s = len(layer_costs), len(workers)
    prefix = [0.0]
    for c in layer_costs:
        prefix.append(prefix[-1] + c)
    bprefix = [0]
    for b in layer_bytes or [0] * n:
        bprefix.append(bprefix[-1] + b)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(s + 1)]  # best[i][j]: layers [0, j) on workers [0, i)
    cut = [[0] * (n + 1) for _ in range(s + 1)]
    best[0][0] = 0.0
    for i in range(1, s + 1):
        w = workers[i - 1]
        for j in range(i, n - (s - i) + 1):
            for k in range(i - 1, j):
                if best[i - 1][k] == inf:
                    continue
                if w.memory_bytes and bprefix[j] - bprefix[k] > w.memory_bytes:
                    continue
                t = w.ms_per_cost * (prefix[j] - prefix[k])
                if t > cap:
                    continue
                value = combine(best[i - 1][k], t)
                if value < best[i][j] - 1e-12:
                    best[i][j], cut[i][j] = value, k
    if best[s][n] == inf:
        raise ValueError("no contiguous split fits the workers' memory")
    ranges, j = [], n
    for i in range(s, 0, -1):
        k = cut[i][j]
        ranges.append((k, j))
        j = k
    return best[s][n], ranges[::-1]


def stage_times(ranges: list[tuple[int, int]], layer_costs: list[float], workers: list[WorkerCost]) -> list[float]:
    """Predicted step time of each stage under a plan."""
    return [w.ms_per_cost * sum(layer_costs[a:b]) for (a, b), w in zip(ranges, workers)]
