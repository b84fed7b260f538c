"""Summarise the step profiler's tables (`STAGEMESH_PROFILE`, `bench_gpu.py --profile`): GPU ms
per step by kernel class (paged decode attention, GEMMs, activation quant, the rest) from each
file's self-CUDA table.

    python3 benchmarks/profile_kernels.py OUT/profile/worker-*.txt

The table lists the 30 longest kernels, so "other" misses the last few tiny ones; rows of CPU
ops (aten::*) and CUDA API calls are skipped (their CUDA time is the kernels' own, counted once).
Steps per window: the attention kernel's calls / layers when --layers is given, else the route
table's step count.
"""

from __future__ import annotations

import argparse
import re

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def kernel_class(name: str) -> str | None:
    if name.startswith(("aten::", "cuda", "cu")) or name in ("Activity Buffer Request", "INVALID"):
        return None  # a CPU op or an API call
    if name == "_decode_kernel":
        return "attention"
    if name.startswith("nvjet") or "gemm" in name.lower() or "gemv" in name:
        return "gemm"
    return "act quant" if "quant" in name else "other"


def summarise(path: str, layers: int = 0) -> tuple[list[str], dict[str, float], int]:
    """(route table row, ms per class over the window, steps)."""
    text = open(path).read()
    route = text.splitlines()[1].split()
    body = text[text.rindex("Name    Self CPU %"):]  # the last table: sorted by self CUDA time
    ms: dict[str, float] = {}
    calls_attention = 0
    for line in body.splitlines()[2:]:
        if "Self CPU time total" in line:
            break
        cols = re.split(r"\s{2,}", line.strip())
        if len(cols) < 10 or line.startswith("-"):  # a rule, not a row
            continue
        cls = kernel_class(cols[0])
        if cls is None:
            continue
        value = re.match(r"([0-9.]+)([a-z]+)", cols[6])
        ms[cls] = ms.get(cls, 0.0) + float(value[1]) * _UNITS[value[2]]
        calls_attention += int(cols[-1]) if cls == "attention" else 0
    steps = calls_attention // layers if layers and calls_attention else int(route[1])
    return route, ms, steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--layers", type=int, default=0, help="layers per step (steps = attention calls / layers)")
    args = ap.parse_args()
    for path in args.paths:
        route, ms, steps = summarise(path, args.layers)
        per_step = {c: round(v / steps, 2) for c, v in sorted(ms.items())}
        print(f"{path}: route {route[0]}, {route[3]} tokens/step, {steps} steps; GPU ms per step {per_step}, "
              f"total {sum(ms.values()) / steps:.2f}")


if __name__ == "__main__":
    main()
