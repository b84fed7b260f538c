"""Failover figures under `stagemesh up` (CPU, tiny model): time from kill -9 of a plan worker to
the first resumed token, median and max over repeated kills, and requests lost (must be 0).

The mesh runs as users run it: `stagemesh up --stages 2 --spares 1`, which restarts the killed
worker (it rejoins as the next spare). Each round streams `--streams` generations, waits until
every stream has tokens, kills one worker of the plan by the PID of up's child, and measures per
stream the time from the kill to its first resumed token: the token that ends the stream's
longest pause after the kill (a token that arrives within milliseconds of the kill was computed
before it, so "the next token" would flatter). A round's figure is its slowest stream (every
stream resumed); the median over all streams is printed too. The next round starts once the
plan is ready again with a spare registered.

    python benchmarks/bench_failover.py [--kills 10] [--streams 16] [--max-tokens 160] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from stagemesh.client import AsyncClient  # noqa: E402
from stagemesh.cli.demo_model import write_demo_model  # noqa: E402
from stagemesh.v1 import stagemesh_pb2 as pb  # noqa: E402
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc  # noqa: E402
from stagemesh.cli.harness import mesh  # noqa: E402


def get_plan(m) -> pb.Plan:
    with grpc.insecure_channel(m.coordinator) as ch:
        return pb_grpc.CoordinatorStub(ch).GetPlan(pb.GetPlanRequest(), timeout=5)


async def one_round(m, streams: int, max_tokens: int, rng: random.Random) -> tuple[int, list[float], int, int]:
    """Returns (the stage killed, per stream: seconds from the kill to its first resumed token,
    completed, failed)."""
    counts = [0] * streams
    arrivals: list[list[float]] = [[] for _ in range(streams)]  # when each message with tokens came

    async def stream(i: int, client: AsyncClient):
        prompt = [rng.randrange(3, 700) for _ in range(rng.randint(8, 48))]
        async for msg in client.stream(prompt_ids=prompt, max_tokens=max_tokens, ignore_eos=True, timeout=300):
            if msg.token_ids:
                counts[i] += len(msg.token_ids)
                arrivals[i].append(time.perf_counter())

    async with AsyncClient(m.address) as client:
        tasks = [asyncio.create_task(stream(i, client)) for i in range(streams)]
        while min(counts) < 4:  # every stream mid-stream
            if any(t.done() for t in tasks):
                raise RuntimeError("a stream ended before the kill; raise --max-tokens")
            await asyncio.sleep(0.005)
        plan = get_plan(m)
        victim = rng.choice([s.address for r in plan.replicas for s in r.stages])
        pid = m.pid_at("stage_worker", victim)
        stage = next(i for r in plan.replicas for i, s in enumerate(r.stages) if s.address == victim)
        kill_at = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        results = await asyncio.gather(*tasks, return_exceptions=True)
    failed = sum(isinstance(r, BaseException) for r in results)
    return stage, [resumed_after(a, kill_at) for a in arrivals if a[-1] > kill_at], len(results) - failed, failed


def resumed_after(arrivals: list[float], kill_at: float) -> float:
    """Seconds from the kill to the token ending the longest pause that spans or follows it."""
    last = max(i for i, t in enumerate(arrivals) if t <= kill_at)
    later = arrivals[last:]
    gaps = [(b - a, b) for a, b in zip(later, later[1:])]
    return max(gaps)[1] - kill_at


def wait_whole(m, timeout_s: float = 120) -> None:
    """Until the plan is ready with a spare registered again (the killed worker, restarted by up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            plan = get_plan(m)
            if plan.ready and plan.spares and all(len(r.stages) == 2 for r in plan.replicas):
                return
        except grpc.RpcError:  # coordinator briefly unreachable: try again
            pass
        time.sleep(0.1)
    raise RuntimeError(f"mesh not whole again within {timeout_s}s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    model_dir = write_demo_model(Path(tempfile.mkdtemp()) / "m", num_layers=4)
    rng = random.Random(0)
    round_gaps, stream_gaps, done, lost = [], [], 0, 0
    with mesh(model_dir, stages=2, timeout_s=300,
              extra=["--spares", "1", "--kv-blocks", "1024", "--threads", "1"]) as m:
        wait_whole(m)
        for k in range(args.kills):
            stage, gaps, ok, failed = asyncio.run(one_round(m, args.streams, args.max_tokens, rng))
            round_gaps.append(max(gaps))
            stream_gaps += gaps
            done += ok
            lost += failed
            print(f"kill {k + 1} (stage {stage}): every stream resumed after {max(gaps) * 1e3:.0f} ms "
                  f"(median stream {statistics.median(gaps) * 1e3:.0f} ms); {ok} done, {failed} lost", flush=True)
            wait_whole(m)
        restarts = sum("restarted worker" in line for line in m.stderr_lines)
    result = {
        "kills": args.kills, "streams_per_kill": args.streams, "max_tokens": args.max_tokens,
        "resume_ms_median": statistics.median(round_gaps) * 1e3, "resume_ms_max": max(round_gaps) * 1e3,
        "stream_resume_ms_median": statistics.median(stream_gaps) * 1e3,
        "requests_completed": done, "requests_lost": lost, "workers_restarted_by_up": restarts,
        "detection": "a failed Forward makes the gateway report the replica; the coordinator health-checks "
                     "its workers (0.5 s timeout); missed heartbeats (--dead-after-s 1.5) catch the rest",
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
