"""One PP-8 stage of the full DeepSeek-V3 / R1 on one GPU: `stagemesh up --load-format dummy`.

The stage BENCHMARKS.md sizes ("8 layers": 3 dense + 5 MoE at V3's shapes, with embeddings and
lm_head; 58.8 GiB in FP8, which fits an 80 GB H100 only in FP8) is served from a directory that
holds config.json alone: V3's public config values with `num_hidden_layers = 8` and its FP8
`quantization_config`, weights drawn on the device (`--load-format dummy`). Tokens are meaningless;
the point is the time. The mixed workload (BENCHMARKS.md) runs through the gRPC client, and each
size's output tok/s is printed beside the floor BENCHMARKS.md gives for this stage on an H100
(256 requests: ≈ 5.8 s, ≈ 5,900 output tok/s; recompute it for another GPU).

    python benchmarks/gpu/bench_v3_stage.py --out $OUT              # on the device
    python benchmarks/gpu/bench_v3_stage.py --tiny --device cpu      # CPU smoke test of the script
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_deepseek_gpu import _mesh_mixed  # noqa: E402
from benchmarks.gpu import bench_fp8  # noqa: E402
from benchmarks.gpu.common import Vocab, log  # noqa: E402
from benchmarks.gpu.mesh import start_mesh  # noqa: E402

FLOOR_H100_256 = 5900  # output tok/s, BENCHMARKS.md: the 256-request mixed workload's floor for this stage

V3 = {**bench_fp8.V3, "num_hidden_layers": 8, "first_k_dense_replace": 3}  # one PP-8 stage's share
TINY = dict(vocab_size=2048, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=128,
            qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=16, n_group=4,
            topk_group=2, num_experts_per_tok=4, num_hidden_layers=4, first_k_dense_replace=1)


def write_config(path: Path, tiny: bool) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**V3, **(TINY if tiny else {})}, indent=1))
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/deepseek-v3-stage-dummy")
    ap.add_argument("--sizes", default="64,256")
    ap.add_argument("--kv-cache-bytes", type=int, default=5 * 2**30)
    ap.add_argument("--max-batched-tokens", type=int, default=4096)
    ap.add_argument("--deadline-s", type=float, default=170, help="from the script's start")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = write_config(Path(args.model_dir), args.tiny)
    import torch

    res = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu (smoke test only)",
           "config": vars(args)}
    mesh = start_mesh(model_dir, 1, 52100, args.kv_cache_bytes, args.max_batched_tokens, out / "mesh_v3.log",
                      args.device, extra=["--load-format", "dummy"])
    try:
        res["startup_s"] = mesh.wait_ready(max(60, t0 + args.deadline_s - time.time()))
        log(f"stagemesh (V3 8-layer stage, dummy FP8) ready after {res['startup_s']:.0f}s")
        sizes = [int(s) for s in args.sizes.split(",")]
        asyncio.run(_mesh_mixed(mesh.address, sizes, t0 + args.deadline_s, res, Vocab.of(model_dir)))
    except BaseException as exc:
        res["error"] = repr(exc)
        log(f"FAILED: {exc!r}")
    finally:
        mesh.stop(60)
        (out / "bench_v3_stage.json").write_text(json.dumps(res, indent=1))
    for key, r in res.items():
        if key.startswith(("mixed_", "partial_mixed_")):
            n = int(key.rsplit("_", 1)[1])
            floor = FLOOR_H100_256 if n == 256 else None
            share = f", {r['output_tok_s'] / floor:.0%} of the H100 floor ({floor} tok/s)" if floor else ""
            print(f"{res['device']}: {key}: {r['output_tok_s']:.0f} output tok/s in {r['wall_s']:.1f}s{share}")


if __name__ == "__main__":
    main()
