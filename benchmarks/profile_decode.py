"""Where a decode step's GPU time goes, against what reading its bytes once would take (GPU only).

Builds the Llama-3.1-8B-shaped checkpoint of bench_gpu.py (benchmarks/gpu/checkpoint.py), loads it as one stage, registers B
sequences with a context of C tokens each (the K/V pool's contents do not change the time) and
profiles decode steps replayed from the CUDA graphs. Prints, per (B, C), the step time, each
kernel class's time (matrix products, paged attention, the rest) and the bandwidth it reached on
the bytes it must read (the weights once; every sequence's K/V once), and the top kernels.

    python3 benchmarks/profile_decode.py --shapes 1x560,128x560,256x800 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu.checkpoint import write_llama8b  # noqa: E402


def kernel_class(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "sm90_xmma", "gemv")):
        return "matmul"
    if any(k in low for k in ("paged", "decode", "unified", "combine")):
        return "attention"
    return "other"


def main():
    import torch
    from torch.profiler import ProfilerActivity, profile

    from stage_worker.executor import StageExecutor
    from stage_worker.loader import load_stage
    from stage_worker.step_input import decode
    from stagemesh.v1 import stagemesh_pb2 as pb

    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/llama8b-random")
    ap.add_argument("--shapes", default="1x560,64x560,128x560,256x800", help="BATCHxCONTEXT, comma-separated")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--device", default="cuda:0", help="cpu: a smoke test of the script (with --model-dir)")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    model_dir = write_llama8b(Path(args.model_dir))
    model, cfg = load_stage(str(model_dir), 0, cfg_layers(model_dir), device=args.device)
    blocks_needed = max(b * (-(-(c + 32) // 16)) for b, c in shapes)
    kv = model.make_kv_cache(blocks_needed + 64, 16)
    ex = StageExecutor(model, kv, 16)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed" not in n)
    kv_token_bytes = kv.bytes_per_block // 16
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    res = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "weight_bytes": weight_bytes, "shapes": {}}
    for b, c in shapes:
        lease = f"p{b}x{c}"
        nb = -(-(c + 32) // 16)
        pos = [c]

        def step(first=False):
            req = pb.ForwardRequest(lease_id=lease, token_ids=[5] * b)
            for sid in range(b):
                if first:
                    req.new_sequences.add(seq_id=sid, block_ids=list(range(sid * nb, (sid + 1) * nb)))
                req.chunks.add(seq_id=sid, start_pos=pos[0], num_tokens=1, sample=True, output_index=1)
            ex.run(decode(req, ex.shape))
            pos[0] += 1

        step(first=True)
        for _ in range(3):
            step()
        times = []
        for _ in range(10):
            sync()
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                step()
            sync()
        per_class, top = {}, []
        for evt in prof.key_averages():
            us = (evt.device_time_total if cuda else evt.self_cpu_time_total) / 5  # per step
            if us <= 0:
                continue
            cls = kernel_class(evt.key)
            per_class[cls] = per_class.get(cls, 0.0) + us
            top.append((us, evt.key[:70], evt.count // 5))
        top.sort(reverse=True)
        kv_bytes = b * (pos[0] - 2) * kv_token_bytes  # the profiled steps' mean context
        r = {
            "step_ms": statistics.median(times),
            "gpu_ms": sum(per_class.values()) / 1e3,
            "class_ms": {k: v / 1e3 for k, v in per_class.items()},
            "matmul_gb_s": weight_bytes / (per_class["matmul"] * 1e-6) / 1e9 if "matmul" in per_class else 0.0,
            "attention_gb_s": kv_bytes / (per_class["attention"] * 1e-6) / 1e9 if "attention" in per_class else 0.0,
            "floor_ms_at_3350_gb_s": (weight_bytes + kv_bytes) / 3.35e12 * 1e3,
            "top": [(round(us, 1), name, n) for us, name, n in top[:12]],
        }
        res["shapes"][f"{b}x{c}"] = r
        print(f"B={b} C={c}: step {r['step_ms']:.2f} ms, GPU {r['gpu_ms']:.2f} ms "
              f"({', '.join(f'{k} {v:.2f}' for k, v in r['class_ms'].items())}); matmul {r['matmul_gb_s']:.0f} GB/s "
              f"on the weights, attention {r['attention_gb_s']:.0f} GB/s on the K/V; floor {r['floor_ms_at_3350_gb_s']:.2f} ms",
              flush=True)
        for us, name, n in r["top"]:
            print(f"    {us:9.1f} us  x{n:<4} {name}")
        ex.release(lease)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_decode.json").write_text(json.dumps(res, indent=1))


def cfg_layers(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]


if __name__ == "__main__":
    main()
