"""What `ncu` profiles for the FP8 GEMV figures of the README ("The GEMV under ncu"): the W8A16
GEMV at one row on Llama-3.1-8B's o (4096x4096) and down (4096x14336) weights in 128x128 blocks,
twice in each scale form ("grid", the default, then "shared"), then twice at split-K 2 and 4
(grid form), bf16 torch.mm beside.

    ncu --target-processes all --kernel-name regex:_gemv_kernel --launch-count 20 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section MemoryWorkloadAnalysis --section LaunchStats \
        python3 benchmarks/gpu/gemv_ncu_target.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from stage_worker.kernels import fp8 as k  # noqa: E402
from stage_worker.models import quant  # noqa: E402

for n, kk in ((4096, 4096), (4096, 14336)):
    wq, ws = quant.quantize_blocks(torch.randn(n, kk, device="cuda") * 0.02)
    wb = quant.dequantize_blocks(wq, ws).to(torch.bfloat16)
    x = torch.randn(1, kk, device="cuda", dtype=torch.bfloat16)
    for mode, split in [(m, 1) for m in k.GEMV_SCALE_MODES] + [("grid", 2), ("grid", 4)]:
        for _ in range(2):
            k.w8a16_gemv(x, wq, ws, 128, scale_mode=mode, split_k=split)
    torch.mm(x, wb.t())
    torch.cuda.synchronize()
