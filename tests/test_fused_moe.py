"""The MoE layer (stage_worker/models/moe.py) and its kernels (kernels/moe_align.py, fused_moe.py).

Routing against transformers' routers on random logits (DeepSeek-V3 sigmoid + bias + group-limited
top-k, V2 softmax greedy and group-max, Mixtral's renormalised softmax top-k); the alignment by
expert and the fused grouped GEMMs against their torch references in Triton's CPU interpreter
(float32 and block-FP8 stacks; odd token counts, experts with no tokens, one token); the Triton
MoE layer against the CPU path; FP8 stacks' checkpoint slots. The interpreter tests run in a
fresh process with TRITON_INTERPRET=1 (Triton reads it at import; see tests/test_kernels.py).
"""

from __future__ import annotations

import pytest
import torch

from stage_worker.kernels.moe_align import align_bound, moe_align_block_size_torch
from stage_worker.models import quant
from stage_worker.models.moe import MoESpec, Router, RouterSpec, SparseMoE, route
from tests.interpreted import INTERPRETED, run_in_interpreter


def _moe(gen, e=8, k=2, h=64, i=48, bias=False, n_group=1, topk_group=1, method="greedy", scoring="softmax"):
    spec = MoESpec(h, i, RouterSpec(e, k, scoring, method, n_group, topk_group, norm_topk_prob=True,
                                    scaling=1.5), bias=bias)
    moe = SparseMoE(spec)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "bias" in name else 0.2))
    return moe


def _random_ids(gen, m: int, k: int, e: int, skip: tuple[int, ...] = ()) -> torch.Tensor:
    """[m, k] distinct experts per row, never any in `skip` (experts left with no tokens)."""
    allowed = torch.tensor([x for x in range(e) if x not in skip])
    return torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:k]] for _ in range(m)])


# -- routing against transformers --------------------------------------------------------------
def _hf_routers():
    from transformers import DeepseekV2Config, DeepseekV3Config, MixtralConfig
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    v3 = dict(hidden_size=32, n_routed_experts=64, num_experts_per_tok=8, n_group=8, topk_group=4,
              norm_topk_prob=True, routed_scaling_factor=2.5)
    v2 = dict(hidden_size=32, n_routed_experts=16, num_experts_per_tok=6, n_group=4, topk_group=2,
              routed_scaling_factor=1.3)
    return [
        (DeepseekV3TopkRouter(DeepseekV3Config(**v3)),
         RouterSpec(64, 8, "sigmoid", "noaux_tc", 8, 4, norm_topk_prob=True, scaling=2.5)),
        (DeepseekV2TopkRouter(DeepseekV2Config(**v2, topk_method="greedy")),
         RouterSpec(16, 6, "softmax", "greedy", 4, 2, scaling=1.3)),
        (DeepseekV2TopkRouter(DeepseekV2Config(**v2, topk_method="group_limited_greedy")),
         RouterSpec(16, 6, "softmax", "group_limited_greedy", 4, 2, scaling=1.3)),
        (MixtralTopKRouter(MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2)),
         RouterSpec(8, 2, norm_topk_prob=True, norm_eps=0.0, logits_fp32=False, sorted_topk=True)),
    ]


@pytest.mark.parametrize("bias_scale", [0.5, 3.0])
def test_routing_matches_transformers(bias_scale):
    """Same experts (as sets per token) and weights as transformers' routers; a large negative
    correction bias makes masked groups' -inf matter (V3 picks only inside kept groups)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 32, generator=gen)
    for ref, spec in _hf_routers():
        ours = Router(32, spec)
        with torch.no_grad():
            ref.weight.normal_(0, 1, generator=gen)
            ours.weight.copy_(ref.weight)
            if hasattr(ref, "e_score_correction_bias"):
                ref.e_score_correction_bias.normal_(-bias_scale, bias_scale, generator=gen)
                ours.e_score_correction_bias.copy_(ref.e_score_correction_bias)
            _, ref_w, ref_ids = ref(x)
            w, ids = ours(x)
        order, ref_order = ids.argsort(-1), ref_ids.argsort(-1)
        assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order)), spec
        torch.testing.assert_close(w.gather(1, order), ref_w.float().gather(1, ref_order), rtol=0, atol=0)
        if spec.topk_method == "noaux_tc":  # chosen experts lie in the top-4 groups of 8
            groups = ids // (spec.n_experts // spec.n_group)
            assert all(len(set(row)) <= spec.topk_group for row in groups.tolist())


def test_route_is_batched_and_shape_static():
    """Routing is per token: a row's result does not depend on the batch around it."""
    spec = RouterSpec(64, 8, "sigmoid", "noaux_tc", 8, 4, norm_topk_prob=True, scaling=2.5)
    gen = torch.Generator().manual_seed(1)
    logits, bias = torch.randn(9, 64, generator=gen), torch.randn(64, generator=gen)
    w, ids = route(logits, spec, bias)
    w3, ids3 = route(logits[3:4], spec, bias)
    assert w.shape == ids.shape == (9, 8) and w.dtype == torch.float32
    assert set(ids3[0].tolist()) == set(ids[3].tolist())


def test_bad_routing_config_names_the_field():
    from stage_worker.models.deepseek import DeepseekDims, router_spec
    from stagemesh.errors import CheckpointError
    from stagemesh.model_config import ModelConfig

    raw = dict(architectures=["DeepseekV3ForCausalLM"], hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               moe_intermediate_size=24, n_routed_experts=16, num_experts_per_tok=0, num_attention_heads=4,
               vocab_size=100, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    with pytest.raises(CheckpointError, match="num_experts_per_tok"):
        router_spec(DeepseekDims.from_config(ModelConfig.from_dict(raw)))
    with pytest.raises(CheckpointError, match="topk_group"):
        router_spec(DeepseekDims.from_config(ModelConfig.from_dict({**raw, "num_experts_per_tok": 2,
                                                                    "n_group": 4, "topk_group": 5, "topk_method": "noaux_tc"})))


# -- alignment by expert (torch reference; the Triton kernels below) ------------------------------
@pytest.mark.parametrize("m,k,e,bm", [(7, 2, 8, 4), (1, 3, 8, 16), (33, 3, 8, 16), (0, 2, 8, 16)])
def test_align_reference_layout(m, k, e, bm):
    gen = torch.Generator().manual_seed(m)
    ids = _random_ids(gen, m, k, e, skip=(5,)) if m else torch.zeros(0, k, dtype=torch.long)
    sorted_ids, expert_ids, post = moe_align_block_size_torch(ids, bm, e)
    numel, total = m * k, int(post)
    assert sorted_ids.shape == (align_bound(numel, e, bm),) and total % bm == 0
    flat = ids.reshape(-1)
    for b, ex in enumerate(expert_ids.tolist()):
        rows = sorted_ids[b * bm:(b + 1) * bm]
        if b * bm >= total:
            assert ex == -1
            continue
        real = rows[rows < numel]
        assert (flat[real] == ex).all() and ex != 5  # an expert with no tokens has no block
    real = sorted_ids[sorted_ids < numel]
    assert sorted(real.tolist()) == list(range(numel))  # every pair exactly once
    assert (sorted_ids[total:] == numel).all()


# -- FP8 stacks in the stage's layout -------------------------------------------------------------
def test_fp8_stacks_load_through_slots_and_dequantize_on_cpu():
    """Each expert's checkpoint tensors land in its FP8 slots; off FP8 hardware the layer runs
    the dequantized stacks, equal to a 16-bit layer holding the dequantized weights."""
    gen = torch.Generator().manual_seed(2)
    spec = MoESpec(256, 128, RouterSpec(8, 2, norm_topk_prob=True))
    ref, moe = SparseMoE(spec), SparseMoE(spec, fp8=True)
    moe.fix_dtypes(torch.float32)
    views = moe.checkpoint_views("")
    with torch.no_grad():
        ref.gate.weight.copy_(torch.randn(8, 256, generator=gen))
        moe.gate.weight.copy_(ref.gate.weight)
        for e in range(8):
            for j, name in enumerate(("gate_proj", "up_proj", "down_proj")):
                slot = views[f"experts.{e}.{name}.weight"]
                assert isinstance(slot, quant.Fp8Slot)
                q, s = quant.quantize_blocks(torch.randn(slot.shape, generator=gen) * 0.1)
                slot.load(q, s, (128, 128))
                deq = quant.dequantize_blocks(q, s)
                if j < 2:
                    ref.w_gate_up[e, j * 128:(j + 1) * 128] = deq
                else:
                    ref.w_down[e] = deq
    assert moe.fp8_prepare() == "dequant"
    x = torch.randn(5, 256, generator=gen)
    torch.testing.assert_close(moe(x), ref(x), rtol=0, atol=0)


if not INTERPRETED:
    def test_kernels_in_an_interpreter_process():
        run_in_interpreter(__file__, "interpreted")


if INTERPRETED:  # collected only in the interpreter process (above)
    from stage_worker.kernels import fused_moe
    from stage_worker.kernels.moe_align import moe_align_block_size

    @pytest.mark.parametrize("m,k,e,bm", [(7, 2, 8, 4), (1, 3, 8, 16), (33, 3, 8, 16), (4, 8, 256, 16),
                                          (5, 8, 256, 16), (61, 8, 256, 16), (150, 2, 8, 16)])
    def test_interpreted_align_equals_reference(m, k, e, bm):
        """Identical arrays: the kernels keep each expert's flat indices in order, as a stable sort.
        One program's worth of indices (E = 8: up to 256; 256 experts: up to 32) takes the
        one-launch kernel, more the four-launch path."""
        gen = torch.Generator().manual_seed(m)
        ids = _random_ids(gen, m, k, e, skip=(3, 5))
        for got, ref in zip(moe_align_block_size(ids, bm, e, use_triton=True), moe_align_block_size_torch(ids, bm, e)):
            assert torch.equal(got, ref)

    @pytest.mark.parametrize("m,k", [(13, 2), (1, 3), (40, 3)])
    def test_interpreted_fused_experts_fp32(m, k):
        """Biases, experts without tokens, N and K not multiples of the tiles (48, 64 / 32)."""
        gen = torch.Generator().manual_seed(m)
        moe = _moe(gen, k=k, bias=True)
        x = torch.randn(m, 64, generator=gen)
        w, ids = torch.rand(m, k, generator=gen), _random_ids(gen, m, k, 8, skip=(2,))
        args = (x, moe.w_gate_up, moe.w_down, w, ids, moe.b_gate_up, moe.b_down)
        got = fused_moe.fused_experts(*args, config=(16, 32, 32, 2, 4, 2), use_triton=True)
        torch.testing.assert_close(got, fused_moe.fused_experts_torch(*args), atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("block_n,paired", [(64, False), (256, False), (64, True)])
    def test_interpreted_fused_experts_fp8(block_n, paired):
        """Block-FP8 stacks (two 128-row gate/up blocks, 256 = two K groups), activations quantized
        per 1x128 group. Each GEMM equals fp32 math on its dequantized operands (the same quantized
        activations: torch's quantizer, since the interpreter's e4m3 cast inside a kernel does not
        round to nearest; the act-quant kernel has its own test), and the layer stays within FP8's
        error of the unquantized one. (The layer is not compared to fused_experts_torch bit for bit:
        an ulp of difference in a row's largest SiLU·up value, summation order, moves that row's FP8
        scale and every value of the row by up to a rounding step.) Tiles inside one 128-row scale
        block (one weight scale per K group) and across two; K groups one or two per loop step
        (paired: the down GEMM's single group leaves the pair's second past K)."""
        from stage_worker.kernels import fp8 as fp8k
        from stage_worker.kernels import fp8_act as fp8a
        from stage_worker.kernels.fused_ops import silu_and_mul
        from stage_worker.kernels.moe_align import moe_align_block_size

        gen = torch.Generator().manual_seed(3)
        m, k, e = 11, 3, 8
        moe = _moe(gen, e=e, k=k, h=256, i=128)
        x = torch.randn(m, 256, generator=gen)
        w, ids = torch.rand(m, k, generator=gen), _random_ids(gen, m, k, e, skip=(6,))
        full = fused_moe.fused_experts_torch(x, moe.w_gate_up, moe.w_down, w, ids)
        moe.quantize_fp8_()
        tiles = dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=128, GROUP_M=2, PAIRED=paired, num_warps=4, num_stages=2)
        route = (w.reshape(-1).float(), *moe_align_block_size(ids, 16, e, use_triton=True))
        quant = fp8a.per_token_group_quant_fp8_torch

        def gemm(a, w_e, scale_e, top_k, weighted):  # the kernel, and fp32 math on dequantized operands
            out = torch.empty(m * k, w_e.shape[1])
            fused_moe._gemm(quant(a, 128), w_e, scale_e, None, out, *route, top_k, weighted, 128, tiles)
            a_deq = fp8k.dequant_act(*quant(a, 128), 128)
            ref = torch.stack([a_deq[r // top_k] @ fp8k.dequant_weight(w_e[ids.view(-1)[r]], scale_e[ids.view(-1)[r]],
                                                                         128, 128).t() for r in range(m * k)])
            ref = ref * (w.reshape(-1, 1) if weighted else 1)
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
            return out

        gu = gemm(x, moe.w_gate_up, moe.w_gate_up_scale_inv, k, False)
        y = gemm(silu_and_mul(gu, use_triton=False), moe.w_down, moe.w_down_scale_inv, 1, True)
        layer = y.view(m, k, -1).sum(1)
        assert ((layer - full).norm() / full.norm()) < 0.1  # FP8's own error

    @pytest.mark.parametrize("method", ["noaux_tc", "group_limited_greedy"])
    def test_interpreted_layer_triton_equals_torch(method):
        """The whole layer (routing kernel, alignment, both GEMMs, sum over k) on the Triton path
        against the CPU path (route, sort by expert, grouped GEMMs), V3- and V2-style routing."""
        gen = torch.Generator().manual_seed(4)
        scoring = "sigmoid" if method == "noaux_tc" else "softmax"
        moe = _moe(gen, k=3, n_group=4, topk_group=2, method=method, scoring=scoring)
        x = torch.randn(17, 64, generator=gen)
        ref = moe(x)
        moe.backend = "triton"
        torch.testing.assert_close(moe(x), ref, atol=1e-5, rtol=1e-5)
