"""`stagemesh up --stages N` on one GPU (stagemesh.cli.harness), driven by the gRPC AsyncClient:
TTFT at 512 and 2048 prompt tokens, batch-1 decode tokens/s, and the "mixed" workload."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.gpu import probes
from benchmarks.gpu.common import Vocab, log, mixed_workload, rand_prompt
from stagemesh.cli.harness import RunningMesh, start_up

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class MeshOptions:
    """How each mesh is started and measured (bench_gpu.py's flags)."""

    kv_total_bytes: int
    max_batched_tokens: int
    out_dir: Path
    quick: bool = False
    device: str = "cuda:0"
    suffix: str = ""  # appended to the result keys (knob sweeps)
    threads: int = 0  # torch CPU threads per worker; 0: stagemesh's default
    up_args: list[str] = field(default_factory=list)  # more `stagemesh up` flags
    py_spy: str = ""  # py-spy binary: sample the mesh's processes during the mixed run
    vocab: Vocab = Vocab()
    env: dict | None = None  # the mesh's environment (None: this process's)


def mesh_spec(spec: str) -> tuple[int, list[str], bool]:
    """"N[-sync][-ifK][-fp8|-fp8ch][-kv8][-mps]": N stages; sync: `--async-scheduling off`; ifK: `--inflight K`;
    fp8: `--quantization fp8`; fp8ch: `--quantization fp8-channel`; kv8: `--kv-cache-dtype fp8`; mps: every process of the mesh a client of
    an MPS server (mps_server), so the stages' kernels can run at once instead of time-slicing the GPU. Returns (N, extra `up`
    flags, mps)."""
    n, *modes = str(spec).split("-")
    extra, mps = [], False
    for mode in modes:
        if mode == "sync":
            extra += ["--async-scheduling", "off"]
        elif mode.startswith("if") and mode[2:].isdigit():
            extra += ["--inflight", mode[2:]]
        elif mode == "fp8":
            extra += ["--quantization", "fp8"]
        elif mode == "fp8ch":
            extra += ["--quantization", "fp8-channel"]
        elif mode == "kv8":
            extra += ["--kv-cache-dtype", "fp8"]
        elif mode == "mps":
            mps = True
        else:
            raise SystemExit(f"unknown stage spec {spec!r}: N[-sync][-ifK][-fp8|-fp8ch][-kv8][-mps]")
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


def start_mesh(model_dir, stages: int, port: int, kv_bytes: int, max_batched_tokens: int, log_path: Path,
               device: str = "cuda:0", extra=(), env=None, threads: int = 0) -> RunningMesh:
    """`stagemesh up` as the GPU benchmarks run it (its output in log_path); not yet ready."""
    args = ["--device", device, "--kv-cache-bytes", str(kv_bytes), "--max-batched-tokens", str(max_batched_tokens),
            *extra]
    if threads:
        args += ["--threads", str(threads)]
    if stages > 1:  # the stages share one GPU: an even split, and no moves (they change no stage's speed)
        args += ["--plan", "uniform", "--no-rebalance"]
    return start_up(model_dir, stages, extra=args, port=port, env=env, log_path=log_path, cwd=ROOT)


def tokens_digest(token_lists: list[list[int]]) -> str:
    """A short digest of greedy token lists: equal digests, equal tokens (the summary keeps this)."""
    return hashlib.sha256(json.dumps(token_lists).encode()).hexdigest()[:16]


def bench_stagemesh(model_dir, specs: list[str], opts: MeshOptions, raw: dict) -> dict:
    """One mesh per stage spec (mesh_spec), e.g. "1", "1-sync", "4-if2", "2-mps"; a failed mesh
    records its error and the others still run. `raw` receives per-request data."""
    res = {}
    for i, spec in enumerate(specs):
        n, extra, mps = mesh_spec(spec)
        key = f"stagemesh_{str(spec).replace('-', '_')}{opts.suffix}"
        log(f"stagemesh {spec} stage(s), --max-batched-tokens {opts.max_batched_tokens}: starting")
        with contextlib.ExitStack() as stack:
            env = {**stack.enter_context(mps_server(opts.out_dir)), **(opts.env or {})} if mps else opts.env
            metrics_port = 29000 + 100 * i  # the gateway's /metrics (workers at +10..), below the ephemeral ports
            mesh = start_mesh(model_dir, n, 52000 + 10 * i, opts.kv_total_bytes // n, opts.max_batched_tokens,
                              opts.out_dir / f"mesh_{spec}_{opts.max_batched_tokens}.log", opts.device,
                              [*extra, "--metrics-port", str(metrics_port), *opts.up_args], env, opts.threads)
            try:
                up = mesh.wait_ready(400)
                log(f"  ready after {up:.0f}s")
                r, raw[key] = {}, {}
                asyncio.run(_mesh_suite(mesh, opts, r, raw[key], spec, f"http://127.0.0.1:{metrics_port}/metrics"))
                r["startup_s"] = up
                res[key] = r
            except Exception as exc:  # keep the other stage counts' results
                log(f"  FAILED: {exc!r}")
                res[key] = {"error": repr(exc)}
            finally:
                mesh.stop(60)
    return res


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


async def _mesh_suite(mesh: RunningMesh, opts: MeshOptions, res: dict, raw: dict, label: str, metrics_url: str) -> None:
    from stagemesh.client import AsyncClient

    vocab = opts.vocab
    async with AsyncClient(mesh.address) as client:
        for _ in range(3):  # warm-up: every path (prefill shapes, decode graphs, sampler)
            await asyncio.gather(*[client.generate(prompt_ids=rand_prompt(300 + 50 * k, 100 + k, vocab), max_tokens=16,
                                                   ignore_eos=True, timeout=600) for k in range(8)])
        for plen in (512, 2048):
            ttfts = [(await _stream(client, rand_prompt(min(plen, vocab.max_positions - 8), 1000 + r, vocab), 1))[0]
                     for r in range(5)]
            res[f"ttft_{plen}_ms"] = statistics.median(ttfts) * 1e3
            raw[f"ttft_{plen}_ms_each"] = [t * 1e3 for t in ttfts]
            log(f"  ttft {plen}: {res[f'ttft_{plen}_ms']:.1f} ms ({[round(t * 1e3, 1) for t in ttfts]})")
        b1 = [await _stream(client, rand_prompt(512, 2000 + r, vocab), 128) for r in range(3)]
        res["decode_b1_tok_s"] = statistics.median(r[1] for r in b1)
        # Same prompts, same shapes at any stage count or scheduling: the tokens must be equal.
        raw["decode_b1_tokens"] = [r[2] for r in b1]
        res["decode_b1_tokens_sha"] = tokens_digest(raw["decode_b1_tokens"])
        log(f"  batch-1 decode: {res['decode_b1_tok_s']:.1f} tok/s ({[round(r[1], 1) for r in b1]})")
        await _mixed(client, mesh, opts, res, label, metrics_url)


async def _mixed(client, mesh: RunningMesh, opts: MeshOptions, res: dict, label: str, metrics_url: str) -> None:
    """The mixed workload all at once; per-stage busy time, GPU utilisation, tokens/s."""
    work = mixed_workload(64 if opts.quick else 256, vocab=opts.vocab)
    smi = probes.start_util_sampler()
    spies = probes.start_py_spy(opts.py_spy, opts.out_dir, label, mesh.proc.pid) if opts.py_spy else []
    busy0 = await probes.stage_busy(mesh.coordinator)
    turn0 = probes.histogram(metrics_url, "stagemesh_step_turnaround_seconds")
    cpu0 = probes.gateway_cpu_s(mesh.proc.pid)
    t0 = time.perf_counter()
    outs = await asyncio.gather(*[client.generate(prompt_ids=p, max_tokens=o, ignore_eos=True, timeout=900)
                                  for p, o in work])
    wall = time.perf_counter() - t0
    busy1 = await probes.stage_busy(mesh.coordinator)
    turn1 = probes.histogram(metrics_url, "stagemesh_step_turnaround_seconds")
    cpu1 = probes.gateway_cpu_s(mesh.proc.pid)
    res["mixed_gateway_cpu_pct"] = None if None in (cpu0, cpu1) else round(100 * (cpu1 - cpu0) / wall, 1)
    turnaround_s, _ = probes.histogram_mean(turn0, turn1)
    res["mixed_turnaround_ms"] = None if turnaround_s is None else round(turnaround_s * 1e3, 3)
    log(f"  mixed: gateway CPU {res['mixed_gateway_cpu_pct']}% of one core; step turnaround "
        f"{res['mixed_turnaround_ms']} ms mean (answer applied -> next step sent)")
    res["mixed_stage_steps"] = [b[0] - a[0] for a, b in zip(busy0, busy1)]
    res["mixed_stage_busy_pct"] = [round(100 * (b[1] - a[1]) / wall, 1) for a, b in zip(busy0, busy1)]
    res["mixed_stage_gpu_wait_s"] = [round(b[2] - a[2], 3) for a, b in zip(busy0, busy1)]
    log(f"  mixed: per stage, steps {res['mixed_stage_steps']}, compute busy {res['mixed_stage_busy_pct']}% "
        f"of wall time, GPU idle between steps {res['mixed_stage_gpu_wait_s']} s of {wall:.2f} s")
    res["mixed_gpu_util_pct"] = probes.stop_util_sampler(smi)
    probes.wait_all(spies)
    log(f"  mixed: GPU busy (nvidia-smi utilization, 100 ms samples) {res['mixed_gpu_util_pct']}%")
    gen = sum(o.completion_tokens for o in outs)
    assert all(o.completion_tokens == w[1] for o, w in zip(outs, work)), "a request stopped early"
    res["mixed_wall_s"], res["mixed_output_tokens"] = wall, gen
    res["mixed_tok_s"] = gen / wall
    res["mixed_total_tok_s"] = (gen + sum(len(p) for p, _ in work)) / wall
    log(f"  mixed: {gen} tokens in {wall:.1f}s = {gen / wall:.0f} tok/s")
