"""CPU benchmark of the serving path (tiny demo model), ratios from one run.

1. Steady-state decode throughput: the mesh at 2 stages (`stagemesh up`, separate processes,
   gRPC) vs the same model and the same scheduler driven in one process (no gRPC).
2. One stage hop: time a Forward spends outside compute, per hop, vs a bare `grpc.aio` unary
   call carrying the same payload between two processes.

    python benchmarks/bench_pipeline.py [--seqs 32] [--prompt 64] [--new 96] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.block_manager import BlockManager  # noqa: E402
from gateway.engine import build_forward_request  # noqa: E402
from gateway.scheduler import Scheduler, SchedulerConfig, StepShape  # noqa: E402
from gateway.sequence import Sequence  # noqa: E402
from stage_worker.executor import StageExecutor  # noqa: E402
from stage_worker.loader import load_stage  # noqa: E402
from stagemesh import wire  # noqa: E402
from stagemesh.client import AsyncClient  # noqa: E402
from stagemesh.cli.demo_model import write_demo_model  # noqa: E402
from stagemesh.net import GRPC_OPTIONS, free_port  # noqa: E402
from stagemesh.v1 import stagemesh_pb2 as pb  # noqa: E402
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc  # noqa: E402
from stagemesh.cli.harness import mesh  # noqa: E402
from stagemesh.cli.harness import coordinator_cmd, processes, worker_cmd  # noqa: E402

BLOCK = 16


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


# -- 1a. in-process reference ---------------------------------------------------------------------
def in_process(model_dir: Path, ps: list[list[int]], new: int, stages: int, threads: int) -> float:
    """Decode tokens/s of the same scheduler + executors with direct calls (no processes, no gRPC)."""
    torch.set_num_threads(threads)
    from stagemesh.model_config import ModelConfig

    cfg = ModelConfig.from_dir(model_dir)
    bounds = [round(i * cfg.num_hidden_layers / stages) for i in range(stages + 1)]
    executors = []
    for a, b in zip(bounds, bounds[1:]):
        model, _ = load_stage(model_dir, a, b)
        executors.append(StageExecutor(model, model.make_kv_cache(2048, BLOCK), BLOCK))
    sched = Scheduler(SchedulerConfig(max_batched_tokens=512),
                      BlockManager(2048, BLOCK, "bench", enable_prefix_cache=False), StepShape(inflight_target=1))
    seqs = [Sequence(seq_id=i, prompt_ids=p, max_tokens=new) for i, p in enumerate(ps)]
    for s in seqs:
        sched.add(s)
    step, t_decode, decoded = 0, None, 0
    while any(len(s.output_ids) < new for s in seqs):
        plan = sched.schedule()
        step += 1
        req = build_forward_request(plan, 1, "bench", step)
        out = executors[0].run(req)
        for ex in executors[1:]:
            nxt = pb.ForwardRequest()
            nxt.CopyFrom(req)
            nxt.ClearField("token_ids")
            nxt.hidden.CopyFrom(wire.encode(out.hidden))
            out = ex.run(nxt)
        produced = sched.update(plan, dict(out.samples))
        if t_decode is None and all(s.output_ids for s in seqs):
            t_decode = time.perf_counter()  # every prompt prefilled: steady decode from here
        elif t_decode is not None:
            decoded += len(produced)
        for s in produced:
            if len(s.output_ids) >= new:
                sched.finish(s, "length")
    return decoded / (time.perf_counter() - t_decode)


# -- 1b. the mesh ---------------------------------------------------------------------------------
async def mesh_decode_rate(address: str, ps: list[list[int]], new: int) -> float:
    """Decode tokens/s once every request has its first token."""
    first_all = asyncio.Event()
    firsts = 0
    counts = [0] * len(ps)
    t_decode = None

    async def one(i, client):
        nonlocal firsts, t_decode
        async for msg in client.stream(prompt_ids=ps[i], max_tokens=new, ignore_eos=True, timeout=600):
            if msg.token_ids and counts[i] == 0:
                firsts += 1
                if firsts == len(ps):
                    t_decode = time.perf_counter()
                    first_all.set()
                counts[i] += len(msg.token_ids)
                continue
            if first_all.is_set():
                counts[i] += len(msg.token_ids)

    async with AsyncClient(address) as client:
        await asyncio.gather(*[one(i, client) for i in range(len(ps))])
    end = time.perf_counter()
    return (sum(counts) - len(ps) * 1 - 0) / (end - t_decode)


# -- 2. hop cost ----------------------------------------------------------------------------------
class _Sink(pb_grpc.StageServicer):
    async def Forward(self, request, context):
        return pb.ForwardResponse()


def _echo_server(port: int) -> None:
    async def main():
        server = grpc.aio.server(options=GRPC_OPTIONS)
        pb_grpc.add_StageServicer_to_server(_Sink(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


async def bare_call_ms(port: int, payload: pb.ForwardRequest, n: int) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as ch:
        await asyncio.wait_for(ch.channel_ready(), 60)  # the echo process may still be importing
        stub = pb_grpc.StageStub(ch)
        for _ in range(20):
            await stub.Forward(payload)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            await stub.Forward(payload)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def stage_hop_ms(model_dir: Path, batch: int, n: int) -> tuple[float, int]:
    """Per-hop overhead inside a 2-stage chain: (Forward RTT - compute) / 2 hops, median."""
    cport, w0, w1 = free_port(), free_port(), free_port()
    coord = f"127.0.0.1:{cport}"
    cmds = [coordinator_cmd(model_dir, cport, 2), worker_cmd(model_dir, coord, w0, 512), worker_cmd(model_dir, coord, w1, 512)]
    # the harness (stagemesh/cli/harness.py) uses block size 4 for its workers and coordinator.
    with processes(*cmds):
        stub_c = pb_grpc.CoordinatorStub(grpc.insecure_channel(coord))
        while not stub_c.GetPlan(pb.GetPlanRequest()).ready:
            time.sleep(0.1)
        plan = stub_c.GetPlan(pb.GetPlanRequest())
        first = plan.replicas[0].stages[0].address
        stub = pb_grpc.StageStub(grpc.insecure_channel(first, options=GRPC_OPTIONS))
        news = [pb.NewSequence(seq_id=i + 1, block_ids=[i * 4 + j for j in range(4)]) for i in range(batch)]
        stub.Forward(pb.ForwardRequest(epoch=plan.epoch, lease_id="b", new_sequences=news,
                                       chunks=[pb.SequenceChunk(seq_id=i + 1, start_pos=0, num_tokens=1) for i in range(batch)],
                                       token_ids=[5] * batch))
        times = []
        for k in range(n + 10):
            req = pb.ForwardRequest(epoch=plan.epoch, lease_id="b", token_ids=[5] * batch, chunks=[
                pb.SequenceChunk(seq_id=i + 1, start_pos=1 + k % 8, num_tokens=1, sample=True) for i in range(batch)])
            t = time.perf_counter()
            resp = stub.Forward(req)
            rtt = time.perf_counter() - t
            if k >= 10:
                times.append((rtt - sum(resp.stage_compute_us) / 1e6) / 2)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--hop-batch", type=int, default=32)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    model_dir = write_demo_model(tmp / "demo", num_layers=8, hidden_size=256, num_heads=8, num_kv_heads=4,
                                 intermediate_size=688)
    ps = prompts(args.seqs, args.prompt, 700)
    threads = max(1, (os.cpu_count() or 2) // 2)
    ref = in_process(model_dir, ps, args.new, stages=2, threads=threads)
    with mesh(model_dir, stages=2, extra=["--threads", str(threads)]) as m:
        rate = asyncio.run(mesh_decode_rate(m.address, ps, args.new))
    hop = stage_hop_ms(model_dir, args.hop_batch, 100)
    port = free_port()
    proc = mp.get_context("spawn").Process(target=_echo_server, args=(port,), daemon=True)
    proc.start()
    hidden = wire.encode(torch.zeros(args.hop_batch, 256))
    bare = asyncio.run(bare_call_ms(port, pb.ForwardRequest(hidden=hidden, token_ids=[5] * args.hop_batch), 200))
    proc.terminate()
    rows = [
        ("decode tok/s, mesh 2 stages (gRPC, 2 processes)", rate),
        ("decode tok/s, same scheduler+model in one process", ref),
        ("ratio mesh / in-process", rate / ref),
        (f"stage hop overhead ms (batch {args.hop_batch}, {args.hop_batch * 256 * 4} B hidden)", hop),
        ("bare grpc.aio unary call ms, same payload", bare),
        ("ratio hop / bare call", hop / bare),
    ]
    print(f"{'figure':<70} {'value':>10}")
    for name, v in rows:
        print(f"{name:<70} {v:>10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in rows}, indent=2))


if __name__ == "__main__":
    main()
