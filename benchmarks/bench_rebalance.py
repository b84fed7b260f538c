"""Measured plans and live rebalancing (CPU, tiny model); ratios from one run.

3 stages, the middle worker slowed 2x (`--slowdown 2`, standing in for a slower GPU):
  1. decode throughput with the uniform plan (no rebalancing),
  2. with the measured plan (the workers' layer profiles, min-max partition),
  3. starting uniform with live rebalancing on: throughput after the coordinator has moved the
     boundaries, and the pause the gateway saw while it did.

    python benchmarks/bench_rebalance.py [--seqs 24] [--new 96] [--json out.json]

The stages stand for separate GPUs, so each worker needs a core of its own (one torch thread
each): with 3 workers, a gateway and a coordinator on 2 cores, throughput is bounded by the
machine's total compute (half the layers' work per step) instead of by the slowest stage, which
caps measured/uniform at (2/3) / (1/2) = 1.33 however good the plan is. Run it where there are at
least 4 free cores (e.g. the GPU machine's CPUs with `CUDA_VISIBLE_DEVICES=`); it prints the count.
The model is small but not trivial (12 layers, hidden 768) so that layer compute, which a plan can
move, outweighs the fixed per-step cost of each hop, which it cannot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stagemesh.client import AsyncClient  # noqa: E402
from stagemesh.cli.demo_model import write_demo_model  # noqa: E402
from stagemesh.cli.harness import (  # noqa: E402
    coordinator_cmd, gateway_cmd, get_plan, new_port, wait_plan_ready, wait_ready_line, worker_cmd,
)


class Mesh:
    def __init__(self, model_dir: Path, coord_args: list[str], log: Path):
        cport, self.gport = new_port(), new_port()
        self.coord = f"127.0.0.1:{cport}"
        self.log = log
        cmds = [coordinator_cmd(model_dir, cport, 3, *coord_args)]
        cmds += [worker_cmd(model_dir, self.coord, new_port(), 2048, *(["--slowdown", "2"] if i == 1 else []))
                 for i in range(3)]
        cmds.append(gateway_cmd(model_dir, self.coord, self.gport, "--log-level", "info"))
        self.procs = []
        with open(log, "w") as fh:
            for cmd in cmds:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=fh, text=True)
                self.procs.append(proc)
                wait_ready_line(proc, cmd[2])
        wait_plan_ready(self.coord)

    def ranges(self):
        return [(s.layer_start, s.layer_end) for s in get_plan(self.coord).replicas[0].stages]

    def pauses_ms(self) -> list[float]:
        return [float(m) for m in re.findall(r'"pause_ms": ([0-9.]+)', self.log.read_text())]

    def close(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait()


def median_rate(address: str, seqs: int, new: int, repeats: int = 3) -> float:
    """Median decode tok/s over `repeats` runs (this machine is shared: single runs vary by 10-20%)."""
    return statistics.median(asyncio.run(decode_rate(address, seqs, new)) for _ in range(repeats))


async def decode_rate(address: str, seqs: int, new: int) -> float:
    async with AsyncClient(address) as client:
        t = time.perf_counter()
        outs = await asyncio.gather(*[
            client.generate(prompt_ids=[5 + i, 6, 7, 8] * 8, max_tokens=new, ignore_eos=True, timeout=600)
            for i in range(seqs)
        ])
        return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=24)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--json", default="")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    model_dir = write_demo_model(tmp / "m", num_layers=args.layers, hidden_size=args.hidden, num_heads=12,
                                 num_kv_heads=4, intermediate_size=args.hidden * 8 // 3)
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores; model: {args.layers} layers, hidden {args.hidden}", flush=True)
    res = {"cores": cores, "layers": args.layers, "hidden": args.hidden}
    for name, coord_args in [("uniform", ["--plan", "uniform", "--no-rebalance"]),
                             ("measured", ["--plan", "measured", "--no-rebalance"])]:
        mesh = Mesh(model_dir, coord_args, tmp / f"{name}.log")
        try:
            asyncio.run(decode_rate(f"127.0.0.1:{mesh.gport}", 4, 8))  # warm-up
            res[f"{name}_ranges"] = mesh.ranges()
            res[f"{name}_tok_s"] = median_rate(f"127.0.0.1:{mesh.gport}", args.seqs, args.new)
        finally:
            mesh.close()
    mesh = Mesh(model_dir, ["--plan", "uniform", "--rebalance-window-s", "2", "--rebalance-min-interval-s", "0"],
                tmp / "live.log")
    try:
        address = f"127.0.0.1:{mesh.gport}"
        start = mesh.ranges()
        deadline = time.monotonic() + 120
        while mesh.ranges() == start and time.monotonic() < deadline:  # serve until it rebalances
            asyncio.run(decode_rate(address, args.seqs, 24))
        res["live_ranges_before"], res["live_ranges_after"] = start, mesh.ranges()
        time.sleep(3)  # let any follow-up move settle (there should be none: hysteresis)
        res["live_after_tok_s"] = median_rate(address, args.seqs, args.new)
        res["live_ranges_final"] = mesh.ranges()
        res["live_pauses_ms"] = mesh.pauses_ms()
    finally:
        mesh.close()
    ratio_plan = res["measured_tok_s"] / res["uniform_tok_s"]
    ratio_live = res["live_after_tok_s"] / res["measured_tok_s"]
    rows = [
        (f"uniform plan {res['uniform_ranges']}: decode tok/s", res["uniform_tok_s"], ""),
        (f"measured plan {res['measured_ranges']}: decode tok/s", res["measured_tok_s"], ""),
        ("ratio measured / uniform (target >= 1.3)", ratio_plan, "met" if ratio_plan >= 1.3 else "MISSED"),
        (f"after live rebalance {res['live_ranges_after']}: decode tok/s", res["live_after_tok_s"], ""),
        ("ratio live-rebalanced / measured (target >= 0.9)", ratio_live, "met" if ratio_live >= 0.9 else "MISSED"),
        ("pause seen by the gateway, ms (max)", max(res["live_pauses_ms"] or [float("nan")]), ""),
    ]
    for name, v, verdict in rows:
        print(f"{name:<66} {v:>10.2f} {verdict}")
    res["ratio_measured_over_uniform"], res["ratio_live_over_measured"] = ratio_plan, ratio_live
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
