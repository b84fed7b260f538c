"""GPU benchmark: stagemesh (1, 2, 4 stages on one GPU) against transformers, Llama-3.1-8B shape.

`--model` picks the shape: llama8b (the default, the only one with the in-process and transformers
parts), v2-lite (DeepSeek-V2-Lite, random bf16 safetensors) or v3-stage (one PP-8 stage of
DeepSeek-V3, FP8, served with `--load-format dummy` from config.json alone); the stagemesh part is
the same for each (TTFT 512 / 2048, batch-1 decode, the mixed workload).

Runs on the device machine (no hub access): writes a Llama-3.1-8B-shaped checkpoint of random
bf16 weights generated on the GPU to local disk (benchmarks/gpu/checkpoint.py), then measures, on
the same weights,

- `inproc` (gpu/inproc.py): the stage model in this process (no gRPC): attention kernels vs a
  float64 reference (check_attention.py), decode step time with and without CUDA graphs, prefill
  time, mixed steps, and torch.profiler tables: the compute floor under the end-to-end numbers;
- `stagemesh` (gpu/mesh.py): `stagemesh up --stages N` (separate processes, one GPU) driven by the
  gRPC AsyncClient: batch-1 decode tokens/s, TTFT at 512 and 2048 prompt tokens, the "mixed" workload;
- `reference` (gpu/reference.py): transformers `generate` (dynamic cache; static cache with
  compiled decode) and continuous batching (`paged|sdpa`) on the mixed workload.

`--only` picks parts so that two calls of under 10 minutes cover everything; each part merges its
summary into OUT/bench_gpu.json, and the table is printed from everything found there. Raw data
(per-request tokens and latencies, profiler tables) is written only with --raw DIR, outside the tree.

    python benchmarks/bench_gpu.py --only inproc,stagemesh --out $OUT
    python benchmarks/bench_gpu.py --only reference --out $OUT --merge previous.json
    python benchmarks/bench_gpu.py --only stagemesh --mesh-device cpu --model-dir DEMO --stages 1 --quick  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu import report  # noqa: E402
from benchmarks.gpu.checkpoint import write_llama8b  # noqa: E402
from benchmarks.gpu.common import Vocab  # noqa: E402


def _v2_lite(path: Path) -> Path:
    from benchmarks.bench_deepseek_gpu import write_checkpoint

    return write_checkpoint(path, tiny=False)


def _v3_stage(path: Path) -> Path:
    from benchmarks.gpu.checkpoint import write_v3_stage_config

    return write_v3_stage_config(path)


# --model: (checkpoint writer, `stagemesh up` flags it needs)
MODELS = {"llama8b": (write_llama8b, []), "v2-lite": (_v2_lite, []),
          "v3-stage": (_v3_stage, ["--load-format", "dummy"])}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="inproc,stagemesh,reference")
    ap.add_argument("--model", choices=sorted(MODELS), default="llama8b")
    ap.add_argument("--model-dir", default="", help="default: /tmp/<model>-random")
    ap.add_argument("--stages", default="1,1-sync,2,4",
                    help="stage specs to run: N[-sync][-ifK][-fp8|-fp8ch][-kv8][-mps] (sync: async scheduling off; ifK: "
                         "--inflight K; fp8: --quantization fp8; fp8ch: fp8-channel; kv8: --kv-cache-dtype fp8; mps: the mesh's "
                         "processes as clients of an MPS server)")
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
    ap.add_argument("--kernel-tuning", default="", help="a kernel tuning file (stage_worker/kernels/tuning.py) for "
                    "both the in-process run and the mesh (default: each takes the file shipped for the GPU, if any)")
    ap.add_argument("--py-spy", default="", help="py-spy binary: sample the mesh's processes during the mixed run")
    ap.add_argument("--profile", default="", help="FIRST[,FIRST...]:COUNT: every worker profiles those steps "
                                                 "(STAGEMESH_PROFILE) into OUT/profile")
    ap.add_argument("--raw", default="", help="also write raw data (per-request tokens and latencies, profiler "
                                             "tables) to DIR/bench_gpu_raw.json; DIR must be outside the tree")
    return ap.parse_args(argv)


def run_parts(args, model_dir: Path, res: dict, raw: dict, save) -> None:
    import torch

    from stage_worker.device import gpu_name
    from stage_worker.kernels import tuning

    vocab = Vocab.of(model_dir)
    parts = args.only.split(",")
    tuning.use(tuning.load(args.kernel_tuning, gpu_name(args.mesh_device)))  # as the mesh's workers do
    if "inproc" in parts:
        from benchmarks.gpu.inproc import bench_inproc

        try:
            res["inproc"] = bench_inproc(model_dir, vocab, raw.setdefault("inproc", {}))
        except Exception as exc:  # keep going: the mesh numbers still matter
            import gc
            import traceback

            traceback.print_exc()
            res["inproc"] = {"error": repr(exc)}
            gc.collect()
            torch.cuda.empty_cache()
        save()
    if "stagemesh" in parts:
        from benchmarks.gpu.mesh import MeshOptions, bench_stagemesh

        env = {**os.environ, "STAGEMESH_PROFILE": f"{Path(args.out) / 'profile'}:{args.profile}"} if args.profile else None
        opts = MeshOptions(args.kv_total_bytes, args.max_batched_tokens, Path(args.out), args.quick, args.mesh_device,
                           args.suffix, args.threads,
                           [*MODELS[args.model][1], *args.mesh_args.split(),
                            *(["--kernel-tuning", args.kernel_tuning] if args.kernel_tuning else [])], args.py_spy,
                           vocab, env)
        res.update(bench_stagemesh(model_dir, args.stages.split(","), opts, raw))
        report.compare_tokens(res, raw)
        save()
    if "reference" in parts:
        from benchmarks.gpu.reference import bench_reference

        res.update(bench_reference(model_dir, args.quick, vocab))
        save()


def main(argv=None):
    args = parse_args(argv)
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw_to = report.raw_dir(args.raw)
    res = json.loads(Path(args.merge).read_text()) if args.merge else {}
    raw: dict = {}
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke test only)"
    res["device"] = device
    res.setdefault("config", {}).update(vars(args))
    model_dir = MODELS[args.model][0](Path(args.model_dir or f"/tmp/{args.model}-random"))
    run_parts(args, model_dir, res, raw, lambda: report.save(out, res, raw, raw_to))
    text = report.table(res, device)
    (out / "table.txt").write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
