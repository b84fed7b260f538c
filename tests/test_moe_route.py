"""The one-launch routing kernel (stage_worker/kernels/moe_route.py) against models/moe.py `route`.

Every RouterSpec variant (softmax / sigmoid greedy, V2 group-max, V3 noaux_tc with its correction
bias; renormalised or not, routed scaling) for k = 1..8, E = 8..64, n_group = 1..8, in Triton's
CPU interpreter: the same experts, weights within float32 rounding. The interpreter tests run in
a fresh process with TRITON_INTERPRET=1 (Triton reads it at import; see tests/test_fused_moe.py).
"""

from __future__ import annotations

import pytest
import torch

from stage_worker.models.moe import RouterSpec, route
from tests.interpreted import INTERPRETED, run_in_interpreter


# (E, k, n_group, topk_group): k within the kept groups' experts (beyond them torch and the kernel
# break the ties among masked experts differently), E // n_group >= 2 (noaux_tc's top-2 per group)
SHAPES = [(8, 1, 1, 1), (8, 2, 2, 1), (16, 3, 4, 2), (24, 4, 3, 2), (32, 5, 8, 3), (64, 6, 8, 4),
          (48, 7, 4, 2), (64, 8, 8, 4), (64, 8, 2, 1)]
VARIANTS = [("softmax", "greedy"), ("sigmoid", "greedy"), ("softmax", "group_limited_greedy"),
            ("sigmoid", "noaux_tc")]


def _spec(scoring: str, method: str, e: int, k: int, n_group: int, topk_group: int) -> RouterSpec:
    """Renormalised (DeepSeek's eps) and scaled on odd k, plain softmax/sigmoid weights on even k."""
    return RouterSpec(e, k, scoring, method, n_group, topk_group, norm_topk_prob=k % 2 == 1,
                      scaling=2.5 if k % 2 else 1.0)


if not INTERPRETED:
    def test_route_kernel_in_an_interpreter_process():
        run_in_interpreter(__file__, "interpreted")


if INTERPRETED:  # collected only in the interpreter process (above)
    from stage_worker.kernels.moe_route import fused_route

    def _check(logits: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None = None) -> None:
        """Same experts per token, weights within float32 rounding; descending order of choice
        when the spec asks torch for sorted top-k (the kernel's order always is)."""
        w, ids = fused_route(logits, spec, bias)
        ref_w, ref_ids = route(logits, spec, bias)
        assert w.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == ref_ids.shape
        if spec.sorted_topk:
            assert torch.equal(ids, ref_ids)
            torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=1e-6)
        order, ref_order = ids.argsort(-1), ref_ids.argsort(-1)
        assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order)), spec
        torch.testing.assert_close(w.gather(1, order), ref_w.gather(1, ref_order), rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize("scoring,method", VARIANTS)
    @pytest.mark.parametrize("e,k,n_group,topk_group", SHAPES)
    def test_interpreted_route_equals_reference(scoring, method, e, k, n_group, topk_group):
        gen = torch.Generator().manual_seed(e * 10 + k)
        spec = _spec(scoring, method, e, k, n_group, topk_group)
        logits = torch.randn(13, e, generator=gen) * 2
        bias = torch.randn(e, generator=gen) if method == "noaux_tc" else None
        _check(logits, spec, bias)

    @pytest.mark.parametrize("bias_scale", [0.5, 3.0])
    def test_interpreted_route_deepseek_v3(bias_scale):
        """V3's shape (256 experts, 8 groups, top-4 groups, k 8); a large negative bias makes the
        -inf of masked groups matter."""
        gen = torch.Generator().manual_seed(int(bias_scale * 10))
        spec = RouterSpec(256, 8, "sigmoid", "noaux_tc", 8, 4, norm_topk_prob=True, scaling=2.5)
        bias = torch.empty(256).normal_(-bias_scale, bias_scale, generator=gen)
        _check(torch.randn(9, 256, generator=gen), spec, bias)

    def test_interpreted_route_mixtral_bf16_logits():
        """Mixtral: logits in the model dtype (read as float32), renormalised by the plain sum,
        sorted top-k; a column slice of a wider tensor (row stride != E)."""
        gen = torch.Generator().manual_seed(5)
        spec = RouterSpec(8, 2, norm_topk_prob=True, norm_eps=0.0, logits_fp32=False, sorted_topk=True)
        logits = torch.randn(11, 12, generator=gen).to(torch.bfloat16)[:, :8]
        _check(logits, spec)

    def test_interpreted_route_no_tokens():
        w, ids = fused_route(torch.empty(0, 8), RouterSpec(8, 2))
        assert w.shape == ids.shape == (0, 2)

    @pytest.mark.parametrize("scoring,method", VARIANTS)
    def test_interpreted_route_nan_rows_pick_valid_experts(scoring, method):
        """A token whose logits overflowed to NaN (or +inf) still gets k distinct experts in
        range: before, every pick was the E_PAD sentinel, an expert id the GEMMs read out of
        bounds. The other tokens route exactly as the reference."""
        e, k, n_group, topk_group = 64, 6, 8, 4
        gen = torch.Generator().manual_seed(3)
        spec = _spec(scoring, method, e, k, n_group, topk_group)
        logits = torch.randn(6, e, generator=gen)
        logits[1] = float("nan")
        logits[3, 5] = float("nan")
        logits[4, 7] = float("inf")
        bias = torch.randn(e, generator=gen) if method == "noaux_tc" else None
        w, ids = fused_route(logits, spec, bias)
        assert bool(((ids >= 0) & (ids < e)).all()), ids
        assert all(len(set(row.tolist())) == k for row in ids), ids
        finite = [0, 2, 5]
        _check(logits[finite], spec, bias)
