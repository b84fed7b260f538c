"""The FP8 GEMV's split-K on a GPU (stage_worker/kernels/fp8.py `w8a16_gemv(..., split_k=)`): its
last-arrival sum is a cross-program protocol (an atomic count per N block), which Triton's CPU
interpreter runs one program at a time and so cannot race. Here every split runs at once: at
Llama-3.1-8B's and DeepSeek-V3's shapes, one row and four, each split count and tile is run many
times back to back, eagerly and replayed in a CUDA graph; every result must equal the first bit
for bit (the partials are summed in split order whichever program arrives last), match the
unsplit GEMV within fp32 summation order, and leave every arrival counter at 0. Exits 1 on any
failure.

    python benchmarks/check_gemv_split.py [--repeats 200]     # on a GPU host
    python benchmarks/check_gemv_split.py --device cpu --repeats 2   # the interpreter (TRITON_INTERPRET=1), small shapes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"llama o": (4096, 4096), "llama down": (4096, 14336), "llama qkv": (6144, 4096),
          "v3 q_b": (24576, 1536), "v3 o_proj": (7168, 16384)}
SMALL = {"small ragged": (40, 1100), "small": (64, 512)}  # --device cpu
TILES = ((8, 1024, 4, 2), (16, 512, 8, 2), (4, 256, 4, 2))
SPLITS = (2, 3, 4, 8)


def check(device: str, repeats: int) -> list[str]:
    """Failures, as lines (none: every check held)."""
    import torch

    from stage_worker.kernels import fp8 as k
    from stage_worker.models import quant

    failures = []
    gen = torch.Generator(device=device).manual_seed(0)
    for name, (n, kk) in (SHAPES if device != "cpu" else SMALL).items():
        wq, ws = quant.quantize_blocks(torch.randn(n, kk, device=device, generator=gen) * 0.02)
        for m in (1, 4):
            x = torch.randn(m, kk, device=device, generator=gen).to(torch.bfloat16 if device != "cpu" else torch.float32)
            for tile in TILES:
                one = k.w8a16_gemv(x, wq, ws, 128, config=tile, split_k=1).float()
                for splits in SPLITS:
                    def run():
                        return k.w8a16_gemv(x, wq, ws, 128, config=tile, split_k=splits)
                    first = run()
                    outs = [run() for _ in range(repeats)]
                    if device != "cpu":  # replayed in a CUDA graph too, as a decode step runs it
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            captured = run()
                        for _ in range(repeats):
                            graph.replay()
                            outs.append(captured.clone())
                        torch.cuda.synchronize()
                    label = f"{name} M={m} tile {tile} split {splits}"
                    differ = sum(not torch.equal(o, first) for o in outs)
                    err = float((first.float() - one).norm() / one.norm().clamp(min=1e-30))
                    counters = sum(int(c.count_nonzero()) for c in k._gemv_counters.get(x.device, []))
                    if differ or err > 1e-2 or counters:
                        failures.append(f"{label}: {differ} of {len(outs)} runs differ from the first, "
                                        f"rel err to unsplit {err:.2e}, {counters} counters not 0")
                    print(f"{label:>48}: {len(outs)} runs, {differ} differ; rel err to unsplit {err:.1e}; "
                          f"counters at 0: {not counters}", flush=True)
    return failures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    failures = check(args.device, args.repeats)
    print("\n".join(["FAILED:", *failures]) if failures else "split-K GEMV: every check held", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
