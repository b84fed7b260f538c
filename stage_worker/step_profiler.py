"""Where a worker's step time goes while it serves (`STAGEMESH_PROFILE`): a diagnostic, off by default.

Separate from profile.py, which measures one layer at registration for the planner: this one
watches a window of live steps and writes tables for a person to read.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats


class StepProfiler:
    """Where a worker's step time goes while it serves: `STAGEMESH_PROFILE=DIR[:FIRST[:COUNT[:MODE]]]`,
    FIRST one step or several joined by "," (a window at each, e.g. one in batch-1 decode and one in a
    mixed run).

    MODE torch (default): torch.profiler's CPU and CUDA op tables; MODE python: cProfile of the
    compute thread (Python time, including waits for the GIL, which torch.profiler cannot see).

    Runs torch.profiler over steps [FIRST, FIRST+COUNT) (default 200, 50) and counts those steps
    and their time per route (decode graph, mixed graph, eager); when a window closes it writes
    DIR/worker-PID-FIRST.txt: the per-route table, then the CPU and CUDA op tables. Off (None)
    unless the variable is set; a diagnostic, not for production traffic.
    """

    def __init__(self, out_dir: str, firsts: list[int], count: int, device, mode: str = "torch"):
        self.out_dir, self.firsts, self.count, self.device, self.mode = out_dir, firsts, count, device, mode
        self.first = -1  # the open window's first step
        self.routes: dict[str, list[int]] = {}  # route -> [steps, us, tokens]
        self._prof = None

    @classmethod
    def from_env(cls, device) -> "StepProfiler | None":
        spec = os.environ.get("STAGEMESH_PROFILE", "")
        if not spec:
            return None
        parts = spec.split(":")
        firsts = [int(f) for f in parts[1].split(",")] if len(parts) > 1 else [200]
        count = int(parts[2]) if len(parts) > 2 else 50
        return cls(parts[0], firsts, count, device, parts[3] if len(parts) > 3 else "torch")

    def step_begin(self, step: int) -> None:
        if self._prof is None and step in self.firsts:
            self.first = step
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.routes.clear()  # the route table covers the window too
            if self.mode == "python":  # this (compute) thread's Python calls, time waiting for the GIL included
                self._prof = cProfile.Profile()
                self._prof.enable()
            else:
                self._prof = profile(activities=acts)
                self._prof.__enter__()
        elif step == self.first + self.count and self._prof is not None:
            if self.mode == "python":
                self._prof.disable()
            else:
                self._prof.__exit__(None, None, None)
            self._write()
            self._prof = None

    def step_end(self, route: str, us: int, tokens: int) -> None:
        r = self.routes.setdefault(route, [0, 0, 0])
        r[0] += 1
        r[1] += us
        r[2] += tokens

    def _write(self) -> None:
        lines = [f"{'route':<14} {'steps':>7} {'ms/step':>9} {'tokens/step':>12}"]
        for route, (n, us, tok) in self.routes.items():
            lines.append(f"{route:<14} {n:>7} {us / n / 1e3:>9.2f} {tok / n:>12.1f}")
        if self.mode == "python":
            buf = io.StringIO()
            stats = pstats.Stats(self._prof, stream=buf)
            stats.sort_stats("tottime").print_stats(40)
            stats.sort_stats("cumulative").print_stats(40)
            lines += ["", buf.getvalue()]
        else:
            avg = self._prof.key_averages()
            lines += ["", avg.table(sort_by="self_cpu_time_total", row_limit=30)]
            if self.device.type == "cuda":
                lines += ["", avg.table(sort_by="self_cuda_time_total", row_limit=30)]
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"worker-{os.getpid()}-{self.first}.txt"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
