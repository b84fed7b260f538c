"""GPU benchmark: stagemesh (1, 2, 4 stages on one GPU) against transformers, Llama-3.1-8B shape.

Runs on the device machine (no hub access): writes a Llama-3.1-8B-shaped checkpoint of random
bf16 weights generated on the GPU to local disk, then measures, on the same weights,

- `inproc`: the stage model in this process (no gRPC): Triton paged decode vs the torch reference
  (bf16 error), decode step time with and without CUDA graphs, prefill time, and a torch.profiler
  table of a 2048-token prefill: the compute floor under the end-to-end numbers;
- `stagemesh`: `stagemesh up --stages N` (separate processes, one GPU) driven by the gRPC
  AsyncClient: batch-1 decode tokens/s, TTFT at 512 and 2048 prompt tokens, the "mixed" workload;
- `reference`: transformers `generate` (dynamic cache; static cache with compiled decode) and
  continuous batching (`paged|sdpa`) on the mixed workload.

`--only` picks parts so that two calls of under 10 minutes cover everything; each part merges its
results into OUT/bench_gpu.json, and the table is printed from everything found there.

    python benchmarks/bench_gpu.py --only inproc,stagemesh --out $OUT
    python benchmarks/bench_gpu.py --only reference --out $OUT --merge previous.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB = 128256
MAXPOS = 131072
MIXED_SEED = 0


THREADS = 0  # --threads: torch CPU threads per worker, passed to `stagemesh up`
MESH_ARGS: list[str] = []  # --mesh-args
PY_SPY: list = []  # --py-spy: [py-spy binary, output folder, label and pid of the mesh being measured]


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# -- checkpoint ------------------------------------------------------------------------------------
def llama8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000,
        eos_token_id=128001, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        torch_dtype="bfloat16",
    )


def write_checkpoint(path: Path) -> Path:
    """Random bf16 weights drawn on the GPU, saved as sharded safetensors + index (a real checkpoint)."""
    import torch
    from safetensors.torch import save_file

    if (path / "config.json").is_file():
        return path
    t0 = time.time()
    path.mkdir(parents=True, exist_ok=True)
    cfg = llama8b_config()
    cfg.save_pretrained(path)
    gen = torch.Generator(device="cuda").manual_seed(0)
    h, i, d, hq, hkv = 4096, 14336, 128, 32, 8

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32) * std).to(torch.bfloat16)

    def norm():
        return (1 + rnd(h, std=0.05)).contiguous()

    weight_map, shard = {}, {}

    def flush(name):
        if shard:
            save_file({k: v.cpu() for k, v in shard.items()}, str(path / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard.clear()

    shard["model.embed_tokens.weight"] = rnd(VOCAB, h)
    flush("model-embed.safetensors")
    for layer in range(32):
        p = f"model.layers.{layer}."
        shard[p + "input_layernorm.weight"] = norm()
        shard[p + "post_attention_layernorm.weight"] = norm()
        shard[p + "self_attn.q_proj.weight"] = rnd(hq * d, h)
        shard[p + "self_attn.k_proj.weight"] = rnd(hkv * d, h)
        shard[p + "self_attn.v_proj.weight"] = rnd(hkv * d, h)
        shard[p + "self_attn.o_proj.weight"] = rnd(h, hq * d)
        shard[p + "mlp.gate_proj.weight"] = rnd(i, h)
        shard[p + "mlp.up_proj.weight"] = rnd(i, h)
        shard[p + "mlp.down_proj.weight"] = rnd(h, i)
        if layer % 4 == 3:
            flush(f"model-layers-{layer // 4}.safetensors")
    shard["model.norm.weight"] = norm()
    shard["lm_head.weight"] = rnd(VOCAB, h)
    flush("model-head.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    torch.cuda.empty_cache()
    log(f"checkpoint written to {path} in {time.time() - t0:.1f}s")
    return path


def mixed_workload(n=256, seed=MIXED_SEED):
    """BENCHMARKS.md "mixed": prompts uniform [64, 1024), outputs uniform [32, 256), fixed seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        plen, olen = rng.randrange(64, 1024), rng.randrange(32, 256)
        out.append(([rng.randrange(3, VOCAB) for _ in range(plen)], olen))
    return out


def rand_prompt(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


# -- in-process stage model -----------------------------------------------------------------------
def check_overlap(ex, prefill_req, rand_prompt, pb, steps: int = 12) -> bool:
    """Decode steps of sequences X (decode graph) interleaved with prefill chunks of fresh
    sequences Y (mixed graph), once serially and once with Y launched before X finishes."""
    results = []
    for mode in ("serial", "overlap"):
        lease = f"ov-{mode}"
        ex.run(prefill_req(lease, list(range(8)), 300, 64))  # X: 8 sequences, 300-token prompts
        x_tokens, x_pos, got = [5] * 8, 300, []
        for k in range(steps):
            x = pb.ForwardRequest(lease_id=lease, token_ids=x_tokens)
            for sid in range(8):
                x.chunks.add(seq_id=sid, start_pos=x_pos, num_tokens=1, sample=True, output_index=1 + k)
            y = pb.ForwardRequest(lease_id=lease, token_ids=rand_prompt(96, 500 + k))
            y.new_sequences.add(seq_id=100 + k, block_ids=list(range(4000 + 8 * k, 4008 + 8 * k)))
            y.chunks.add(seq_id=100 + k, start_pos=0, num_tokens=96, sample=True)
            if mode == "serial":
                xs, ys = ex.run(x).samples, ex.run(y).samples
            else:
                lx = ex.launch(x)
                ly = ex.launch(y)
                xs, ys = ex.finish(lx).samples, ex.finish(ly).samples
            got.append((xs, ys))
            x_tokens, x_pos = [t for _, t in xs], x_pos + 1
        ex.release(lease)
        results.append(got)
    return results[0] == results[1]


def check_unified_attention(device: str = "cuda") -> list[float]:
    """The unified (mixed-batch) Triton kernel against a float64 reference on fresh random data."""
    import numpy as np
    import torch
    from stage_worker.kernels.unified_attention import block_q, max_tiles, tile_plan, unified_attention

    errs = []
    for chunks in ([(0, 512)], [(300, 1), (0, 700), (64, 33), (1000, 1)], [(i * 37, 1 + i % 3 * 90) for i in range(20)]):
        nb, bs, hq, hkv, d = 2048, 16, 32, 8, 128
        kc = torch.randn(nb * bs, hkv, d, device=device, dtype=torch.bfloat16)
        vc = torch.randn(nb * bs, hkv, d, device=device, dtype=torch.bfloat16)
        ns = np.array([n for _, n in chunks])
        qsl = np.zeros(len(ns) + 1, dtype=np.int64)
        np.cumsum(ns, out=qsl[1:])
        q = torch.randn(int(qsl[-1]), hq, d, device=device, dtype=torch.bfloat16)
        lens = torch.tensor([s + n for s, n in chunks], device=device)
        bt = torch.stack([torch.randperm(nb, device=device)[:128] for _ in chunks])
        bq = block_q(hq, hkv)
        ts, tr = tile_plan(qsl, bq, size=max_tiles(int(qsl[-1]), len(chunks) + 5, bq))
        dev = [torch.from_numpy(x).to(device) for x in (qsl, ts, tr)]
        args = (bt, lens, dev[0], dev[1], dev[2], d ** -0.5, bs)
        out = unified_attention(q, kc, vc, *args, use_triton=True)
        ref = unified_attention(q.double(), kc.double(), vc.double(), *args, use_triton=False)
        errs.append(float((out.double() - ref).norm() / ref.norm()))
    return errs


def bench_inproc(model_dir: Path) -> dict:
    import torch
    from stage_worker.executor import StageExecutor
    from stage_worker.loader import load_stage
    from stage_worker.kernels.paged_decode import paged_decode, paged_decode_torch
    from stagemesh.v1 import stagemesh_pb2 as pb

    res = {}
    torch.manual_seed(0)
    # 1. Kernel check on fresh random data, several shapes; bf16 vs float64-free torch reference.
    errs = []
    for b, ctxmax, splits in [(1, 2048, 16), (7, 700, 3), (64, 1300, 1), (3, 17, 2)]:
        nb = 4096
        kc = torch.randn(nb * 16, 8, 128, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn(nb * 16, 8, 128, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(b, 32, 128, device="cuda", dtype=torch.bfloat16)
        ctx = torch.randint(1, ctxmax + 1, (b,), device="cuda")
        bt = torch.randint(0, nb, (b, 128), device="cuda")
        out = paged_decode(q, kc, vc, bt, ctx, 128 ** -0.5, 16, splits, use_triton=True)
        ref = paged_decode_torch(q.double(), kc.double(), vc.double(), bt, ctx, 128 ** -0.5, 16)
        errs.append(float((out.double() - ref).norm() / ref.norm()))
    res["triton_decode_rel_err"] = errs
    log("triton paged decode rel err vs float64 reference:", errs)
    res["triton_unified_rel_err"] = errs = check_unified_attention()
    log("triton unified attention rel err vs float64 reference:", errs)

    model, _ = load_stage(model_dir, 0, 32, device="cuda:0")
    kv = model.make_kv_cache(6000, 16)
    ex = StageExecutor(model, kv, 16)
    ex_eager = StageExecutor(model, kv, 16, cuda_graphs=False)
    ex_eager.seqs = ex.seqs  # one set of sequences, two execution routes
    nxt = [0]

    def new_seq(req, sid, ctx_tokens):
        nblocks = -(-ctx_tokens // 16)
        blocks = list(range(nxt[0], nxt[0] + nblocks))
        nxt[0] += nblocks
        req.new_sequences.add(seq_id=sid, block_ids=blocks)

    def timed(fn, reps):
        ts = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    def prefill_req(lease, sids, plen, extra):
        req = pb.ForwardRequest(lease_id=lease)
        for sid in sids:
            new_seq(req, sid, plen + extra)
            req.chunks.add(seq_id=sid, start_pos=0, num_tokens=plen, sample=True)
            req.token_ids.extend(rand_prompt(plen, sid))
        return req

    # 2. prefill latency (executor.run: metadata, forward, logits, sampling, sync)
    for plen in (512, 2048):
        reps = []
        for r in range(6):
            nxt[0] = 0
            req = prefill_req(f"p{plen}-{r}", [0], plen, 0)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            ex.run(req)
            reps.append((time.perf_counter() - t0) * 1e3)
        res[f"prefill_{plen}_ms"] = statistics.median(reps[1:])
        log(f"in-process prefill {plen}: {res[f'prefill_{plen}_ms']:.1f} ms")
    # 3. decode step latency at batch B, context ~512..600, graphs vs eager
    for b in (1, 16, 64, 128):
        nxt[0] = 0
        lease = f"d{b}"
        for s in range(0, b, 16):  # prefill in slices of 16 sequences to bound activation memory
            ex.run(prefill_req(lease, list(range(s, min(b, s + 16))), 512, 200))
        pos = [512]

        def decode_req(start, output_index, follows=False):
            """One decode token for each of the b sequences (0 in place of a followed sample)."""
            req = pb.ForwardRequest(lease_id=lease, token_ids=[0 if follows else 5] * b)
            for sid in range(b):
                req.chunks.add(seq_id=sid, start_pos=start, num_tokens=1, sample=True,
                               output_index=output_index, follows_sample=follows)
            return req

        def step(executor):
            executor.run(decode_req(pos[0], 1))
            pos[0] += 1

        def ahead(n=30):
            """n steps, each launched before the previous one is collected and following its
            samples on the device (async scheduling as the server runs it) -> ms per step."""
            def req_at(i):
                return decode_req(pos[0] + i, 2 + i, follows=i > 0)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            pending = [ex.launch(req_at(0))]
            for i in range(1, n):
                pending.append(ex.launch(req_at(i)))
                ex.finish(pending.pop(0))
            ex.finish(pending.pop(0))
            pos[0] += n
            return (time.perf_counter() - t0) * 1e3 / n

        step(ex)
        g = timed(lambda: step(ex), 30)
        e = timed(lambda: step(ex_eager), 10)
        a = ahead()
        res[f"decode_step_b{b}_graph_ms"], res[f"decode_step_b{b}_eager_ms"] = g, e
        res[f"decode_step_b{b}_ahead_ms"] = a
        log(f"in-process decode step b={b}: graph {g:.2f} ms, eager {e:.2f} ms ({b / g * 1e3:.0f} tok/s), "
            f"launched a step ahead {a:.2f} ms ({b / a * 1e3:.0f} tok/s)")
        ex.release(lease)
    # 3b. mixed step: 64 decode rows (context 512) + prefill chunks; graph / eager unified / eager with
    # one SDPA call per prefill sequence (the route before the unified kernel)
    ex_old = StageExecutor(model, kv, 16, cuda_graphs=False)
    ex_old.tile_q, ex_old.seqs = None, ex.seqs
    for nprefill, plen in [(1, 256), (2, 512), (4, 960), (8, 480)]:
        nxt[0] = 0
        lease = f"m{nprefill}x{plen}"
        for s in range(0, 64, 16):
            ex.run(prefill_req(lease, list(range(s, s + 16)), 512, 200))
        req = prefill_req(lease, list(range(100, 100 + nprefill)), plen, 0)
        for sid in range(64):
            req.chunks.add(seq_id=sid, start_pos=512, num_tokens=1, sample=True, output_index=1)
        req.token_ids.extend([5] * 64)
        key = f"mixed_step_{64 + nprefill * plen}tok"
        for name, executor in (("graph", ex), ("eager", ex_eager), ("eager_per_seq_sdpa", ex_old)):
            executor.run(req)
            res[f"{key}_{name}_ms"] = timed(lambda: executor.run(req), 10)
        log(f"in-process mixed step, 64 decode + {nprefill}x{plen} prefill: graph "
            f"{res[f'{key}_graph_ms']:.2f} ms, eager {res[f'{key}_eager_ms']:.2f} ms, "
            f"eager per-seq SDPA {res[f'{key}_eager_per_seq_sdpa_ms']:.2f} ms")
        ex.release(lease)
    # 3c. launch/finish overlap is exact: the same steps run serially and overlapped (the next
    # micro-batch launched before the previous one's result is collected) sample the same tokens
    nxt[0] = 0
    res["overlap_tokens_equal"] = check_overlap(ex, prefill_req, rand_prompt, pb)
    log(f"overlapped launch/finish samples the same tokens as serial: {res['overlap_tokens_equal']}")
    # 4. profiles: a 2048-token prefill, and batch-1 decode steps (graph replay): where the time goes
    from torch.profiler import ProfilerActivity, profile

    nxt[0] = 0
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        ex.run(prefill_req("prof", [0], 2048, 0))
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    res["profile_prefill_2048"] = table
    print(table, flush=True)
    nxt[0] = 0
    ex.run(prefill_req("prof1", [0], 512, 64))
    prof_req = pb.ForwardRequest(lease_id="prof1", token_ids=[5])
    prof_req.chunks.add(seq_id=0, start_pos=512, num_tokens=1, sample=True, output_index=1)
    ex.run(prof_req)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            ex.run(prof_req)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if str(e.device_type).endswith("CUDA")]
    res["decode_b1_kernels_per_step"] = len(events) / 5
    res["decode_b1_kernel_ms_per_step"] = sum(getattr(e, "device_time", 0) for e in events) / 5 / 1e3
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    res["profile_decode_b1"] = table
    print(table, flush=True)
    log(f"decode b=1 step: {res['decode_b1_kernels_per_step']:.0f} kernels, "
        f"{res['decode_b1_kernel_ms_per_step']:.2f} ms of kernel time")
    del ex, ex_eager, ex_old, executor, kv, model
    import gc

    gc.collect()  # the graphs and closures above hold the model: free its 16 GB for the mesh runs
    torch.cuda.empty_cache()
    log(f"in-process done; GPU memory still allocated by this process: {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
    return res


# -- stagemesh over gRPC --------------------------------------------------------------------------
class Mesh:
    def __init__(self, model_dir, stages, port, kv_bytes, max_batched_tokens, log_path, device="cuda:0", extra=(),
                 env=None):
        cmd = [sys.executable, "-m", "stagemesh.cli", "up", "--model", str(model_dir), "--stages", str(stages),
               "--port", str(port), "--device", device, "--kv-cache-bytes", str(kv_bytes),
               "--max-batched-tokens", str(max_batched_tokens), *extra]
        if THREADS:
            cmd += ["--threads", str(THREADS)]
        if stages > 1:  # the stages share one GPU: an even split, and no moves (they change no stage's speed)
            cmd += ["--plan", "uniform", "--no-rebalance"]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**(env or os.environ), "PYTHONUNBUFFERED": "1"})
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        self.target = f"127.0.0.1:{port}"

    def _read(self):
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            if "ready" in line:
                self.coordinator = line.rsplit("coordinator", 1)[-1].strip()
                self.ready.set()

    def wait(self, timeout):
        t0 = time.time()
        while not self.ready.wait(1):
            if self.proc.poll() is not None or time.time() - t0 > timeout:
                raise RuntimeError(f"stagemesh up did not become ready (rc={self.proc.poll()}); see {self.log.name}")
        return time.time() - t0

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def _stream(client, prompt, max_tokens):
    """(ttft_s, decode tok/s after the first token, token ids)."""
    t0 = time.perf_counter()
    first = last = None
    ids = []
    async for msg in client.stream(timeout=600, prompt_ids=prompt, max_tokens=max_tokens, ignore_eos=True):
        if msg.token_ids:
            now = time.perf_counter()
            if first is None:
                first, n0 = now, len(msg.token_ids)
            last = now
            ids.extend(msg.token_ids)
    n = len(ids)
    rate = (n - n0) / (last - first) if n > n0 and last > first else float("nan")
    return first - t0, rate, ids


def _start_util_sampler():
    """nvidia-smi's 'utilization.gpu' (share of time a kernel ran) every 100 ms, or None."""
    try:
        return subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                 "-lms", "100"], stdout=subprocess.PIPE, text=True)
    except OSError:
        return None


def _stop_util_sampler(proc):
    if proc is None:
        return None
    proc.terminate()
    vals = [float(x) for x in proc.communicate()[0].split() if x.strip().isdigit()]
    return round(statistics.mean(vals), 1) if vals else None


async def _stage_busy(coordinator: str) -> list[tuple[int, float, float]]:
    """(steps, compute seconds, seconds the GPU waited between steps) of every stage so far."""
    from stagemesh.cli.status import collect

    status = await collect(coordinator)
    return [(s["steps"], s["compute_s_total"], s["gpu_wait_s_total"]) for r in status["replicas"] for s in r["stages"]]


def _descends_from(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the parent
    return False


def _start_py_spy() -> list[subprocess.Popen]:
    """With --py-spy: sample the gateway's and every stage worker's Python stacks for the mixed
    run (py-spy record, non-blocking, collapsed stacks: benchmarks/pyspy_top.py summarises)."""
    if not PY_SPY:
        return []
    binary, out, label, root = PY_SPY
    procs = []
    for pid in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if not pid.isdigit() or not _descends_from(int(pid), root):  # this mesh's processes only
                continue
        except (OSError, ValueError):
            continue
        role = next((a.decode() for a in argv if a in (b"gateway", b"stage_worker")), None)
        if role and b"-m" in argv:
            path = out / f"pyspy_{label}_{role}_{pid}.txt"
            procs.append(subprocess.Popen([binary, "record", "--pid", pid, "--rate", "250", "--duration", "6",
                                           "--nonblocking", "--threads", "--format", "raw", "--output", str(path)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


async def _mesh_suite(target, quick, coordinator) -> dict:
    from stagemesh.client import AsyncClient

    res = {}
    async with AsyncClient(target) as client:
        for w in range(3):  # warm-up: every path (prefill shapes, decode graphs, sampler)
            await asyncio.gather(*[client.generate(prompt_ids=rand_prompt(300 + 50 * k, 100 + k), max_tokens=16,
                                                   ignore_eos=True, timeout=600) for k in range(8)])
        for plen in (512, 2048):
            ttfts = [(await _stream(client, rand_prompt(min(plen, MAXPOS - 8), 1000 + r), 1))[0] for r in range(5)]
            res[f"ttft_{plen}_ms"] = statistics.median(ttfts) * 1e3
            log(f"  ttft {plen}: {res[f'ttft_{plen}_ms']:.1f} ms ({[round(t * 1e3, 1) for t in ttfts]})")
        b1 = [await _stream(client, rand_prompt(512, 2000 + r), 128) for r in range(3)]
        rates = [r[1] for r in b1]
        res["decode_b1_tok_s"] = statistics.median(rates)
        # Same prompts, same shapes at any stage count or scheduling: the tokens must be equal.
        res["decode_b1_tokens"] = [r[2] for r in b1]
        log(f"  batch-1 decode: {res['decode_b1_tok_s']:.1f} tok/s ({[round(r, 1) for r in rates]})")
        work = mixed_workload(64 if quick else 256)
        smi = _start_util_sampler()
        spies = _start_py_spy()
        busy0 = await _stage_busy(coordinator)
        t0 = time.perf_counter()
        outs = await asyncio.gather(*[client.generate(prompt_ids=p, max_tokens=o, ignore_eos=True, timeout=900)
                                      for p, o in work])
        wall = time.perf_counter() - t0
        busy1 = await _stage_busy(coordinator)
        res["mixed_stage_steps"] = [b[0] - a[0] for a, b in zip(busy0, busy1)]
        res["mixed_stage_busy_pct"] = [round(100 * (b[1] - a[1]) / wall, 1) for a, b in zip(busy0, busy1)]
        res["mixed_stage_gpu_wait_s"] = [round(b[2] - a[2], 3) for a, b in zip(busy0, busy1)]
        log(f"  mixed: per stage, steps {res['mixed_stage_steps']}, compute busy {res['mixed_stage_busy_pct']}% "
            f"of wall time, GPU idle between steps {res['mixed_stage_gpu_wait_s']} s of {wall:.2f} s")
        res["mixed_gpu_util_pct"] = _stop_util_sampler(smi)
        for spy in spies:
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()
        log(f"  mixed: GPU busy (nvidia-smi utilization, 100 ms samples) {res['mixed_gpu_util_pct']}%")
        gen = sum(o.completion_tokens for o in outs)
        assert all(o.completion_tokens == w[1] for o, w in zip(outs, work)), "a request stopped early"
        res["mixed_wall_s"], res["mixed_output_tokens"] = wall, gen
        res["mixed_tok_s"] = gen / wall
        res["mixed_total_tok_s"] = (gen + sum(len(p) for p, _ in work)) / wall
        log(f"  mixed: {gen} tokens in {wall:.1f}s = {gen / wall:.0f} tok/s")
    return res


def _mesh_spec(spec: str) -> tuple[int, list[str], bool]:
    """"N[-sync][-ifK][-mps]": N stages; sync: `--async-scheduling off`; ifK: `--inflight K`;
    mps: every process of the mesh a client of an MPS server (mps_server), so the stages' kernels
    can run at once instead of time-slicing the GPU. Returns (N, extra `up` flags, mps)."""
    n, *modes = str(spec).split("-")
    extra, mps = [], False
    for mode in modes:
        if mode == "sync":
            extra += ["--async-scheduling", "off"]
        elif mode.startswith("if") and mode[2:].isdigit():
            extra += ["--inflight", mode[2:]]
        elif mode == "mps":
            mps = True
        else:
            raise SystemExit(f"unknown stage spec {spec!r}: N[-sync][-ifK][-mps]")
    return int(n), extra, mps


@contextlib.contextmanager
def mps_server(out_dir: Path):
    """An MPS control daemon of this run's own (its pipe and log folders under out_dir): yields
    the environment that makes a process its client; quit afterwards. Changes no GPU setting:
    the compute mode stays as found (MPS serves clients in the default mode too)."""
    pipe, logs = Path(tempfile.mkdtemp(prefix="mps-pipe-")), out_dir / "mps-log"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(logs)}
    subprocess.run(["nvidia-cuda-mps-control", "-d"], env=env, check=True)
    try:
        yield env
    finally:
        try:
            subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env=env, timeout=60)
        except subprocess.TimeoutExpired:
            log("  the MPS control daemon did not quit within 60 s")
        shutil.rmtree(pipe, ignore_errors=True)


def bench_stagemesh(model_dir, stages_list, kv_total, mbt, out_dir, quick, device="cuda:0", suffix="") -> dict:
    """stages_list: stage specs (_mesh_spec), e.g. "1", "1-sync", "4-if2", "2-mps"."""
    res = {}
    for i, spec in enumerate(stages_list):
        n, extra, mps = _mesh_spec(spec)
        key = f"stagemesh_{str(spec).replace('-', '_')}{suffix}"
        port = 52000 + 10 * i
        log(f"stagemesh {spec} stage(s), --max-batched-tokens {mbt}: starting")
        with contextlib.ExitStack() as stack:
            env = stack.enter_context(mps_server(out_dir)) if mps else None
            mesh = Mesh(model_dir, n, port, kv_total // n, mbt, out_dir / f"mesh_{spec}_{mbt}.log", device,
                        extra + MESH_ARGS, env)
            if PY_SPY:
                PY_SPY[2:] = [spec, mesh.proc.pid]
            try:
                up = mesh.wait(400)
                log(f"  ready after {up:.0f}s")
                r = asyncio.run(_mesh_suite(mesh.target, quick, mesh.coordinator))
                r["startup_s"] = up
                res[key] = r
            except Exception as exc:  # keep the other stage counts' results
                log(f"  FAILED: {exc!r}")
                res[key] = {"error": repr(exc)}
            finally:
                mesh.stop()
    return res


# -- transformers ---------------------------------------------------------------------------------
def bench_reference(model_dir: Path, quick) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    res = {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                 device_map="cuda:0").eval()

    def gen(prompt_len, new, cache=None, seed=0):
        ids = torch.tensor([rand_prompt(prompt_len, seed)], device="cuda")
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        if cache:
            kw["cache_implementation"] = cache
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    for name, cache, new in (("hf_dynamic", None, 32), ("hf_static", "static", 128)):
        try:
            log(f"{name}: warm-up / compile")
            gen(512, new, cache)  # the static cache compiles its decode step for this shape here
            ttft = {p: statistics.median([gen(p, 1, cache, seed=s) for s in range(3)]) for p in (512, 2048)}
            full = statistics.median([gen(512, new, cache, seed=s) for s in range(2)])
            r = {"ttft_512_ms": ttft[512] * 1e3, "ttft_2048_ms": ttft[2048] * 1e3,
                 "decode_b1_tok_s": (new - 1) / (full - ttft[512])}
            res[name] = r
            log(f"  {name}: {r}")
        except Exception as exc:
            log(f"  {name} FAILED: {exc!r}")
            res[name] = {"error": repr(exc)}
    del model
    torch.cuda.empty_cache()
    try:
        res["hf_generate_batch"] = _generate_batch(model_dir, quick)
    except Exception as exc:
        log(f"  generate_batch FAILED: {exc!r}")
        res["hf_generate_batch"] = {"error": repr(exc)}
    return res


def _generate_batch(model_dir, quick):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = None
    for impl in ("paged|sdpa", "sdpa_paged"):
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation=impl,
                                                         device_map="cuda:0").eval()
            break
        except Exception as exc:
            log(f"  attn_implementation={impl!r}: {exc!r}")
    work = mixed_workload(64 if quick else 256)
    # Random weights: EOS (1 id in 128k) is rarely drawn; the tokens actually generated are counted.
    cfg = GenerationConfig(max_new_tokens=256, do_sample=False, pad_token_id=0)
    warm = [rand_prompt(200, 7)] * 4
    model.generate_batch(inputs=warm, generation_config=cfg, max_new_tokens=8)
    mode = "per-request max_new_tokens (manager API)"
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        manager = model.init_continuous_batching(generation_config=cfg)
        manager.start()
        ids = [manager.add_request(p, max_new_tokens=o) for p, o in work]
        got = 0
        for _ in ids:
            r = manager.get_result(timeout=900)
            got += len(getattr(r, "generated_tokens", None) or []) if r is not None else 0
        wall = time.perf_counter() - t0
        try:
            manager.stop(block=True)
        except Exception as exc:
            log(f"  manager.stop: {exc!r}")
    except Exception as exc:
        log(f"  manager API failed ({exc!r}); generate_batch with the mean output length")
        mode = "generate_batch, max_new_tokens = mean of the mixed outputs"
        mean = round(sum(o for _, o in work) / len(work))
        t0 = time.perf_counter()
        outs = model.generate_batch(inputs=[p for p, _ in work], generation_config=cfg, max_new_tokens=mean)
        got = sum(len(o.generated_tokens) for o in outs.values())
        wall = time.perf_counter() - t0
    r = {"mixed_tok_s": got / wall, "mixed_output_tokens": got, "mixed_wall_s": wall, "mode": mode}
    log(f"  generate_batch mixed: {r}")
    return r


# -- table --------------------------------------------------------------------------------------------
def table(res: dict, device: str) -> str:
    rows = [("system", "mixed tok/s", "x gen_batch", "b1 decode tok/s", "TTFT 512 ms", "TTFT 2048 ms")]
    base = res.get("hf_generate_batch", {}).get("mixed_tok_s")

    def f(v, fmt="{:.0f}"):
        return fmt.format(v) if isinstance(v, (int, float)) else "-"

    meshes = [k for k, v in res.items() if k.startswith("stagemesh_") and isinstance(v, dict) and "error" not in v]
    for key in (*meshes, "hf_dynamic", "hf_static", "hf_generate_batch"):
        r = res.get(key)
        if not r:
            continue
        m = r.get("mixed_tok_s")
        rows.append((key, f(m), f(m / base, "{:.1f}x") if m and base else "-", f(r.get("decode_b1_tok_s"), "{:.1f}"),
                     f(r.get("ttft_512_ms"), "{:.1f}"), f(r.get("ttft_2048_ms"), "{:.1f}")))
    one = res.get("stagemesh_1", {}).get("mixed_tok_s")
    lines = [f"device: {device}"]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    for key in meshes:
        m = res[key].get("mixed_tok_s")
        if m and one and key != "stagemesh_1":
            lines.append(f"{key} / stagemesh_1 (mixed): {m / one:.2f}")
    ref_tokens = res.get("stagemesh_1", {}).get("decode_b1_tokens")
    for key in meshes:
        other = res[key].get("decode_b1_tokens") if key != "stagemesh_1" else None
        if ref_tokens and other:
            lines.append(f"batch-1 greedy tokens of {key} equal stagemesh_1's: {other == ref_tokens}")
    for k in ("prefill_512_ms", "prefill_2048_ms", "decode_step_b1_graph_ms", "decode_step_b1_ahead_ms",
              "decode_step_b1_eager_ms",
              "decode_step_b64_graph_ms", "decode_step_b128_graph_ms"):
        if k in res.get("inproc", {}):
            lines.append(f"in-process {k}: {res['inproc'][k]:.2f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="inproc,stagemesh,reference")
    ap.add_argument("--model-dir", default="/tmp/llama8b-random")
    ap.add_argument("--stages", default="1,1-sync,2,4",
                    help="stage specs to run: N[-sync][-ifK][-mps] (sync: async scheduling off; ifK: "
                         "--inflight K; mps: the mesh's processes as clients of an MPS server)")
    ap.add_argument("--kv-total-bytes", type=int, default=30 * 2**30)
    ap.add_argument("--max-batched-tokens", type=int, default=4096)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--merge", default="", help="earlier bench_gpu.json to merge into the table")
    ap.add_argument("--quick", action="store_true", help="64 mixed requests instead of 256")
    ap.add_argument("--mesh-device", default="cuda:0", help="cpu: a smoke test of the script itself")
    ap.add_argument("--suffix", default="", help="appended to the stagemesh result keys (knob sweeps)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads per worker (0: stagemesh's default)")
    ap.add_argument("--mesh-args", default="", help="more `stagemesh up` flags, e.g. '--log-level debug' (the "
                                                   "gateway then logs every step's round trip and stage times)")
    ap.add_argument("--py-spy", default="", help="py-spy binary: sample the mesh's processes during the mixed run")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    MESH_ARGS[:] = args.mesh_args.split()
    if args.py_spy:
        PY_SPY[:] = [args.py_spy, Path(args.out), "", 0]
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = json.loads(Path(args.merge).read_text()) if args.merge else {}
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke test only)"
    res["device"] = device
    res.setdefault("config", {}).update(vars(args))
    parts = args.only.split(",")
    model_dir = write_checkpoint(Path(args.model_dir))
    global VOCAB, MAXPOS
    mcfg = json.loads((model_dir / "config.json").read_text())
    VOCAB, MAXPOS = mcfg["vocab_size"], mcfg["max_position_embeddings"]

    def save():
        (out / "bench_gpu.json").write_text(json.dumps(res, indent=1))

    if "inproc" in parts:
        try:
            res["inproc"] = bench_inproc(model_dir)
        except Exception as exc:  # keep going: the mesh numbers still matter
            import gc
            import traceback

            traceback.print_exc()
            res["inproc"] = {"error": repr(exc)}
            gc.collect()
            torch.cuda.empty_cache()
        save()
    if "stagemesh" in parts:
        stages = args.stages.split(",")
        res.update(bench_stagemesh(model_dir, stages, args.kv_total_bytes, args.max_batched_tokens, out, args.quick,
                                   args.mesh_device, args.suffix))
        save()
    if "reference" in parts:
        res.update(bench_reference(model_dir, args.quick))
        save()
    text = table(res, device)
    (out / "table.txt").write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
