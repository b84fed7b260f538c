"""The GPU path's logic, checked on the CPU: paged metadata, paged decode, padded decode graphs.

The CUDA-only pieces (the Triton kernel, graph capture) are chosen at run time; here their
CPU-side twins run the same index arithmetic: `AttnMetadata.build(paged=True)` with the torch
paged-decode reference, and `DecodeGraphs(capture=False)`, which pads to the same buckets and
fills the same static buffers as the captured graphs. Results must match the CPU reference path.
"""

from __future__ import annotations

import pytest
import torch

from stage_worker.attention import AttnMetadata
from stage_worker.cuda_graphs import DecodeGraphs, MixedGraphs
from stage_worker.executor import StageExecutor
from stage_worker.kv_cache import PagedKVCache
from stage_worker.loader import load_stage
from stage_worker.step_input import decode
from stage_worker.kernels.paged_decode import choose_splits, paged_decode, paged_decode_torch
from stage_worker.kernels.unified_attention import max_tiles, tile_plan
from stagemesh.errors import InvalidArgument
from stagemesh.v1 import stagemesh_pb2 as pb
from tests.checkpoints import make_hf_checkpoint

BLOCK = 4


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    path = make_hf_checkpoint(tmp_path_factory.mktemp("gpu"), "llama3")
    model, _ = load_stage(path, 0, 4)
    return model


def _prefill_then(model, kv, tables, prompts, paged):
    meta = AttnMetadata.build([(0, len(p), t) for p, t in zip(prompts, tables)], BLOCK, "cpu", paged=paged)
    ids = torch.tensor([x for p in prompts for x in p])
    return model(ids, None, meta, kv)


def test_paged_metadata_matches_reference_layout(stage):
    prompts = [[5, 9, 3, 7, 1, 4, 2], [8, 8, 6], [11, 12, 13, 14, 15]]
    tables = [[7, 2], [0, 5], [3, 6]]  # interleaved, non-contiguous
    outs = {}
    for paged in (False, True):
        kv = stage.make_kv_cache(8, BLOCK)
        _prefill_then(stage, kv, [t[:2] for t in tables], [p[:4] for p in prompts], paged)
        # Mixed step: seq 0 continues its prompt mid-block, seq 1 decodes, seq 2 prefills the rest.
        chunks = [(4, 3, tables[0]), (3, 1, tables[1]), (4, 1, tables[2])]
        meta = AttnMetadata.build(chunks, BLOCK, "cpu", paged=paged)
        ids = torch.tensor(prompts[0][4:] + [prompts[1][2], prompts[2][4]])
        outs[paged] = stage(ids, None, meta, kv)
        if paged:
            assert meta.decode_ids == [1, 2] and meta.prefill_ids == [0] and not meta.decode_all
            assert meta.block_tables.tolist() == [[0, 0], [3, 6]]  # seq 1 needs one block
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-5, atol=1e-5)


def test_unified_metadata_matches_reference_layout(stage):
    """The mixed-batch GPU layout (one attention launch over tiles) computes the reference function."""
    prompts = [[5, 9, 3, 7, 1, 4, 2], [8, 8, 6], [11, 12, 13, 14, 15]]
    tables = [[7, 2], [0, 5], [3, 6]]
    outs = {}
    for tile_q in (None, 2):
        kv = stage.make_kv_cache(8, BLOCK)
        _prefill_then(stage, kv, [t[:2] for t in tables], [p[:4] for p in prompts], paged=False)
        chunks = [(4, 3, tables[0]), (3, 1, tables[1]), (4, 1, tables[2])]
        meta = AttnMetadata.build(chunks, BLOCK, "cpu", paged=tile_q is not None, tile_q=tile_q)
        assert meta.unified == (tile_q is not None)
        if tile_q:
            assert meta.tile_seq.tolist() == [0, 0, 1, 2] and meta.tile_row.tolist() == [0, 2, 3, 4]
            assert meta.seq_lens.tolist() == [7, 4, 5] and meta.qsl.tolist() == [0, 3, 4, 5]
        ids = torch.tensor(prompts[0][4:] + [prompts[1][2], prompts[2][4]])
        outs[tile_q] = stage(ids, None, meta, kv)
    torch.testing.assert_close(outs[2], outs[None], rtol=1e-5, atol=1e-5)


def test_paged_metadata_views_are_16_byte_aligned():
    """Triton specialises kernels on pointer alignment: every index view must start aligned, or
    odd token counts would compile new kernel variants while serving."""
    meta = AttnMetadata.build([(3, 2, [5, 1]), (0, 1, [2]), (4, 4, [3, 7])], 4, "cpu", paged=True, tile_q=2)
    views = [meta.positions, meta.slot_mapping, meta.decode_rows, meta.decode_ctx, meta.block_tables,
             meta.seq_lens, meta.qsl, meta.seq_tables, meta.tile_seq, meta.tile_row]
    assert all(v.data_ptr() % 16 == 0 for v in views)
    assert meta.positions.tolist() == [3, 4, 0, 4, 5, 6, 7] and meta.qsl.tolist() == [0, 2, 3, 7]


def test_tile_plan_covers_every_row_once_within_the_bound():
    qsl = __import__("numpy").array([0, 1, 17, 18, 50])
    seq, row = tile_plan(qsl, 16, size=max_tiles(50, 6, 16))
    real = seq >= 0
    assert seq[real].tolist() == [0, 1, 2, 3, 3] and row[real].tolist() == [0, 1, 17, 18, 34]
    assert len(seq) == 50 // 16 + 6 and (seq[~real] == -1).all()
    with pytest.raises(ValueError, match="do not fit"):
        tile_plan(qsl, 16, size=3)


def test_paged_metadata_indices_and_validation():
    meta = AttnMetadata.build([(3, 2, [5, 1]), (0, 1, [2])], 4, "cpu", paged=True)
    assert meta.positions.tolist() == [3, 4, 0]
    assert meta.slot_mapping.tolist() == [23, 4, 8]
    assert meta.context_lens == [5, 1] and meta.decode_ids == [1] and meta.last_rows == [1, 2]
    assert meta.block_tables.tolist() == [[2, 0]] and meta.decode_ctx.tolist() == [1]
    assert meta.context_slots[0].tolist() == [20, 21, 22, 23, 4]
    with pytest.raises(InvalidArgument, match="cannot hold"):
        AttnMetadata.build([(3, 2, [5])], 4, "cpu", paged=True)
    with pytest.raises(InvalidArgument, match="bad chunk"):
        AttnMetadata.build([(0, 0, [5])], 4, "cpu", paged=True)


def test_paged_decode_reference_matches_dense():
    torch.manual_seed(0)
    b, hq, hkv, d, bs = 3, 8, 2, 16, 4
    kc, vc = torch.randn(40 * bs, hkv, d), torch.randn(40 * bs, hkv, d)
    q = torch.randn(b, hq, d)
    ctx = torch.tensor([1, 9, 30])
    bt = torch.randperm(40)[: b * 8].view(b, 8)
    out = paged_decode(q, kc, vc, bt, ctx, 0.25, bs, num_splits=3)  # torch path on the CPU
    for i in range(b):
        p = torch.arange(int(ctx[i]))
        slots = bt[i, p // bs] * bs + p % bs
        k = kc[slots].repeat_interleave(hq // hkv, 1)  # [L, Hq, D]
        v = vc[slots].repeat_interleave(hq // hkv, 1)
        att = torch.einsum("hd,lhd->hl", q[i], k).mul(0.25).softmax(-1)
        torch.testing.assert_close(out[i], torch.einsum("hl,lhd->hd", att, v), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, paged_decode_torch(q, kc, vc, bt, ctx, 0.25, bs))


def test_choose_splits_fills_the_gpu_and_never_exceeds_context():
    assert choose_splits(1, 8, None, 132) == 16
    assert choose_splits(64, 8, None, 132) == 1
    assert choose_splits(1, 8, 70, 132) == 2  # 70 tokens: two 64-token tiles at most
    assert choose_splits(1, 8, 70, 132, block_n=32) == 3  # the kernel's keys per iteration set the cap
    assert choose_splits(4, 8, None, 132) == 9


def test_kv_scratch_block_is_outside_the_gateway_range():
    kv = PagedKVCache(2, 10, 4, 2, 8, torch.float32, "cpu", scratch_blocks=1)
    assert kv.scratch_block == 10 and kv.num_blocks == 10 and kv.layer(0)[0].shape == (44, 2, 8)
    assert PagedKVCache(2, 10, 4, 2, 8, torch.float32, "cpu").scratch_block is None


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_padded_decode_graph_equals_unpadded(stage, batch):
    """Padding to the bucket (3 -> 4, 5 -> 8) must not change real rows or touch their KV."""
    prompts = [[(7 * s + j) % 300 + 3 for j in range(3 + 2 * s)] for s in range(batch)]
    tables = [[s + batch * j for j in range(4)] for s in range(batch)]
    results = []
    for use_graphs in (False, True):
        kv = stage.make_kv_cache(4 * batch, BLOCK, scratch_blocks=1)
        _prefill_then(stage, kv, tables, prompts, paged=False)
        chunks = [(len(p), 1, t) for p, t in zip(prompts, tables)]
        ids = [p[-1] for p in prompts]
        if use_graphs:
            graphs = DecodeGraphs(stage, kv, BLOCK, buckets=(1, 2, 4, 8), max_context=64, capture=False)
            assert graphs.accepts(chunks) and graphs.bucket(batch) >= batch
            out = graphs.run(chunks, ids, None).clone()
            out2 = graphs.run(chunks, ids, None)  # a second run rewrites the same slots
            torch.testing.assert_close(out, out2)
        else:
            meta = AttnMetadata.build(chunks, BLOCK, "cpu")
            out = stage(torch.tensor(ids), None, meta, kv)
        real = kv.num_blocks * BLOCK
        results.append((out, [c[:real].clone() for c in kv.k_caches]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_padded_mixed_graph_equals_unpadded(stage):
    """A mixed micro-batch padded to its token bucket (mid-prompt chunk, fresh prompt, decodes)
    gives the rows and the KV of the plain path; padding rows touch only the scratch block."""
    prompts = [[(5 * s + j) % 300 + 3 for j in range(6 + 3 * s)] for s in range(4)]
    tables = [[s + 4 * j for j in range(4)] for s in range(4)]
    # seq 0 and 1 have 4 tokens cached, seq 2 and 3 decode after their full prompt
    chunks = [(4, len(prompts[0]) - 4, tables[0]), (0, len(prompts[1]), tables[1]),
              (len(prompts[2]), 1, tables[2]), (len(prompts[3]), 1, tables[3])]
    ids = prompts[0][4:] + prompts[1] + [7, 9]
    results = []
    for use_graphs in (False, True):
        kv = stage.make_kv_cache(16, BLOCK, scratch_blocks=1)
        _prefill_then(stage, kv, [tables[0], tables[2], tables[3]], [prompts[0][:4], prompts[2], prompts[3]],
                      paged=False)
        if use_graphs:
            graphs = MixedGraphs(stage, kv, BLOCK, buckets=(8, 32), max_seqs=6, max_context=64, capture=False)
            assert graphs.accepts(chunks) and graphs.bucket(len(ids)) == 32
            out, last = graphs.run(chunks, ids, None)
            out = out.clone()
            out2, _ = graphs.run(chunks, ids, None)  # a second run rewrites the same slots
            torch.testing.assert_close(out, out2)
        else:
            meta = AttnMetadata.build(chunks, BLOCK, "cpu")
            out, last = stage(torch.tensor(ids), None, meta, kv), meta.last_rows
        real = kv.num_blocks * BLOCK
        results.append((out, last, [c[:real].clone() for c in kv.k_caches + kv.v_caches]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    assert results[1][1] == results[0][1]
    for a, b in zip(results[1][2], results[0][2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_mixed_graphs_refuse_what_they_cannot_hold(stage):
    kv = stage.make_kv_cache(8, BLOCK, scratch_blocks=1)
    graphs = MixedGraphs(stage, kv, BLOCK, buckets=(8,), max_seqs=2, max_context=16, capture=False)
    assert graphs.accepts([(0, 5, [0, 1])])
    assert not graphs.accepts([(3, 1, [0])])  # decode-only: the decode graphs' job
    assert not graphs.accepts([(0, 9, [0, 1, 2])])  # more tokens than the largest bucket
    assert not graphs.accepts([(0, 2, [0])] * 3)  # more sequences than max_seqs
    assert not graphs.accepts([(14, 3, [0, 1, 2, 3, 4])])  # context past max_context


def test_decode_graphs_refuse_what_they_cannot_hold(stage):
    kv = stage.make_kv_cache(8, BLOCK, scratch_blocks=1)
    graphs = DecodeGraphs(stage, kv, BLOCK, buckets=(1, 2), max_context=8, capture=False)
    assert not graphs.accepts([(0, 2, [0])])  # a prefill chunk
    assert not graphs.accepts([(3, 1, [0])] * 3)  # more rows than the largest bucket
    assert not graphs.accepts([(8, 1, [0, 1, 2])])  # context past max_context
    with pytest.raises(ValueError, match="scratch"):
        DecodeGraphs(stage, stage.make_kv_cache(8, BLOCK), BLOCK, capture=False)


def test_executor_with_graph_path_samples_the_same_tokens(stage):
    """The executor's graph route (padded, eager on the CPU) and its plain route agree."""
    tokens = []
    for graphs in (False, True):
        kv = stage.make_kv_cache(8, BLOCK, scratch_blocks=1)
        ex = StageExecutor(stage, kv, BLOCK, cuda_graphs=graphs)
        assert (ex.graphs is not None) == graphs and (ex.mixed_graphs is not None) == graphs
        req = pb.ForwardRequest(lease_id="l", token_ids=[5, 6, 7, 8, 9, 10, 11])
        for sid, (blocks, n) in enumerate([([0, 1], 4), ([2, 3], 3)]):
            req.new_sequences.add(seq_id=sid, block_ids=blocks)
            req.chunks.add(seq_id=sid, start_pos=0, num_tokens=n, sample=True)
        first = ex.run(decode(req, ex.shape)).samples
        req = pb.ForwardRequest(lease_id="l", token_ids=[t for _, t in first])
        for sid, (pos, _) in enumerate([(4, 0), (3, 0)]):
            req.chunks.add(seq_id=sid, start_pos=pos, num_tokens=1, sample=True, output_index=1)
        tokens.append((first, ex.run(decode(req, ex.shape)).samples))
    assert tokens[0] == tokens[1]


def test_steps_that_follow_samples_on_the_graph_routes_equal_steps_given_the_tokens(stage):
    """Async scheduling on the graph routes (padded, eager on the CPU): each step is launched
    before the one it follows is collected, its token ids put in place from that step's argmax
    on the device, through a decode step and a mixed step with a new prompt. Same samples as
    the plain route given the tokens one step at a time."""
    prompts = {0: [5, 6, 7, 8], 1: [9, 10, 11], 2: [12, 13, 14, 15, 16]}
    blocks = {0: [0, 1, 2], 1: [3, 4, 5], 2: [6, 7]}

    def step(tokens, follows, new=()):
        req = pb.ForwardRequest(lease_id="l")
        for sid, (pos, out_index, token) in tokens.items():
            req.chunks.add(seq_id=sid, start_pos=pos, num_tokens=1, sample=True, output_index=out_index,
                           follows_sample=follows)
            req.token_ids.append(0 if follows else token)
        for sid in new:
            req.new_sequences.add(seq_id=sid, block_ids=blocks[sid])
            req.chunks.add(seq_id=sid, start_pos=0, num_tokens=len(prompts[sid]), sample=True)
            req.token_ids.extend(prompts[sid])
        return decode(req, shape)

    plain = StageExecutor(stage, stage.make_kv_cache(8, BLOCK, scratch_blocks=1), BLOCK, cuda_graphs=False)
    shape = plain.shape
    s1 = dict(plain.run(step({}, False, new=(0, 1))).samples)
    s2 = dict(plain.run(step({0: (4, 1, s1[0]), 1: (3, 1, s1[1])}, False)).samples)
    s3 = dict(plain.run(step({0: (5, 2, s2[0]), 1: (4, 2, s2[1])}, False, new=(2,))).samples)

    ahead = StageExecutor(stage, stage.make_kv_cache(8, BLOCK, scratch_blocks=1), BLOCK, cuda_graphs=True)
    first = ahead.launch(step({}, False, new=(0, 1)))
    second = ahead.launch(step({0: (4, 1, None), 1: (3, 1, None)}, True))
    assert second.route == "decode_graph"
    a1 = dict(ahead.finish(first).samples)
    third = ahead.launch(step({0: (5, 2, None), 1: (4, 2, None)}, True, new=(2,)))
    assert third.route == "mixed_graph"
    assert (a1, dict(ahead.finish(second).samples), dict(ahead.finish(third).samples)) == (s1, s2, s3)


def test_merged_projections_hold_the_checkpoint_tensors_and_shard_by_part(tmp_path):
    """One layout on every device: the loader fills q/k/v (with Qwen2's biases) and gate/up into
    the merged matmuls' row slices; a tensor-parallel shard keeps each part's rows, re-merged."""
    from safetensors.torch import load_file

    path = make_hf_checkpoint(tmp_path, "qwen2")  # with q/k/v biases
    model, cfg = load_stage(path, 0, 2)
    ckpt = load_file(path / "model.safetensors")
    attn, mlp = model.layers["1"].self_attn, model.layers["1"].mlp
    w = "model.layers.1.self_attn.{}_proj.{}"
    for kind in ("weight", "bias"):
        merged = torch.cat([ckpt[w.format(p, kind)] for p in "qkv"])
        assert torch.equal(getattr(attn.qkv_proj, kind), merged.to(model.dtype))
    gate_up = torch.cat([ckpt[f"model.layers.1.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(mlp.gate_up_proj.weight, gate_up.to(model.dtype))
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn.qkv_proj.shard_rows(1, 2)  # rank 1 of 2: the second half of each part's heads
    expect = torch.cat([ckpt[w.format("q", "bias")][hq * d // 2:], ckpt[w.format("k", "bias")][hkv * d // 2:],
                        ckpt[w.format("v", "bias")][hkv * d // 2:]])
    assert torch.equal(attn.qkv_proj.bias, expect.to(model.dtype))
    assert attn.qkv_proj.parts == {"q_proj": hq * d // 2, "k_proj": hkv * d // 2, "v_proj": hkv * d // 2}
