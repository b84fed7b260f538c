"""The stage model in this process, all 32 layers, no gRPC: the compute floor under the
end-to-end numbers. Step times (prefill; decode with and without CUDA graphs and launched a step
ahead; mixed decode + prefill steps), launch/finish overlap exactness, and torch.profiler tables."""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

from benchmarks.gpu.common import Vocab, log, rand_prompt

BLOCK = 16


class Rig:
    """One loaded stage and its KV pool; three executors over one lease table (three routes:
    CUDA graphs, eager, eager with one SDPA call per prefill sequence, the route before the
    unified kernel). Requests are built as protobuf and decoded as the server does."""

    def __init__(self, model_dir: Path, vocab: Vocab):
        from stage_worker.executor import StageExecutor
        from stage_worker.loader import load_stage

        self.vocab = vocab
        self.model, _ = load_stage(model_dir, 0, 32, device="cuda:0")
        self.kv = self.model.make_kv_cache(6000, BLOCK)
        self.ex = StageExecutor(self.model, self.kv, BLOCK)
        self.eager = StageExecutor(self.model, self.kv, BLOCK, cuda_graphs=False)
        self.per_seq_sdpa = StageExecutor(self.model, self.kv, BLOCK, cuda_graphs=False)
        self.per_seq_sdpa.tile_q = None
        self.eager.leases = self.per_seq_sdpa.leases = self.ex.leases  # one set of sequences
        self.next_block = 0

    def step(self, req, executor=None):
        """Decode `req` (the server's edge) and run it start to finish."""
        from stage_worker.step_input import decode

        ex = executor or self.ex
        return ex.run(decode(req, ex.shape))

    def launch(self, req):
        from stage_worker.step_input import decode

        return self.ex.launch(decode(req, self.ex.shape))

    def prefill_req(self, lease: str, sids, plen: int, extra: int):
        """New sequences `sids` with random prompts of plen tokens, KV for plen + extra."""
        from stagemesh.v1 import stagemesh_pb2 as pb

        req = pb.ForwardRequest(lease_id=lease)
        for sid in sids:
            nblocks = -(-(plen + extra) // BLOCK)
            req.new_sequences.add(seq_id=sid, block_ids=list(range(self.next_block, self.next_block + nblocks)))
            self.next_block += nblocks
            req.chunks.add(seq_id=sid, start_pos=0, num_tokens=plen, sample=True)
            req.token_ids.extend(rand_prompt(plen, sid, self.vocab))
        return req

    def decode_req(self, lease: str, b: int, start: int, output_index: int, follows: bool = False):
        """One decode token for each of b sequences (0 in place of a followed sample)."""
        from stagemesh.v1 import stagemesh_pb2 as pb

        req = pb.ForwardRequest(lease_id=lease, token_ids=[0 if follows else 5] * b)
        for sid in range(b):
            req.chunks.add(seq_id=sid, start_pos=start, num_tokens=1, sample=True,
                           output_index=output_index, follows_sample=follows)
        return req

    def release(self, lease: str) -> None:
        self.ex.release(lease)
        self.next_block = 0


def timed_ms(fn, reps: int) -> float:
    """Median wall time of fn() in ms, the device synchronised before each call."""
    import torch

    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def prefill_latency(rig: Rig, res: dict) -> None:
    """executor.run of one prompt: metadata, forward, logits, sampling, sync."""
    for plen in (512, 2048):
        reps = []
        for r in range(6):
            req = rig.prefill_req(f"p{plen}-{r}", [0], plen, 0)
            reps.append(timed_ms(lambda: rig.step(req), 1))
            rig.next_block = 0
        res[f"prefill_{plen}_ms"] = statistics.median(reps[1:])
        log(f"in-process prefill {plen}: {res[f'prefill_{plen}_ms']:.1f} ms")


def decode_steps(rig: Rig, res: dict) -> None:
    """Decode step at batch b, context ~512..600: graph, eager, and launched a step ahead."""
    for b in (1, 16, 64, 128):
        lease = f"d{b}"
        for s in range(0, b, 16):  # prefill in slices of 16 sequences to bound activation memory
            rig.step(rig.prefill_req(lease, list(range(s, min(b, s + 16))), 512, 200))
        pos = [512]

        def one(executor):
            rig.step(rig.decode_req(lease, b, pos[0], 1), executor)
            pos[0] += 1

        one(rig.ex)
        g = timed_ms(lambda: one(rig.ex), 30)
        e = timed_ms(lambda: one(rig.eager), 10)
        a = _ahead(rig, lease, b, pos)
        res[f"decode_step_b{b}_graph_ms"], res[f"decode_step_b{b}_eager_ms"] = g, e
        res[f"decode_step_b{b}_ahead_ms"] = a
        log(f"in-process decode step b={b}: graph {g:.2f} ms, eager {e:.2f} ms ({b / g * 1e3:.0f} tok/s), "
            f"launched a step ahead {a:.2f} ms ({b / a * 1e3:.0f} tok/s)")
        rig.release(lease)


def _ahead(rig: Rig, lease: str, b: int, pos: list[int], n: int = 30) -> float:
    """n steps, each launched before the previous one is collected and following its samples on
    the device (async scheduling as the server runs it) -> ms per step."""
    import torch

    def req_at(i):
        return rig.decode_req(lease, b, pos[0] + i, 2 + i, follows=i > 0)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pending = [rig.launch(req_at(0))]
    for i in range(1, n):
        pending.append(rig.launch(req_at(i)))
        rig.ex.finish(pending.pop(0))
    rig.ex.finish(pending.pop(0))
    pos[0] += n
    return (time.perf_counter() - t0) * 1e3 / n


def mixed_steps(rig: Rig, res: dict) -> None:
    """64 decode rows (context 512) + prefill chunks, on each of the three routes."""
    for nprefill, plen in [(1, 256), (2, 512), (4, 960), (8, 480)]:
        lease = f"m{nprefill}x{plen}"
        for s in range(0, 64, 16):
            rig.step(rig.prefill_req(lease, list(range(s, s + 16)), 512, 200))
        req = rig.prefill_req(lease, list(range(100, 100 + nprefill)), plen, 0)
        for sid in range(64):
            req.chunks.add(seq_id=sid, start_pos=512, num_tokens=1, sample=True, output_index=1)
        req.token_ids.extend([5] * 64)
        key = f"mixed_step_{64 + nprefill * plen}tok"
        for name, executor in (("graph", rig.ex), ("eager", rig.eager), ("eager_per_seq_sdpa", rig.per_seq_sdpa)):
            rig.step(req, executor)
            res[f"{key}_{name}_ms"] = timed_ms(lambda: rig.step(req, executor), 10)
        log(f"in-process mixed step, 64 decode + {nprefill}x{plen} prefill: graph "
            f"{res[f'{key}_graph_ms']:.2f} ms, eager {res[f'{key}_eager_ms']:.2f} ms, "
            f"eager per-seq SDPA {res[f'{key}_eager_per_seq_sdpa_ms']:.2f} ms")
        rig.release(lease)


def overlap_is_exact(rig: Rig, steps: int = 12) -> bool:
    """Decode steps of sequences X (decode graph) interleaved with prefill chunks of fresh
    sequences Y (mixed graph), once serially and once with Y launched before X finishes: the
    same tokens."""
    from stagemesh.v1 import stagemesh_pb2 as pb

    results = []
    for mode in ("serial", "overlap"):
        lease = f"ov-{mode}"
        rig.step(rig.prefill_req(lease, list(range(8)), 300, 64))  # X: 8 sequences, 300-token prompts
        x_tokens, x_pos, got = [5] * 8, 300, []
        for k in range(steps):
            x = pb.ForwardRequest(lease_id=lease, token_ids=x_tokens)
            for sid in range(8):
                x.chunks.add(seq_id=sid, start_pos=x_pos, num_tokens=1, sample=True, output_index=1 + k)
            y = pb.ForwardRequest(lease_id=lease, token_ids=rand_prompt(96, 500 + k, rig.vocab))
            y.new_sequences.add(seq_id=100 + k, block_ids=list(range(4000 + 8 * k, 4008 + 8 * k)))
            y.chunks.add(seq_id=100 + k, start_pos=0, num_tokens=96, sample=True)
            if mode == "serial":
                xs, ys = rig.step(x).samples, rig.step(y).samples
            else:
                lx, ly = rig.launch(x), rig.launch(y)
                xs, ys = rig.ex.finish(lx).samples, rig.ex.finish(ly).samples
            got.append((xs, ys))
            x_tokens, x_pos = [t for _, t in xs], x_pos + 1
        rig.release(lease)
        results.append(got)
    return results[0] == results[1]


def profiles(rig: Rig, res: dict, raw: dict) -> None:
    """torch.profiler tables (raw data) of a 2048-token prefill and of batch-1 decode steps
    (graph replay); kernels and kernel time per decode step (summary)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA, ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        rig.step(rig.prefill_req("prof", [0], 2048, 0))
        torch.cuda.synchronize()
    raw["profile_prefill_2048"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    print(raw["profile_prefill_2048"], flush=True)
    rig.release("prof")
    rig.step(rig.prefill_req("prof1", [0], 512, 64))
    req = rig.decode_req("prof1", 1, 512, 1)
    rig.step(req)
    with profile(activities=acts) as prof:
        for _ in range(5):
            rig.step(req)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if str(e.device_type).endswith("CUDA")]
    res["decode_b1_kernels_per_step"] = len(events) / 5
    res["decode_b1_kernel_ms_per_step"] = sum(getattr(e, "device_time", 0) for e in events) / 5 / 1e3
    raw["profile_decode_b1"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    print(raw["profile_decode_b1"], flush=True)
    log(f"decode b=1 step: {res['decode_b1_kernels_per_step']:.0f} kernels, "
        f"{res['decode_b1_kernel_ms_per_step']:.2f} ms of kernel time")
    rig.release("prof1")


def bench_inproc(model_dir: Path, vocab: Vocab, raw: dict) -> dict:
    """Every in-process measurement; `raw` receives the profiler tables."""
    import torch

    from benchmarks.check_attention import paged_decode_errors, unified_attention_errors

    res = {"triton_decode_rel_err": paged_decode_errors(), "triton_unified_rel_err": unified_attention_errors()}
    log("triton paged decode / unified attention rel err vs float64 reference:",
        res["triton_decode_rel_err"], res["triton_unified_rel_err"])
    rig = Rig(model_dir, vocab)
    prefill_latency(rig, res)
    decode_steps(rig, res)
    mixed_steps(rig, res)
    res["overlap_tokens_equal"] = overlap_is_exact(rig)
    log(f"overlapped launch/finish samples the same tokens as serial: {res['overlap_tokens_equal']}")
    profiles(rig, res, raw)
    del rig
    gc.collect()  # the graphs and closures hold the model: free its 16 GB for the mesh runs
    torch.cuda.empty_cache()
    log(f"in-process done; GPU memory still allocated by this process: {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
    return res
