"""The gateway's host cost with hundreds of streaming requests, against its references (CPU, one run).

1. Detokenizing: the incremental Detokenizer (tokenizers' DecodeStream) against decoding the whole
   output again at every token (what it did before), per token, at 256 and 2,048 output tokens.
2. The mesh: `stagemesh up`, one stage of a 1-layer model (its compute is small, so the gateway's
   share shows), the BENCHMARKS.md mixed workload's 256 requests at once, each a gRPC stream:
   - the gateway's CPU time per output token, against a bare grpc.aio server streaming the same
     number of messages (one per stream per step, nothing else: the floor of one write per token);
   - the gateway's step turnaround (stagemesh_step_turnaround_seconds, from its /metrics): from
     applying a returned step to sending the one that takes its slot, the host time a stage waits.

    python benchmarks/bench_gateway_streams.py [--requests 256] [--inflight 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu.common import Vocab, mixed_workload  # noqa: E402
from benchmarks.gpu.probes import gateway_cpu_s, histogram, histogram_mean  # noqa: E402
from gateway.text import Detokenizer, load_tokenizer  # noqa: E402
from stagemesh.cli.demo_model import write_demo_model  # noqa: E402
from stagemesh.cli.harness import start_up  # noqa: E402
from stagemesh.client import AsyncClient  # noqa: E402
from stagemesh.net import free_port  # noqa: E402
from stagemesh.v1 import stagemesh_pb2 as pb  # noqa: E402
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc  # noqa: E402


# -- 1. detokenizing ------------------------------------------------------------------------------
def detok_us_per_token(tokenizer, ids: list[int]) -> tuple[float, float]:
    """(incremental, whole decode per token) microseconds per output token over `ids`."""
    t0 = time.perf_counter()
    d = Detokenizer(tokenizer, [])
    for i in range(1, len(ids) + 1):
        d.update(ids[:i])
    d.flush()
    t1 = time.perf_counter()
    for i in range(1, len(ids) + 1):
        tokenizer.decode(ids[:i], skip_special_tokens=True)
    t2 = time.perf_counter()
    return (t1 - t0) / len(ids) * 1e6, (t2 - t1) / len(ids) * 1e6


def detok_table(tokenizer) -> dict:
    ids = tokenizer.encode(" ".join(["the quick brown fox, naïve café über 日本語"] * 400)).ids
    detok_us_per_token(tokenizer, ids[:256])  # warm-up
    out = {}
    for n in (256, 2048):
        inc, whole = detok_us_per_token(tokenizer, ids[:n])
        out[n] = {"incremental_us_per_token": round(inc, 2), "whole_decode_us_per_token": round(whole, 2),
                  "ratio_whole_over_incremental": round(whole / inc, 1)}
        print(f"detokenize {n} tokens: {inc:.1f} us/token incremental, {whole:.1f} whole decode per token "
              f"({whole / inc:.1f}x)", flush=True)
    return out


# -- 2a. the floor: bare grpc.aio streaming -------------------------------------------------------
class _Streams(pb_grpc.GenerationServicer):
    def __init__(self, n: int):
        self.n, self.queues, self.all_in = n, [], asyncio.Event()

    async def Generate(self, request, context):
        q: asyncio.Queue = asyncio.Queue()
        self.queues.append(q)
        if len(self.queues) == self.n:
            self.all_in.set()
        while True:
            msg = await q.get()
            yield msg
            if msg.finish_reason:
                return


def _stream_server(port: int, n: int, steps: int, ready, result) -> None:
    async def main():
        server = grpc.aio.server()
        svc = _Streams(n)
        pb_grpc.add_GenerationServicer_to_server(svc, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await svc.all_in.wait()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        for s in range(steps):  # one delta per stream per step, as the gateway sends them
            for q in svc.queues:
                q.put_nowait(pb.GenerateResponse(token_ids=[s], request_id="r", finish_reason=int(s == steps - 1)))
            await asyncio.sleep(0.002)
        while any(not q.empty() for q in svc.queues):
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.2)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        result.value = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        await server.stop(1)

    asyncio.run(main())


def bare_stream_us_per_message(n: int = 256, steps: int = 100) -> float:
    port, ready, result = free_port(), mp.Event(), mp.Value("d", 0.0)
    proc = mp.Process(target=_stream_server, args=(port, n, steps, ready, result))
    proc.start()
    ready.wait(60)

    async def clients():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.GenerationStub(ch)

            async def one():
                async for _ in stub.Generate(pb.GenerateRequest()):
                    pass
            await asyncio.gather(*[one() for _ in range(n)])

    asyncio.run(clients())
    proc.join(60)
    return result.value / (n * steps) * 1e6


# -- 2b. the mesh ---------------------------------------------------------------------------------
def mesh_run(model_dir: Path, requests: int, inflight: int) -> dict:
    metrics_port = free_port()
    extra = ["--kv-blocks", "24000", "--max-batched-tokens", "4096", "--threads", "1",
             "--metrics-port", str(metrics_port), "--inflight", str(inflight)]
    m = start_up(model_dir, 1, extra=extra, cwd=ROOT)  # this tree's code, whichever is installed
    try:
        m.wait_ready(180)
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        vocab = Vocab.of(model_dir)

        async def run():
            async with AsyncClient(m.address) as client:
                warm = mixed_workload(32, seed=5, vocab=vocab)
                await asyncio.gather(*[client.generate(prompt_ids=p, max_tokens=8, ignore_eos=True, timeout=600)
                                       for p, _ in warm])
                work = mixed_workload(requests, vocab=vocab)
                cpu0, turn0 = gateway_cpu_s(m.proc.pid), histogram(url, "stagemesh_step_turnaround_seconds")
                t0 = time.perf_counter()
                outs = await asyncio.gather(*[client.generate(prompt_ids=p, max_tokens=o, ignore_eos=True,
                                                              timeout=900) for p, o in work])
                wall = time.perf_counter() - t0
                cpu1, turn1 = gateway_cpu_s(m.proc.pid), histogram(url, "stagemesh_step_turnaround_seconds")
                tokens = sum(o.completion_tokens for o in outs)
                assert all(o.completion_tokens == w[1] for o, w in zip(outs, work)), "a request stopped early"
                if None in (cpu0, cpu1):
                    raise RuntimeError("the gateway's CPU time could not be read")
                turnaround_s, steps = histogram_mean(turn0, turn1)  # None, 0: a gateway without the metric
                return {"output_tokens": tokens, "wall_s": round(wall, 2), "output_tok_s": round(tokens / wall),
                        "gateway_cpu_us_per_token": round((cpu1 - cpu0) / tokens * 1e6, 1),
                        "turnaround_mean_ms": None if turnaround_s is None else round(turnaround_s * 1e3, 2),
                        "turnarounds": steps}

        return asyncio.run(run())
    finally:
        m.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--inflight", type=int, default=0, help="micro-batches in flight (0: the mesh's default)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    model_dir = write_demo_model(Path(tempfile.mkdtemp()) / "tiny", num_layers=1, hidden_size=32, num_heads=2,
                                 num_kv_heads=1, intermediate_size=64)
    result = {"detokenize_demo_tokenizer": detok_table(load_tokenizer(model_dir))}
    floor = bare_stream_us_per_message(args.requests)
    print(f"bare grpc.aio streaming: {floor:.1f} us of server CPU per message", flush=True)
    run = mesh_run(model_dir, args.requests, args.inflight)
    print(f"mesh, {args.requests} streams: {run['output_tok_s']} output tok/s; gateway "
          f"{run['gateway_cpu_us_per_token']} us CPU per output token "
          f"({run['gateway_cpu_us_per_token'] / floor:.2f}x the bare stream's per message); "
          f"step turnaround {run['turnaround_mean_ms']} ms mean over {run['turnarounds']} steps", flush=True)
    result.update({"bare_stream_us_per_message": round(floor, 1), "mesh": run,
                   "ratio_gateway_per_token_over_bare_message": round(run["gateway_cpu_us_per_token"] / floor, 2),
                   "requests": args.requests, "inflight": args.inflight})
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
