"""Timing GPU work as it runs in a step: captured in a CUDA graph and replayed (no launch gaps)."""

from __future__ import annotations

import torch


def graphed(fn, calls: int = 1):
    """fn called `calls` times, captured in one CUDA graph (raises if fn syncs with the host);
    returns the graph's replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return g.replay


def graph_us(fn, calls: int = 20, reps: int = 5) -> float:
    """Median microseconds per call of fn over `reps` replays of a graph of `calls` calls."""
    replay = graphed(fn, calls)
    replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]
