"""Qwen3, Gemma 2, Phi-3 and Mixtral beyond test_model's per-kind table (which checks each against
transformers' logits at 1-3 stages): each family served by `stagemesh up` (real gRPC processes,
chunked prefill), the GPU layouts (paged decode, unified attention, padded CUDA-graph buffers run
eagerly) holding Gemma 2's sliding window and soft caps, Phi-3's LongRoPE switching to its long
factors past the original context, and the errors a checkpoint of something else gets.
"""

from __future__ import annotations

import json

import pytest
import torch

from stage_worker.attention import AttnMetadata
from stage_worker.cuda_graphs import DecodeGraphs, MixedGraphs
from stage_worker.loader import load_stage
from stagemesh.errors import CheckpointError
from stagemesh.model_config import ModelConfig
from tests.checkpoints import make_hf_checkpoint
from tests.meshes import check_mesh_greedy
from tests.reference import hf_model, random_prompts
from tests.test_model import run_pipeline

BLOCK = 4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


# -- through the mesh --------------------------------------------------------------------------
# Every family is checked against transformers at 1-3 stages in process (test_model's per-kind
# table); the mesh has no family-specific code, so it runs the two that exercise the most: Gemma 2
# (window, caps, extra norms) at 3 stages and Mixtral (MoE) at 2. Prompts longer than Gemma 2's
# 6-key window and the 16-token prefill budget (chunked).
@pytest.mark.parametrize("kind,stages", [("gemma2", 3), ("mixtral", 2)])
def test_mesh_greedy_equals_transformers(root, kind, stages):
    model_dir = make_hf_checkpoint(root, kind)
    check_mesh_greedy(model_dir, stages, random_prompts(seed=stages, lengths=[3, 17, 24, 9], vocab=320), 8)


# -- Gemma 2 on the GPU's layouts ---------------------------------------------------------------
def _steps():
    """Three steps of two sequences: A prefills 9 (past the window), then A decodes while B
    prefills 11 from 0, then both decode. (chunks, token ids) per step."""
    ta, tb = [5, 1, 7, 3], [0, 6, 2, 4]
    a, b = [(3 * j) % 300 + 5 for j in range(11)], [(7 * j) % 300 + 9 for j in range(12)]
    return [([(0, 9, ta)], a[:9]),
            ([(9, 1, ta), (0, 11, tb)], a[9:10] + b[:11]),
            ([(10, 1, ta), (11, 1, tb)], a[10:11] + b[11:12])]


def _run_steps(stage, route: str) -> list[torch.Tensor]:
    """The steps through one route: "cpu" (reference layout), "paged" (unified attention for mixed
    steps, paged decode for decode-only ones), "graphs" (the CUDA-graph buffers, run eagerly)."""
    kv = stage.make_kv_cache(8, BLOCK, scratch_blocks=1)
    graphs = mixed = None
    if route == "graphs":
        graphs = DecodeGraphs(stage, kv, BLOCK, buckets=(1, 2, 4), max_context=32, capture=False)
        mixed = MixedGraphs(stage, kv, BLOCK, buckets=(16,), max_seqs=4, max_context=32, capture=False)
    outs = []
    for chunks, ids in _steps():
        if graphs is not None and graphs.accepts(chunks):
            out = graphs.run(chunks, ids, None)
        elif mixed is not None and mixed.accepts(chunks):
            out = mixed.run(chunks, ids, None)[0]
        else:
            meta = AttnMetadata.build(chunks, BLOCK, "cpu", paged=route == "paged", tile_q=stage.attention_tile_q)
            out = stage(torch.tensor(ids), None, meta, kv)
        outs.append(out.clone())
    return outs


def test_gemma2_window_and_caps_hold_on_every_layout(root):
    """The paged and graph layouts (the kernels' torch references, with window and soft cap) give
    the reference layout's hidden states; the window and both caps are live on these inputs."""
    stage, cfg = load_stage(make_hf_checkpoint(root, "gemma2"), 0, 4)
    windows = [layer.self_attn.window for layer in stage.layers.values()]
    assert windows == [6, None, 6, None] and stage.layers["0"].self_attn.softcap == 3.0
    ref = _run_steps(stage, "cpu")
    for route in ("paged", "graphs"):
        for got, want in zip(_run_steps(stage, route), ref):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    logits = stage.compute_logits(ref[1])
    assert logits.abs().max() <= cfg.raw["final_logit_softcapping"]
    stage.final_logit_softcap = None
    assert logits.abs().max() < stage.compute_logits(ref[1]).abs().max()  # the final cap bit
    for layer in stage.layers.values():
        layer.self_attn.window = None
    assert not torch.allclose(_run_steps(stage, "cpu")[1], ref[1], atol=1e-3)  # the window bit
    for layer in stage.layers.values():
        layer.self_attn.softcap = None
    assert not torch.allclose(_run_steps(stage, "paged")[1], ref[1], atol=1e-3)


# -- Phi-3 LongRoPE past the original context ---------------------------------------------------
def test_phi3_longrope_past_original_context(root):
    """A 26-token prompt (inside the original 32 positions: short factors) decoding 14 tokens: from
    position 32 on, each new token is rotated with the long factors, as transformers' Phi-3
    forward does for it with a KV cache; every step's logits equal transformers' at that step.

    (transformers' `generate` goes further at the crossing: Phi-3's prepare_inputs_for_generation
    drops the cache once and re-encodes the whole sequence with the long factors. A stage never
    re-encodes a prefix, so past the original context its tokens can differ from `generate`'s.)"""
    path = make_hf_checkpoint(root, "phi3")
    stages = [load_stage(path, a, b)[0] for a, b in ((0, 2), (2, 4))]
    assert stages[0].original_max_position_embeddings == 32 and stages[0].attention_scaling > 1.0
    per_token = stages[0].inv_freq_at(torch.tensor([31, 32]))
    assert torch.equal(per_token[0], stages[0].inv_freq) and torch.equal(per_token[1], stages[0].long_inv_freq)
    prompt = random_prompts(seed=3, lengths=[26], vocab=320)[0]
    tokens, rows = run_pipeline(stages, [prompt], 14)
    hf, ids, cache, steps = hf_model(path), torch.tensor([prompt]), None, []
    with torch.no_grad():  # greedy decoding by hand, one forward per token over the KV cache
        for j in range(14):
            out = hf(ids, past_key_values=cache, use_cache=True,
                     position_ids=torch.arange(26 + j - ids.shape[1], 26 + j)[None])
            cache, logits = out.past_key_values, out.logits[0, -1]
            steps.append(logits)
            ids = logits.argmax()[None, None]
    assert tokens[0] == [int(s.argmax()) for s in steps]
    torch.testing.assert_close(rows[0][25:], torch.stack(steps), atol=1e-4, rtol=1e-4)  # row 25 + j: token j


# -- what a checkpoint of something else gets ---------------------------------------------------
def _config(tmp_path, **changes) -> None:
    raw = dict(architectures=["LlamaForCausalLM"], vocab_size=320, hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, torch_dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps({**raw, **changes}))


def test_unsupported_checkpoints_are_named(tmp_path):
    _config(tmp_path, architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(CheckpointError) as err:
        ModelConfig.from_dir(tmp_path)
    for name in ("GPTNeoXForCausalLM", "Gemma2ForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM",
                 "Qwen3ForCausalLM", "LlamaForCausalLM", "DeepseekV3ForCausalLM"):
        assert name in str(err.value)
    _config(tmp_path, architectures=["Phi3ForCausalLM"], partial_rotary_factor=0.3125)
    with pytest.raises(CheckpointError, match="partial_rotary_factor=0.3125 gives 5 rotary dims"):
        load_stage(tmp_path, 0, 1)
    _config(tmp_path, hidden_act="relu2")
    with pytest.raises(CheckpointError, match="hidden activation 'relu2'"):
        load_stage(tmp_path, 0, 1)
    _config(tmp_path, architectures=["MixtralForCausalLM"], num_local_experts=4)
    with pytest.raises(CheckpointError, match="num_experts_per_tok"):
        load_stage(tmp_path, 0, 1)


def test_moe_experts_load_into_the_fused_moe_layer(root):
    """Each Mixtral expert's w1/w3/w2 lands in its slices of the stacked experts (models/moe.py); the
    MoE stage is refused by tensor parallelism (no expert split) instead of failing inside it;
    Qwen3-MoE keeps the layers of `mlp_only_layers` dense."""
    from stage_worker.models.moe import SparseMoE
    from stage_worker.tensor_parallel import shard_stage

    stage, _ = load_stage(make_hf_checkpoint(root, "mixtral"), 1, 3)
    names = stage.checkpoint_tensors()
    moe = stage.layers["2"].mlp
    assert isinstance(moe, SparseMoE) and moe.gate.spec.top_k == 2 and moe.gate.spec.norm_topk_prob
    assert names["layers.2.block_sparse_moe.experts.3.w3.weight"].data_ptr() == moe.w_gate_up[3, 64:].data_ptr()
    assert "layers.2.block_sparse_moe.gate.weight" in names and not any(".mlp." in n for n in names)
    with pytest.raises(CheckpointError, match="dense Llama-family"):
        shard_stage(stage, 0, 2)
    qwen, _ = load_stage(make_hf_checkpoint(root, "qwen3moe"), 0, 4)  # mlp_only_layers=[1]
    assert [isinstance(layer.mlp, SparseMoE) for layer in qwen.layers.values()] == [True, False, True, True]
    assert "layers.2.mlp.experts.3.down_proj.weight" in qwen.checkpoint_tensors()


# -- config.json as the hub ships it (transformers 4.x layouts) --------------------------------
def _factors(n: int, lo: float, hi: float) -> list[float]:
    return torch.linspace(lo, hi, n).tolist()


HUB_CONFIGS = {  # the fields that decide windows and rotary, as in the hub's config.json files
    "gemma-2-2b": dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", hidden_size=2304, head_dim=256,
                       num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=26, sliding_window=4096,
                       query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "Qwen2.5-7B": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584, num_attention_heads=28,
                       num_key_value_heads=4, num_hidden_layers=28, sliding_window=131072, use_sliding_window=False,
                       max_window_layers=28, rope_theta=1000000.0),
    "Qwen3-8B": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=4096, head_dim=128,
                     num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=36, sliding_window=None,
                     use_sliding_window=False, max_window_layers=36),
    "Mistral-7B-v0.1": dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=4096,
                            num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32, sliding_window=4096),
    "Phi-3-mini-4k": dict(architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=3072, num_attention_heads=32,
                          num_hidden_layers=32, sliding_window=2047, max_position_embeddings=4096,
                          original_max_position_embeddings=4096, rope_scaling=None),
    "Phi-3-mini-128k": dict(architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=3072,
                            num_attention_heads=32, num_hidden_layers=32, sliding_window=262144,
                            max_position_embeddings=131072, original_max_position_embeddings=4096,
                            rope_scaling={"type": "longrope", "short_factor": _factors(48, 1.0, 1.2),
                                          "long_factor": _factors(48, 1.1, 60.0)}),
    "Qwen3-30B-A3B": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048,
                          head_dim=128, num_attention_heads=32, num_key_value_heads=4, num_hidden_layers=48,
                          num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[], sliding_window=None, use_sliding_window=False,
                          max_window_layers=48),
    "Mixtral-8x7B": dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=4096,
                         num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32, sliding_window=None,
                         num_local_experts=8, num_experts_per_tok=2, rope_theta=1000000.0),
}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_hub_configs_read_as_transformers_reads_them(name):
    """Per-layer windows (layer_types where transformers derives them, else sliding_window on every
    layer) and Phi-3's LongRoPE tables equal transformers' own reading of the same config.json."""
    import types

    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from stage_worker.models.llama import sliding_window
    from stage_worker.models.phi3 import Phi3Stage

    raw = {**dict(vocab_size=1000, intermediate_size=64, rms_norm_eps=1e-6), **HUB_CONFIGS[name]}
    hf = AutoConfig.for_model(**raw)
    cfg = ModelConfig.from_dict(raw)
    types_ = getattr(hf, "layer_types", None)
    expect = [hf.sliding_window if not types_ or types_[i] == "sliding_attention" else None
              for i in range(cfg.num_hidden_layers)]
    assert [sliding_window(cfg, i) for i in range(cfg.num_hidden_layers)] == expect
    if name == "Phi-3-mini-128k":
        stage = types.SimpleNamespace()
        short, scaling = Phi3Stage.rope_init(stage, cfg)
        hf_short, hf_scaling = ROPE_INIT_FUNCTIONS["longrope"](hf, "cpu")
        hf_long, _ = ROPE_INIT_FUNCTIONS["longrope"](hf, "cpu", seq_len=4097)
        torch.testing.assert_close(short, hf_short, rtol=0, atol=0)
        torch.testing.assert_close(stage.long_inv_freq, hf_long, rtol=0, atol=0)
        assert scaling == pytest.approx(hf_scaling, rel=1e-12) and stage.original_max_position_embeddings == 4096
