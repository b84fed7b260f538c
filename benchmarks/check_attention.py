"""Accuracy of the attention kernels on random bf16 data against a float64 reference: the
flash-decoding paged decode kernel (stage_worker/kernels/paged_decode.py) and the unified
mixed-batch kernel (unified_attention.py). Fresh random data, several shapes (Llama-3.1-8B's
heads: 32 query, 8 KV, head dim 128; block size 16), K/V pools in bf16 and in FP8 e4m3
(--kv-cache-dtype fp8: the reference reads the same e4m3 values in float64). Prints the relative
errors; exits 1 past --max-rel-err. bench_gpu.py runs the same probes (keys triton_decode_rel_err, triton_unified_rel_err).

    python benchmarks/check_attention.py                 # on a GPU host
    python benchmarks/check_attention.py --device cpu    # the torch routes only (a smoke test)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HQ, HKV, D, BS = 32, 8, 128, 16


def _rel_err(out, ref) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def paged_decode_errors(device: str = "cuda", num_blocks: int = 4096, pool_dtype=None) -> list[float]:
    """(batch, longest context, splits) shapes; Triton on CUDA, the torch route elsewhere."""
    import torch

    from stage_worker.kernels.paged_decode import paged_decode, paged_decode_torch

    torch.manual_seed(0)
    errs = []
    for b, ctxmax, splits in [(1, 2048, 16), (7, 700, 3), (64, 1300, 1), (3, 17, 2)]:
        kc = torch.randn(num_blocks * BS, HKV, D, device=device).to(pool_dtype or torch.bfloat16)
        vc = torch.randn(num_blocks * BS, HKV, D, device=device).to(pool_dtype or torch.bfloat16)
        q = torch.randn(b, HQ, D, device=device, dtype=torch.bfloat16)
        ctx = torch.randint(1, ctxmax + 1, (b,), device=device)
        bt = torch.randint(0, num_blocks, (b, 128), device=device)
        out = paged_decode(q, kc, vc, bt, ctx, D ** -0.5, BS, splits, use_triton=device.startswith("cuda"))
        ref = paged_decode_torch(q.double(), kc.double(), vc.double(), bt, ctx, D ** -0.5, BS)
        errs.append(_rel_err(out, ref))
    return errs


def unified_attention_errors(device: str = "cuda", num_blocks: int = 2048, pool_dtype=None) -> list[float]:
    """Mixed batches of (context before, new tokens) chunks: one prefill, a mix, twenty small."""
    import numpy as np
    import torch

    from stage_worker.kernels.unified_attention import block_q, max_tiles, tile_plan, unified_attention

    torch.manual_seed(0)
    errs = []
    for chunks in ([(0, 512)], [(300, 1), (0, 700), (64, 33), (1000, 1)], [(i * 37, 1 + i % 3 * 90) for i in range(20)]):
        kc = torch.randn(num_blocks * BS, HKV, D, device=device).to(pool_dtype or torch.bfloat16)
        vc = torch.randn(num_blocks * BS, HKV, D, device=device).to(pool_dtype or torch.bfloat16)
        ns = np.array([n for _, n in chunks])
        qsl = np.zeros(len(ns) + 1, dtype=np.int64)
        np.cumsum(ns, out=qsl[1:])
        q = torch.randn(int(qsl[-1]), HQ, D, device=device, dtype=torch.bfloat16)
        lens = torch.tensor([s + n for s, n in chunks], device=device)
        bt = torch.stack([torch.randperm(num_blocks, device=device)[:128] for _ in chunks])
        bq = block_q(HQ, HKV)
        ts, tr = tile_plan(qsl, bq, size=max_tiles(int(qsl[-1]), len(chunks) + 5, bq))
        dev = [torch.from_numpy(x).to(device) for x in (qsl, ts, tr)]
        args = (bt, lens, dev[0], dev[1], dev[2], D ** -0.5, BS)
        out = unified_attention(q, kc, vc, *args, use_triton=device.startswith("cuda"))
        ref = unified_attention(q.double(), kc.double(), vc.double(), *args, use_triton=False)
        errs.append(_rel_err(out, ref))
    return errs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-rel-err", type=float, default=1e-2, help="bf16 tolerance (measured: 1e-3 to 2.1e-3)")
    args = ap.parse_args()
    import torch

    worst = 0.0
    for name, probe in (("paged decode", paged_decode_errors), ("unified attention", unified_attention_errors)):
        for pool in (torch.bfloat16, torch.float8_e4m3fn):
            size = {} if args.device.startswith("cuda") else {"num_blocks": 256}
            errs = probe(args.device, pool_dtype=pool, **size)
            worst = max(worst, *errs)
            print(f"{name}, {str(pool)[6:]} pool, rel err vs float64: {[f'{e:.2e}' for e in errs]}", flush=True)
    print(f"worst {worst:.2e} (limit {args.max_rel_err:.0e}): {'ok' if worst <= args.max_rel_err else 'FAILED'}")
    return 0 if worst <= args.max_rel_err else 1


if __name__ == "__main__":
    sys.exit(main())
