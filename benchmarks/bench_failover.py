"""Failover figures (CPU, tiny model): time from kill -9 of a stage worker to the first resumed
token, median and max over repeated kills, and requests lost (must be 0).

Mesh: coordinator, 2 stages + 1 spare, gateway, as separate processes. Each round streams
`--streams` long generations, kills one worker of the plan mid-stream, and measures, over the
streams, the time from the kill until every stream has its next token. A fresh worker is then
started so a spare is always there.

    python benchmarks/bench_failover.py [--kills 20] [--streams 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stagemesh.client import AsyncClient  # noqa: E402
from stagemesh.demo_model import write_demo_model  # noqa: E402
from tests.procs import _wait_ready, manual_mesh, new_port, worker_cmd  # noqa: E402
from tests.test_failover import plan_workers  # noqa: E402


async def one_round(m, procs: dict, streams: int, rng: random.Random) -> tuple[float, int, int]:
    """Returns (seconds from kill to the last stream's next token, completed, failed)."""
    last_token: dict[int, float] = {}
    after_kill: dict[int, float] = {}
    kill_at = None

    async def stream(i: int, client: AsyncClient):
        prompt = [rng.randrange(3, 700) for _ in range(rng.randint(8, 48))]
        async for msg in client.stream(prompt_ids=prompt, max_tokens=600, ignore_eos=True, timeout=120):
            if msg.token_ids:
                now = time.perf_counter()
                last_token[i] = now
                if kill_at is not None and i not in after_kill and now > kill_at:
                    after_kill[i] = now

    async with AsyncClient(m["gateway"]) as client:
        tasks = [asyncio.create_task(stream(i, client)) for i in range(streams)]
        await asyncio.sleep(rng.uniform(0.3, 0.8))
        victim_addr = rng.choice(plan_workers(m["coordinator"]))
        kill_at = time.perf_counter()
        procs.pop(victim_addr).kill()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    failed = sum(isinstance(r, BaseException) for r in results)
    gap = max(after_kill.values()) - kill_at if after_kill else float("nan")
    return gap, len(results) - failed, failed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    model_dir = write_demo_model(Path(tempfile.mkdtemp()) / "m", num_layers=4)
    rng = random.Random(0)
    gaps, done, lost = [], 0, 0
    with manual_mesh(model_dir, stages=2, spares=1, kv_blocks=1024) as m:
        procs = dict(zip(m["workers"], m["procs"][1:-1]))
        for k in range(args.kills):
            gap, ok, failed = asyncio.run(one_round(m, procs, args.streams, rng))
            gaps.append(gap)
            done += ok
            lost += failed
            port = new_port()  # a replacement spare joins
            proc = subprocess.Popen(worker_cmd(model_dir, m["coordinator"], port, 1024), stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)
            _wait_ready(proc, "spare")
            procs[f"127.0.0.1:{port}"] = proc
            m["procs"].insert(1, proc)  # stopped with the mesh
            print(f"kill {k + 1}: first resumed token after {gap * 1e3:.0f} ms; {ok} done, {failed} lost", flush=True)
            time.sleep(0.5)
    result = {
        "kills": args.kills, "streams_per_kill": args.streams,
        "resume_ms_median": statistics.median(gaps) * 1e3, "resume_ms_max": max(gaps) * 1e3,
        "requests_completed": done, "requests_lost": lost,
        "detection": "a failed Forward makes the gateway report the replica; the coordinator health-checks its workers (0.5 s timeout); missed heartbeats (1.5 s) catch the rest",
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
