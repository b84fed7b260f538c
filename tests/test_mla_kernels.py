"""The MLA kernels (stage_worker/kernels/mla_decode.py, mla_prefill.py) against their torch
references and an explicit float64 formula; the Triton kernels in Triton's CPU interpreter.

Tiny shapes with the awkward cases: a latent rank and rope width that are not the kernels'
power-of-two blocks (rope 8 padded to 16), more heads than one head block (20 > 16, the last
block masked), contexts of 0 (CUDA-graph padding: zeros, never NaN), 1, inside one page, page
tails, and longer than one block of rows; splits more than the context needs. As in
tests/test_kernels.py, a run without TRITON_INTERPRET runs the interpreter part in a fresh
process (Triton reads the variable once, at import).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stage_worker.kernels import mla_decode as md
from stage_worker.kernels import mla_expand as me
from stage_worker.kernels import mla_prefill as mp
from stage_worker.kernels.unified_attention import max_tiles, tile_plan
from tests.interpreted import INTERPRETED, run_in_interpreter

R, DR, BS = 32, 8, 4  # latent rank, rope width, tokens per page


def _pool(gen, blocks: int) -> torch.Tensor:
    return torch.randn(blocks * BS, R + DR, generator=gen)


def _tables(gen, n: int, blocks: int, width: int) -> torch.Tensor:
    return torch.stack([torch.randperm(blocks, generator=gen)[:width] for _ in range(n)])


def _explicit(q, pool, tables, ctx_lens, q_pos, scale) -> torch.Tensor:
    """float64, one query at a time: softmax over keys 0..q_pos of its sequence's rows."""
    out = torch.zeros(q.shape[0], q.shape[1], R, dtype=torch.float64)
    for i in range(q.shape[0]):
        n = int(q_pos[i]) + 1 if int(ctx_lens[i]) else 0
        if n == 0:
            continue
        pos = torch.arange(n)
        rows = pool[tables[i, pos // BS] * BS + pos % BS].double()  # [n, R + Dr]
        p = torch.softmax(q[i].double() @ rows.T * scale, dim=-1)  # [H, n]
        out[i] = p @ rows[:, :R]
    return out


def test_decode_reference_equals_explicit_formula():
    gen = torch.Generator().manual_seed(0)
    pool, ctx = _pool(gen, 30), torch.tensor([0, 1, 4, 5, 37])
    tables = _tables(gen, 5, 30, 10)
    q = torch.randn(5, 3, R + DR, generator=gen)
    got = md.mla_decode(q, pool, tables, ctx, 0.2, BS, R, use_triton=False)
    ref = _explicit(q, pool, tables, ctx, ctx - 1, 0.2)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    assert not got[0].any()  # context 0: zeros


def test_mixed_reference_equals_explicit_formula():
    """Each query sees its own prefix; rows of one sequence, of several, and a decode row."""
    gen = torch.Generator().manual_seed(1)
    pool = _pool(gen, 40)
    chunks = [(0, 6), (9, 3), (12, 1)]  # (tokens cached before, new tokens)
    tables = _tables(gen, 3, 40, 5)
    ctx = torch.tensor([s + n for s, n in chunks])
    qsl = torch.tensor([0, 6, 9, 10])
    q = torch.randn(10, 2, R + DR, generator=gen)
    got = mp.mla_attention(q, pool, tables, ctx, qsl, None, None, 0.3, BS, R, bq=4, use_triton=False)
    seq = torch.repeat_interleave(torch.arange(3), qsl[1:] - qsl[:-1])
    q_pos = ctx[seq] - (qsl[1:] - qsl[:-1])[seq] + torch.arange(10) - qsl[:-1][seq]
    ref = _explicit(q, pool, tables[seq], ctx[seq], q_pos, 0.3)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_splits_are_static_and_bounded():
    assert md.num_splits(1, 128, 132) == md.MAX_SPLITS  # few programs: split the context
    assert md.num_splits(256, 128, 132) == 1
    assert md.num_splits(1, 128, 132, max_ctx=40) == 1  # never splits shorter than 2 row blocks
    assert mp.tile_q(4) * 4 == mp.BLOCK_M and mp.tile_q(128) * mp.BLOCK_H == mp.BLOCK_M


def _expand_case(gen, heads: int, dn: int, dr: int, dv: int, chunks):
    """Packed queries and contexts of `chunks` [(tokens cached before, new tokens)], with K_nope
    and V as views of one [L, H, Dn + Dv] tensor (as expand_context makes them)."""
    ns = [n for _, n in chunks]
    lens = [s + n for s, n in chunks]
    cu_q = torch.tensor([0, *np.cumsum(ns)])
    cu_k = torch.tensor([0, *np.cumsum(lens)])
    tp, lp = int(cu_q[-1]), int(cu_k[-1])
    kv = torch.randn(lp, heads, dn + dv, generator=gen)
    q = torch.randn(tp, heads, dn + dr, generator=gen)
    return (q[..., :dn], q[..., dn:], kv[..., :dn], torch.randn(lp, dr, generator=gen), kv[..., dn:], cu_q, cu_k)


def test_expand_reference_equals_explicit_formula():
    """The expanded form's reference: each query sees its context up to its own position (the
    chunk's queries are the context's last ones); k_pe is shared by the heads."""
    gen = torch.Generator().manual_seed(4)
    chunks = [(0, 5), (7, 3), (2, 1)]
    qn, qp, kn, kp, v, cu_q, cu_k = _expand_case(gen, 3, 6, 4, 5, chunks)
    got = me.attention_torch(qn, qp, kn, kp, v, cu_q, cu_k, 0.3)
    for c, (start, n) in enumerate(chunks):
        for j in range(n):
            row, keys = int(cu_q[c]) + j, range(int(cu_k[c]), int(cu_k[c]) + start + j + 1)
            k = torch.cat([kn[keys], kp[keys][:, None].expand(-1, 3, -1)], -1).double()  # [L, H, Dn + Dr]
            s = torch.einsum("hd,lhd->hl", torch.cat([qn[row], qp[row]], -1).double(), k) * 0.3
            ref = torch.einsum("hl,lhd->hd", torch.softmax(s, -1), v[keys].double())
            torch.testing.assert_close(got[row].double(), ref, atol=1e-5, rtol=1e-5)


def test_expand_plan_picks_long_chunks_within_the_context_cap():
    """Chunks of >= min_tokens, while their contexts fit max(cap, step tokens); rows, context
    slots and offsets packed in the micro-batch's order; `expands` (the executor's graph-or-eager
    test) agrees with the plan."""
    from stage_worker.attention import AttnMetadata

    ns, ctx = np.array([5, 1, 4, 6, 3]), np.array([5, 9, 30, 6, 3])
    assert me.choose(ns, ctx, 4, max_context=12).tolist() == [0, 3]  # 30 > 19 - 5: skipped, 6 still fits
    assert me.choose(ns, ctx, 4, max_context=41).tolist() == [0, 2, 3]
    assert me.choose(ns, ctx, 0).size == 0
    chunks = [(s - n, n, []) for s, n in zip(ctx.tolist(), ns.tolist())]
    assert AttnMetadata.expands(chunks, 4) and not AttnMetadata.expands(chunks, 7)
    assert not AttnMetadata.expands([(4096, 512, [])], 256)  # context past the cap: absorbed (and graphs)
    # A step the graphs could take leaves them only for >= graph_min_tokens expanded queries.
    assert AttnMetadata.expands(chunks, 4, 15) and not AttnMetadata.expands(chunks, 4, 16)  # 5 + 4 + 6 picked
    assert not AttnMetadata.expands([(0, 512, [])], 256, 1024) and AttnMetadata.expands([(0, 1024, [])], 256, 1024)
    qsl = np.concatenate([[0], np.cumsum(ns)])
    tables = np.arange(5 * 8).reshape(5, 8)[:, ::-1].copy()  # sequence i: blocks 8i+7, 8i+6, ...
    rows, slots, cu_q, cu_k, tile_seq, tile_row = me.plan_arrays(np.array([0, 3]), qsl, ctx, tables, BS)
    assert rows.tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 15]
    seq0 = [tables[0, p // BS] * BS + p % BS for p in range(5)]
    seq3 = [tables[3, p // BS] * BS + p % BS for p in range(6)]
    assert slots.tolist() == seq0 + seq3
    assert cu_q.tolist() == [0, 5, 11] and cu_k.tolist() == [0, 5, 11]
    assert tile_seq.tolist() == [0, 1] and tile_row.tolist() == [0, 5]  # one BLOCK_M tile each


def test_deepseek_expanded_chunks_equal_the_absorbed_path(ds_stage):
    """The stage's output with long chunks in the expanded form (kv_b_proj up-projection + MHA)
    equals the absorbed form's, for a micro-batch of prefill chunks only and for one with a
    mid-prompt chunk, a short chunk and decode rows beside them; the pool is written the same
    (bit for bit by the first layer, whose inputs are the same)."""
    from stage_worker.attention import AttnMetadata

    tile_q = ds_stage.attention_tile_q
    prompts = [[(7 * s + j) % 300 + 3 for j in range(9 + 4 * s)] for s in range(4)]
    tables = [[s + 4 * j for j in range(6)] for s in range(4)]
    fresh = [(0, len(p), t) for p, t in zip(prompts, tables)]
    mixed = [(3, len(prompts[0]) - 3, tables[0]), (len(prompts[1]), 1, tables[1]), (0, 2, tables[2]),
             (0, len(prompts[3]), tables[3])]
    for chunks, ids, pre in ((fresh, sum(prompts, []), None),
                             (mixed, prompts[0][3:] + [5, 6, 7] + prompts[3], [prompts[0][:3], prompts[1]])):
        results = []
        for min_tokens in (0, 4):
            kv = ds_stage.make_kv_cache(24, BS, scratch_blocks=1)
            if pre:
                first = AttnMetadata.build([(0, len(p), t) for p, t in zip(pre, tables)], BS, "cpu")
                ds_stage(torch.tensor(sum(pre, [])), None, first, kv)
            meta = AttnMetadata.build(chunks, BS, "cpu", paged=True, tile_q=tile_q, expand_min_tokens=min_tokens)
            assert (meta.expand is not None) == (min_tokens > 0)
            out = ds_stage(torch.tensor(ids), None, meta, kv)
            results.append((out, [lat.clone() for lat in kv.latents]))
        assert meta.expand.all_rows == (chunks is fresh)
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(results[1][1][0], results[0][1][0], rtol=0, atol=0)  # layer 0: same inputs
        for a, b in zip(results[1][1][1:], results[0][1][1:]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


if not INTERPRETED:
    def test_kernels_in_an_interpreter_process():
        run_in_interpreter(__file__, "triton")


if INTERPRETED:
    @pytest.mark.parametrize("heads,splits", [(4, 1), (20, 3), (64, 2)])
    def test_triton_decode(heads, splits):
        gen = torch.Generator().manual_seed(2)
        pool, ctx = _pool(gen, 40), torch.tensor([0, 1, 3, 4, 70, 9])
        tables = _tables(gen, 6, 40, 18)
        q = torch.randn(6, heads, R + DR, generator=gen)
        ref = md.mla_decode_torch(q, pool, tables, ctx, 0.25, BS, R)
        for config in (None, {**md.decode_config(heads), "SPLIT_R": 2}):  # output columns in 2 programs
            out = md.mla_decode(q, pool, tables, ctx, 0.25, BS, R, splits, use_triton=True, config=config)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    def test_triton_mixed():
        """A prefill from 0, one mid-context past a block of rows, a one-token chunk, decode
        rows (one of context 1), and padding tiles (-1) that must write nothing."""
        gen = torch.Generator().manual_seed(3)
        heads = 20
        pool = _pool(gen, 48)
        chunks = [(0, 7), (66, 5), (10, 1), (0, 1), (3, 2)]
        ns = np.array([n for _, n in chunks])
        qsl = np.concatenate([[0], np.cumsum(ns)]).astype(np.int64)
        ctx = torch.tensor([s + n for s, n in chunks])
        tables = _tables(gen, len(chunks), 48, 18)
        bq = mp.tile_q(heads)
        tile_seq, tile_row = tile_plan(qsl, bq, size=max_tiles(int(qsl[-1]), len(chunks), bq) + 2)
        t = int(qsl[-1])
        q = torch.randn(t + 3, heads, R + DR, generator=gen)  # 3 padding rows no tile covers
        args = (pool, tables, ctx, torch.from_numpy(qsl), torch.from_numpy(tile_seq), torch.from_numpy(tile_row),
                0.3, BS, R, bq)
        got = mp.mla_attention(q, *args, use_triton=True)
        ref = mp.mla_attention(q, *args, use_triton=False)
        torch.testing.assert_close(got[:t], ref[:t], atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("dims", [(16, 16, 16), (24, 8, 20)])
    def test_triton_expand(dims):
        """The expanded form's kernel: a prompt from 0 over two query tiles and past a block of
        keys (unmasked and masked loops), a chunk mid-context, a one-token chunk, a chunk after
        exactly one block of keys, and padding tiles (-1); head widths that are not powers of two."""
        gen = torch.Generator().manual_seed(5)
        chunks = [(0, 70), (66, 5), (10, 1), (16, 16)]
        qn, qp, kn, kp, v, cu_q, cu_k = _expand_case(gen, 3, *dims, chunks)
        bm = 16
        tile_seq, tile_row = tile_plan(cu_q.numpy(), bm, size=max_tiles(int(cu_q[-1]), len(chunks), bm) + 2)
        ref = me.attention_torch(qn, qp, kn, kp, v, cu_q, cu_k, 0.3)
        for config in ((bm, 16, 4, 1), (bm, 32, 4, 2)):
            got = me.attention(qn, qp, kn, kp, v, cu_q, cu_k, torch.from_numpy(tile_seq), torch.from_numpy(tile_row),
                               0.3, use_triton=True, config=config)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# -- the DeepSeek stage on the graph routes (CUDA graphs' buffers and padding, eager on the CPU) --
@pytest.fixture(scope="module")
def ds_stage(tmp_path_factory):
    from stage_worker.loader import load_stage
    from tests.checkpoints import make_deepseek_checkpoint

    return load_stage(make_deepseek_checkpoint(tmp_path_factory.mktemp("mla"), "v3"), 0, 3)[0]


def _prefilled(stage, prompts, tables):
    from stage_worker.attention import AttnMetadata

    kv = stage.make_kv_cache(24, BS, scratch_blocks=1)
    meta = AttnMetadata.build([(0, len(p), t) for p, t in zip(prompts, tables)], BS, "cpu")
    stage(torch.tensor([x for p in prompts for x in p]), None, meta, kv)
    return kv


def test_deepseek_graph_routes_equal_the_plain_path(ds_stage):
    """DecodeGraphs (3 rows padded to 4) and MixedGraphs (a mid-prompt chunk, a fresh prompt and
    two decodes padded to 32 tokens) give the plain path's rows and latents; padding rows touch
    only the scratch block; a second run rewrites the same slots."""
    from stage_worker.attention import AttnMetadata
    from stage_worker.cuda_graphs import DecodeGraphs, MixedGraphs

    assert ds_stage.attention_tile_q == mp.tile_q(ds_stage.cfg.num_attention_heads)
    prompts = [[(5 * s + j) % 300 + 3 for j in range(6 + 3 * s)] for s in range(4)]
    tables = [[s + 4 * j for j in range(5)] for s in range(4)]
    decode = [(len(p), 1, t) for p, t in zip(prompts[:3], tables)]
    mixed = [(4, len(prompts[0]) - 4, tables[0]), (0, len(prompts[1]), tables[1]),
             (len(prompts[2]), 1, tables[2]), (len(prompts[3]), 1, tables[3])]
    steps = [(decode, [7, 8, 9], DecodeGraphs, dict(buckets=(1, 4))),
             (mixed, prompts[0][4:] + prompts[1] + [7, 9], MixedGraphs, dict(buckets=(8, 32), max_seqs=6))]
    for chunks, ids, cls, kw in steps:
        results = []
        for graphs in (False, True):
            kv = _prefilled(ds_stage, [p[:4] for p in prompts[:2]] + prompts[2:], tables)
            if graphs:
                g = cls(ds_stage, kv, BS, max_context=64, capture=False, **kw)
                out = g.run(chunks, ids, None)
                out = (out[0] if isinstance(out, tuple) else out).clone()
                again = g.run(chunks, ids, None)
                torch.testing.assert_close(again[0] if isinstance(again, tuple) else again, out)
            else:
                out = ds_stage(torch.tensor(ids), None, AttnMetadata.build(chunks, BS, "cpu"), kv)
            real = kv.num_blocks * BS
            results.append((out, [lat[:real].clone() for lat in kv.latents]))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
        for a, b in zip(results[1][1], results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
