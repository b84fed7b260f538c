"""DeepSeek V2/V3 stages (MLA + MoE) against transformers itself, in process and through the mesh.

Checkpoints are tiny random DeepseekV3 / DeepseekV2 models written by transformers
(tests/checkpoints.py: q LoRA or not, YaRN past position 64, dense layer 0 then MoE layers with
shared + routed experts, group-limited routing, V3's sigmoid scores with a non-zero correction
bias). They run through 1, 2 and 3 stages with chunked prefill (expanded MLA) and batched
decode (absorbed MLA over the latent pool); logits and greedy tokens must equal transformers'.
FP8 checkpoints: tests/test_fp8.py. KV: the latent pool's
bytes per token for the real V3 shape, against full per-head K/V.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from stage_worker.attention import AttnMetadata
from stage_worker.loader import load_stage
from stage_worker.mla_cache import MLAKVCache, kv_bytes_per_token
from stage_worker.models.deepseek import DeepseekDims, DeepseekMoE, MoEGate, layer_profile
from stage_worker.models.layers import checkpoint_tensors
from stagemesh.checkpoint import validate_checkpoint
from stagemesh.model_config import ModelConfig
from tests.checkpoints import make_deepseek_checkpoint
from tests.meshes import check_mesh_greedy
from tests.reference import random_prompts
from tests.test_model import check_against_hf

SPLITS = {1: [(0, 3)], 2: [(0, 1), (1, 3)], 3: [(0, 1), (1, 2), (2, 3)]}
NEW_TOKENS = 6

# DeepSeek-V3 / R1 config.json (the fields that size attention and the KV cache).
V3_SHAPE = dict(num_hidden_layers=61, num_attention_heads=128, kv_lora_rank=512, qk_nope_head_dim=128,
                qk_rope_head_dim=64, v_head_dim=128)


@pytest.fixture(scope="module")
def ds_root(tmp_path_factory):
    return tmp_path_factory.mktemp("deepseek")


@pytest.mark.parametrize("kind", ["v3", "v2"])
@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_stages_match_transformers(ds_root, kind, num_stages):
    """Mixed micro-batches: prefill chunks of 5 (mid-prompt starts) beside decodes; a 70-token
    prompt crosses YaRN's original context (64)."""
    path = make_deepseek_checkpoint(ds_root, kind)
    stages = [load_stage(path, a, b)[0] for a, b in SPLITS[num_stages]]
    gen = torch.Generator().manual_seed(11)  # same prompts at every split: one HF reference
    prompts = [torch.randint(3, 320, (n,), generator=gen).tolist() for n in (13, 3, 70, 1)]
    check_against_hf(path, stages, prompts, NEW_TOKENS)


def test_absorbed_decode_equals_expanded(ds_root):
    """The same query answered by the absorbed (latent) path and the expanded path."""
    path = make_deepseek_checkpoint(ds_root, "v3")
    stage, _ = load_stage(path, 0, 3)
    attn = stage.layers["1"].self_attn
    d = attn.d
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randn(9, d.kv_lora_rank + d.qk_rope_head_dim, generator=gen)  # [L, R + Dr]
    q_nope = torch.randn(1, attn.n_heads, d.qk_nope_head_dim, generator=gen)
    q_pe = torch.randn(1, attn.n_heads, d.qk_rope_head_dim, generator=gen)
    mask = torch.ones(1, 1, 1, 9, dtype=torch.bool)
    absorbed = attn._absorbed(q_nope, q_pe, ctx[None], mask)  # [1, Hq, Dv]
    expanded = attn._expanded(q_nope, q_pe, ctx, torch.ones(1, 1, 1, 9, dtype=torch.bool))
    torch.testing.assert_close(absorbed, expanded, atol=1e-5, rtol=1e-5)


def test_router_matches_transformers():
    """Our gate against transformers' routers: V3 noaux_tc, V2 greedy and group-limited greedy."""
    from transformers import DeepseekV2Config, DeepseekV3Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 32, generator=gen)
    base = dict(hidden_size=32, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2)
    cases = [(DeepseekV3Config(**base, norm_topk_prob=True, routed_scaling_factor=2.5),
              DeepseekV3TopkRouter, "DeepseekV3ForCausalLM")]
    for method in ("greedy", "group_limited_greedy"):
        cases.append((DeepseekV2Config(**base, topk_method=method, routed_scaling_factor=1.3),
                      DeepseekV2TopkRouter, "DeepseekV2ForCausalLM"))
    for hf_cfg, router_cls, arch in cases:
        raw = {**hf_cfg.to_dict(), "architectures": [arch], "intermediate_size": 64}
        ours = MoEGate(32, DeepseekDims.from_config(ModelConfig.from_dict(raw)))
        ref = router_cls(hf_cfg)
        with torch.no_grad():
            ref.weight.normal_(0, 1, generator=gen)
            ours.weight.copy_(ref.weight)
            if hasattr(ref, "e_score_correction_bias"):
                ref.e_score_correction_bias.normal_(0, 0.5, generator=gen)
                ours.e_score_correction_bias.copy_(ref.e_score_correction_bias)
            _, ref_w, ref_ids = ref(x)
            w, ids = ours(x)
        order, ref_order = ids.argsort(-1), ref_ids.argsort(-1)
        assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order)), arch
        torch.testing.assert_close(w.gather(1, order), ref_w.gather(1, ref_order))


def _moe_per_expert_loop(moe: DeepseekMoE, x: torch.Tensor) -> torch.Tensor:
    """The former DeepseekMoE.forward (a host sync, one gather/GEMMs/scatter per hit expert): reference."""
    weights, ids = moe.gate(x)
    out = torch.zeros_like(x)
    inter = moe.w_down.shape[2]
    for e in torch.unique(ids).tolist():
        tok, slot = torch.where(ids == e)
        gu = x[tok] @ moe.w_gate_up[e].T + (moe.b_gate_up[e] if moe.b_gate_up is not None else 0)
        y = (F.silu(gu[:, :inter]) * gu[:, inter:]) @ moe.w_down[e].T
        if moe.b_down is not None:
            y = y + moe.b_down[e]
        out.index_add_(0, tok, (y * weights[tok, slot, None]).to(out.dtype))
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(x)
    return out


@pytest.mark.parametrize("bias", [False, True])
def test_grouped_moe_equals_per_expert_loop(bias):
    """Sorted-by-expert grouped GEMMs equal the per-expert loop (V3 routing, V2 routing, with biases,
    experts left empty, one token), and each expert's checkpoint tensors map to its stacked slices."""
    gen = torch.Generator().manual_seed(0)
    for arch, extra in (("DeepseekV3ForCausalLM", dict(n_group=4, topk_group=2, topk_method="noaux_tc",
                                                        scoring_func="sigmoid", norm_topk_prob=True)),
                        ("DeepseekV2ForCausalLM", dict(n_group=1, topk_group=1, topk_method="greedy"))):
        raw = dict(architectures=[arch], hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                   n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=3, routed_scaling_factor=2.5,
                   num_hidden_layers=2, num_attention_heads=4, vocab_size=100, kv_lora_rank=16,
                   qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, mlp_bias=bias, **extra)
        cfg = ModelConfig.from_dict(raw)
        moe = DeepseekMoE(cfg, DeepseekDims.from_config(cfg))
        views = checkpoint_tensors(moe)
        expect = {f"experts.{e}.{p}_proj.{k}" for e in range(16) for p in ("gate", "up", "down")
                  for k in (("weight", "bias") if bias else ("weight",))}
        assert expect <= set(views) and not any(n.startswith("w_") or n.startswith("b_") for n in views)
        with torch.no_grad():  # filled through the checkpoint views, as the loader does
            for name, p in views.items():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "bias" in name else 0.3))
        assert views["experts.3.up_proj.weight"].data_ptr() == moe.w_gate_up[3, 24:].data_ptr()
        with torch.inference_mode():
            for t in (1, 5, 40):
                x = torch.randn(t, 32, generator=gen)
                torch.testing.assert_close(moe(x), _moe_per_expert_loop(moe, x), atol=1e-5, rtol=1e-5)


def test_grouped_linear_fallback_equals_kernel(monkeypatch):
    from stage_worker.models import moe

    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(10, 8, generator=gen), torch.randn(4, 6, 8, generator=gen)
    offs = torch.tensor([3, 3, 9, 10], dtype=torch.int32)
    ref = torch.cat([x[:3] @ w[0].T, x[3:9] @ w[2].T, x[9:] @ w[3].T])
    torch.testing.assert_close(moe.grouped_linear(x, w, offs), ref)
    monkeypatch.setattr(moe, "_GROUPED_MM", None)
    torch.testing.assert_close(moe.grouped_linear(x, w, offs), ref)


def test_loader_reads_its_layers_and_experts(ds_root):
    path = make_deepseek_checkpoint(ds_root, "v3")
    validate_checkpoint(path)  # the probe no longer needs q_proj (V3 has q_a_proj/q_b_proj)
    stage, cfg = load_stage(path, 1, 2)
    names = set(stage.state_dict())
    assert all(n.startswith("layers.1.") for n in names)
    assert "layers.1.mlp.experts.7.down_proj.weight" in set(stage.checkpoint_tensors())
    assert "layers.1.mlp.gate.e_score_correction_bias" in names
    assert cfg.head_dim == 24 and cfg.num_key_value_heads == 4
    first, _ = load_stage(path, 0, 1)
    assert "layers.0.mlp.gate_proj.weight" in set(first.checkpoint_tensors())  # dense first layer


def test_bf16_stage(ds_root):
    path = make_deepseek_checkpoint(ds_root, "v3")
    stage, _ = load_stage(path, 0, 3, dtype=torch.bfloat16)
    assert stage.layers["1"].mlp.gate.e_score_correction_bias.dtype == torch.float32
    kv = stage.make_kv_cache(4, 4)
    assert kv.layer(0).dtype == torch.bfloat16 and kv.layer(0).shape == (16, 32 + 8)
    meta = AttnMetadata.build([(0, 6, [0, 1])], 4, "cpu")
    h = stage(torch.arange(3, 9), None, meta, kv)
    meta = AttnMetadata.build([(6, 1, [0, 1])], 4, "cpu")
    h = stage(torch.tensor([5]), None, meta, kv)
    logits = stage.compute_logits(h)
    assert h.dtype == torch.bfloat16 and logits.dtype == torch.float32 and torch.isfinite(logits).all()


# -- KV bytes ----------------------------------------------------------------------------------
def test_kv_bytes_per_token_v3_shape():
    """bf16, all 61 layers: latent (512 + 64) vs full K (128 x 192) + V (128 x 128)."""
    s = V3_SHAPE
    got = kv_bytes_per_token(s["num_hidden_layers"], s["num_attention_heads"], s["kv_lora_rank"],
                             s["qk_nope_head_dim"], s["qk_rope_head_dim"], s["v_head_dim"], torch.bfloat16)
    assert got["latent"] == 61 * 576 * 2 == 70_272
    assert got["full_kv"] == 61 * 128 * 320 * 2 == 4_997_120
    ratio = got["full_kv"] / got["latent"]
    assert 71.1 < ratio < 71.2
    per_layer = got["latent"] // 61
    block = MLAKVCache.block_bytes(61, 16, 512, 64, torch.bfloat16)
    assert block == 16 * got["latent"]
    print(f"\nDeepSeek-V3 KV bytes/token (bf16): latent {per_layer} B/layer, {got['latent']} B "
          f"over 61 layers; full K/V {got['full_kv'] // 61} B/layer, {got['full_kv']} B; "
          f"ratio {ratio:.1f}x; 16-token block {block} B")


def test_mla_pool_is_what_the_worker_sizes(ds_root):
    """The stage's pool reports the bytes a block costs (what the worker divides its budget by)."""
    path = make_deepseek_checkpoint(ds_root, "v2")
    stage, cfg = load_stage(path, 1, 3)
    kv = stage.make_kv_cache(10, 16)
    assert kv.bytes_per_block == 2 * 16 * (32 + 8) * 4
    assert sum(t.numel() * t.element_size() for t in kv.latents) == 10 * kv.bytes_per_block
    assert kv.scratch_block is None  # the CPU pool has none: a scratch block (graphs) only on CUDA
    dense, moe = layer_profile(cfg, 0), layer_profile(cfg, 1)
    assert moe["moe"] and not dense["moe"] and moe["weight_bytes"] > dense["weight_bytes"]
    assert moe["flops_per_token"] < moe["weight_bytes"]  # held experts >> active experts


# -- end to end through the real mesh ----------------------------------------------------------
@pytest.mark.parametrize("kind,stages", [("v3", 2), ("v2", 3)])
def test_mesh_greedy_equals_transformers(ds_root, kind, stages):
    model_dir = make_deepseek_checkpoint(ds_root, kind)
    check_mesh_greedy(model_dir, stages, random_prompts(seed=stages, lengths=[3, 17, 40, 71, 9], vocab=320), 10)


def test_paged_metadata_layout(ds_root):
    """The GPU metadata layout (block tables, no padded decode slots) gives the same hidden states."""
    path = make_deepseek_checkpoint(ds_root, "v3")
    stage, _ = load_stage(path, 0, 3)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 320, (30,), generator=gen)
    outs = []
    for paged in (False, True):
        kv = stage.make_kv_cache(8, 4)
        prefill = AttnMetadata.build([(0, 9, [5, 1, 7]), (0, 12, [0, 2, 4])], 4, "cpu", paged=paged)
        a = stage(ids[:21], None, prefill, kv)
        mixed = AttnMetadata.build([(9, 1, [5, 1, 7]), (12, 3, [0, 2, 4, 6]), (0, 1, [3])], 4, "cpu",
                                   paged=paged)
        b = stage(ids[21:26], None, mixed, kv)
        decode = AttnMetadata.build([(10, 1, [5, 1, 7]), (1, 1, [3])], 4, "cpu", paged=paged)
        outs.append(torch.cat([a, b, stage(ids[26:28], None, decode, kv)]))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_hub_v3_config_and_layer_profile():
    """DeepSeek-V3's own config.json layout (4.x `rope_scaling` with `type`, FP8 quantization_config)."""
    raw = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
           "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
           "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
           "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
           "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
           "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
           "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
           "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu",
           "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
           "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                            "type": "yarn"},
           "torch_dtype": "bfloat16", "tie_word_embeddings": False,
           "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                   "quant_method": "fp8", "weight_block_size": [128, 128]}}
    cfg = ModelConfig.from_dict(raw)
    d = DeepseekDims.from_config(cfg)
    assert (d.q_lora_rank, d.topk_method, d.scoring_func, cfg.head_dim) == (1536, "noaux_tc", "sigmoid", 192)
    assert [d.is_moe(i) for i in (0, 2, 3, 60)] == [False, False, True, True]
    dense, moe = layer_profile(cfg, 2), layer_profile(cfg, 3)
    print(f"\nV3 layer profile (bf16): dense {dense['weight_bytes'] / 2**30:.2f} GiB, "
          f"{dense['flops_per_token'] / 1e9:.2f} GFLOP/token; MoE {moe['weight_bytes'] / 2**30:.2f} GiB, "
          f"{moe['flops_per_token'] / 1e9:.2f} GFLOP/token")
    assert moe["weight_bytes"] > 15 * dense["weight_bytes"] / 2
    assert moe["flops_per_token"] < 2 * dense["flops_per_token"]
