"""GPU check of kernels/moe_route.py (routing in one launch), moe_align's one-launch path and a
V3-shaped MoE layer on the Triton path: each against its torch reference, then the layer's kernels
counted in one CUDA-graph replay; then the shared experts on their side stream (models/moe.py
`_forward_overlapped`) against run after the routed ones: equal outputs, eager and replayed, and
the graph step times of both.

    python benchmarks/gpu/check_moe_route.py                       # on the device
    DEV=cpu TRITON_INTERPRET=1 python benchmarks/gpu/check_moe_route.py   # smoke test (no layer part)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from stage_worker.kernels.moe_align import moe_align_block_size, moe_align_block_size_torch  # noqa: E402
from stage_worker.kernels.moe_route import fused_route  # noqa: E402
from stage_worker.models.moe import MoESpec, RouterSpec, SparseMoE, route  # noqa: E402

V3_ROUTER = RouterSpec(256, 8, "sigmoid", "noaux_tc", 8, 4, norm_topk_prob=True, scaling=2.5)
SPECS = {"V3": V3_ROUTER, "V2-Lite": RouterSpec(64, 6, "softmax", "greedy"),
         "V2": RouterSpec(160, 6, "softmax", "group_limited_greedy", 8, 3, scaling=16.0),
         "Mixtral": RouterSpec(8, 2, norm_topk_prob=True, norm_eps=0.0, logits_fp32=False, sorted_topk=True)}


def check_route(dev: str) -> None:
    for name, spec in SPECS.items():
        for t in (1, 4, 64, 4096):
            logits = torch.randn(t, spec.n_experts, device=dev) * 2
            bias = torch.randn(spec.n_experts, device=dev) if spec.topk_method == "noaux_tc" else None
            w, ids = (a.cpu() for a in fused_route(logits, spec, bias))
            rw, rids = route(logits.cpu(), spec, None if bias is None else bias.cpu())  # the CPU path
            o, ro = ids.argsort(-1), rids.argsort(-1)
            same = (ids.gather(1, o) == rids.gather(1, ro)).all(-1)  # GPU exp vs CPU exp: near-ties may flip
            assert same.float().mean() >= 0.999, (name, t, same.float().mean())
            torch.testing.assert_close(w.gather(1, o)[same], rw.gather(1, ro)[same], rtol=1e-6, atol=1e-6)
            print(f"route ok {name} T={t}: {int((~same).sum())} rows pick other experts", flush=True)


def check_align(dev: str) -> None:
    for m, k, e in [(1, 8, 256), (4, 8, 256), (5, 8, 256), (64, 8, 256), (100, 2, 8), (128, 2, 8), (2000, 6, 64)]:
        ids = torch.stack([torch.randperm(e)[:k] for _ in range(m)]).to(dev)
        for got, ref in zip(moe_align_block_size(ids, 16, e, use_triton=True), moe_align_block_size_torch(ids, 16, e)):
            assert torch.equal(got, ref), (m, k, e)
    print("align ok", flush=True)


def check_layer(dev: str) -> None:
    """The V3-shaped layer (E 256, k 8, bf16, routed experts only): Triton against torch, and the
    kernels of one graph replay at T = 4 (expected 8: x.float, router GEMM, routing, alignment,
    GEMM1, SiLU·up, GEMM2, sum over k)."""
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        moe = SparseMoE(MoESpec(7168, 2048, V3_ROUTER))
    moe.gate.fix_dtypes(torch.bfloat16)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.02)
        x = torch.randn(4, 7168, device=dev)
        moe.backend = "torch"
        ref = moe(x)
        moe.backend = "auto"
        out = moe(x)
        print("layer: relative error Triton vs torch", ((out.float() - ref.float()).norm() / ref.float().norm()).item())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = moe(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            graph.replay()
            torch.cuda.synchronize()
        kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        print(len(kernels), "kernels per V3 MoE layer at T=4 (routed experts only):", kernels)
        torch.testing.assert_close(static, out)


def check_shared_overlap(dev: str) -> None:
    """V3's MoE layer with its shared expert (bf16): overlapped on a side stream vs after the
    routed experts, outputs equal (same kernels, same sum), graph replay times at T = 1, 64, 256."""
    from stage_worker.models.layers import GatedMLP

    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        moe = SparseMoE(MoESpec(7168, 2048, V3_ROUTER), shared=GatedMLP(7168, 2048))
    moe.gate.fix_dtypes(torch.bfloat16)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.02)
        for t in (1, 64, 256):
            x = torch.randn(t, 7168, device=dev)
            times, outs = {}, {}
            for overlap in (False, True):
                moe.overlap_shared = t if overlap else 0  # max tokens overlapped
                eager = moe(x)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static = moe(x)
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(static, eager), (t, overlap)
                outs[overlap] = eager
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(50):
                    graph.replay()
                b.record()
                b.synchronize()
                times[overlap] = a.elapsed_time(b) / 50
            assert torch.equal(outs[True], outs[False]), t
            print(f"shared overlap ok T={t}: graph step {times[False]:.3f} -> {times[True]:.3f} ms "
                  f"({times[False] / times[True]:.2f}x)", flush=True)


if __name__ == "__main__":
    device = os.environ.get("DEV", "cuda")
    torch.manual_seed(0)
    check_route(device)
    check_align(device)
    if device == "cuda":
        check_layer(device)
        check_shared_overlap(device)
