"""MLA attention kernels on the GPU: correctness against float32 references, then timings against
the old eager path, at DeepSeek-V3 (128 heads) and V2-Lite (16 heads) widths (R 512 + Dr 64).

- decode: kernels/mla_decode (Triton, paged) vs the old path, `mla_decode_torch` (what
  MLAttention ran before: gather every context through the block tables, masked SDPA with a
  shared latent head); batch x context grid; GB/s counts the latent rows, queries and outputs
  once, TFLOP/s counts 2 * H * ctx * (576 + 512) per sequence. A block-shape sweep picks the
  Triton config per shape (the defaults in mla_decode.py come from it).
- CUDA graph: one decode call captured, replayed with other context lengths, equal to eager.
- mixed/prefill: kernels/mla_prefill (one launch, absorbed form, plus the q absorption and the
  W_UV product) vs the old per-sequence MHA-form path (gather the context, kv_b_proj up-projection
  to per-head K/V, SDPA), fresh prompts and chunks after a cached prefix.

Run through `python benchmarks/bench_deepseek_gpu.py --kernels --out DIR` (one device call).
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from benchmarks.gpu.common import log
from stage_worker.kernels import mla_decode as md
from stage_worker.kernels import mla_expand as me
from stage_worker.kernels import mla_prefill as mp
from stage_worker.kernels import tuning
from stage_worker.kernels.unified_attention import tile_plan

R, DR, DN, DV, BS = 512, 64, 128, 128, 64  # latent rank, rope, nope, v head dims; page size
SCALE = 192 ** -0.5
DECODE_CONFIGS = [dict(BLOCK_H=16, BLOCK_N=32, num_warps=4, num_stages=2),
                  dict(BLOCK_H=16, BLOCK_N=64, num_warps=4, num_stages=2),
                  dict(BLOCK_H=32, BLOCK_N=32, num_warps=8, num_stages=2),
                  dict(BLOCK_H=32, BLOCK_N=64, num_warps=8, num_stages=2),
                  dict(BLOCK_H=64, BLOCK_N=32, num_warps=8, num_stages=2),
                  dict(BLOCK_H=64, BLOCK_N=32, num_warps=16, num_stages=2),
                  dict(BLOCK_H=16, BLOCK_N=32, num_warps=4, num_stages=3),
                  dict(BLOCK_H=64, BLOCK_N=32, num_warps=8, num_stages=2, SPLIT_R=2),
                  dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=2, SPLIT_R=2),
                  dict(BLOCK_H=64, BLOCK_N=32, num_warps=4, num_stages=3, SPLIT_R=2),
                  dict(BLOCK_H=32, BLOCK_N=64, num_warps=4, num_stages=2, SPLIT_R=2)]
PREFILL_CONFIGS = [dict(BLOCK_H=16, BLOCK_M=32, num_warps=4, num_stages=2),
                   dict(BLOCK_H=16, BLOCK_M=64, num_warps=8, num_stages=2),
                   dict(BLOCK_H=16, BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2),
                   dict(BLOCK_H=64, BLOCK_M=64, num_warps=8, num_stages=2)]


def timed(fn, budget_s: float = 0.25, max_reps: int = 50) -> float:
    """Median ms of fn() over reps that fit the budget (CUDA events; one warm-up call first,
    whose time is returned alone when it took longer than the budget: the slow old path)."""
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    if time.perf_counter() - t0 > budget_s:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3
    times, t_end = [], time.perf_counter() + budget_s
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() < t_end):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def worst_row_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest relative error of one query row (all its heads): a few wrong rows show here."""
    diff = (out.float() - ref.float()).flatten(1).norm(dim=1)
    return float((diff / ref.float().flatten(1).norm(dim=1).clamp_min(1e-30)).max())


def _paged(batch: int, ctx: list[int], gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A pool holding every sequence's context in shuffled pages: (pool, block tables, lengths)."""
    pages = [-(-max(c, 1) // BS) for c in ctx]
    total = sum(pages)
    pool = torch.randn(total * BS + BS, R + DR, device="cuda", dtype=torch.bfloat16, generator=gen)
    perm = torch.randperm(total, device="cuda", generator=gen)
    width = max(pages)
    tables = torch.zeros(batch, width, dtype=torch.long, device="cuda")
    at = 0
    for i, p in enumerate(pages):
        tables[i, :p] = perm[at:at + p]
        at += p
    return pool, tables, torch.tensor(ctx, device="cuda")


def check_decode(gen) -> dict:
    """bf16 kernel vs the float32 reference on awkward lengths, 128 and 16 heads, 1 and 8 splits."""
    res = {}
    ctx = [0, 1, 63, 64, 65, 1000, 4097]
    for heads in (128, 16):
        pool, tables, lens = _paged(len(ctx), ctx, gen)
        q = torch.randn(len(ctx), heads, R + DR, device="cuda", dtype=torch.bfloat16, generator=gen)
        ref = md.mla_decode_torch(q.float(), pool.float(), tables, lens, SCALE, BS, R)
        for splits in (1, 8):
            out = md.mla_decode(q, pool, tables, lens, SCALE, BS, R, splits, use_triton=True)
            assert torch.isfinite(out).all() and not out[0].any(), "context 0 must give zeros"
            res[f"H{heads}_splits{splits}"] = err = rel_err(out, ref)
            assert err < 1e-2, f"decode H={heads} splits={splits}: rel err {err}"
    log(f"decode check (rel err vs fp32 reference): {res}")
    return res


def check_graph(gen) -> dict:
    """mla_decode captured once in a CUDA graph, replayed after the lengths change on the device."""
    pool, tables, lens = _paged(8, [2048] * 8, gen)
    q = torch.randn(8, 128, R + DR, device="cuda", dtype=torch.bfloat16, generator=gen)
    splits = md.num_splits(8, 128, torch.cuda.get_device_properties(0).multi_processor_count)
    md.mla_decode(q, pool, tables, lens, SCALE, BS, R, splits)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = md.mla_decode(q, pool, tables, lens, SCALE, BS, R, splits)
    errs = []
    for new in ([5, 0, 1, 2048, 700, 64, 129, 1999], [1] * 8):
        lens.copy_(torch.tensor(new, device="cuda"))
        graph.replay()
        eager = md.mla_decode(q, pool, tables, lens, SCALE, BS, R, splits)
        errs.append(float((out.float() - eager.float()).abs().max()))
    log(f"CUDA graph replay vs eager, max abs diff: {errs}")
    assert max(errs) == 0.0
    return {"graph_replay_max_abs_diff": errs}


def bench_decode(gen, heads: int, batches, ctxs, sweep: bool) -> list[dict]:
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for b in batches:
        for c in ctxs:
            pool, tables, lens = _paged(b, [c] * b, gen)
            q = torch.randn(b, heads, R + DR, device="cuda", dtype=torch.bfloat16, generator=gen)
            splits = md.num_splits(b, heads, sms, c)
            row = {"heads": heads, "batch": b, "ctx": c, "splits": splits,
                   "bytes": b * c * (R + DR) * 2 + b * heads * (R + DR + R) * 2,
                   "flops": 2.0 * b * heads * c * (R + DR + R)}
            for i, cfg in enumerate(DECODE_CONFIGS if sweep else DECODE_CONFIGS[:1]):
                sp = md.num_splits(b, heads, sms, c, cfg["BLOCK_H"])
                try:
                    row[f"new_ms_cfg{i}"] = timed(lambda: md.mla_decode(q, pool, tables, lens, SCALE, BS, R, sp,
                                                                         use_triton=True, config=cfg))
                except Exception as exc:  # a config past the shared memory of this GPU
                    row[f"new_ms_cfg{i}"] = None
                    log(f"  decode config {cfg}: {type(exc).__name__} {str(exc)[:120]}")
            best = min((v, k) for k, v in row.items() if k.startswith("new_ms_cfg") and v is not None)
            row["new_ms"], row["best_cfg"] = best[0], int(best[1][len("new_ms_cfg"):])
            try:
                row["old_ms"] = timed(lambda: md.mla_decode_torch(q, pool, tables, lens, SCALE, BS, R, c),
                                      budget_s=0.3, max_reps=5)
            except torch.OutOfMemoryError:
                row["old_ms"] = None
                torch.cuda.empty_cache()
            _rates(row)
            rows.append(row)
            log(f"  decode H={heads} B={b} ctx={c}: new {row['new_ms']:.3f} ms (cfg {row['best_cfg']}, "
                f"{row['new_GBps']:.0f} GB/s, {row['new_TFLOPs']:.0f} TFLOP/s) old "
                f"{row['old_ms'] if row['old_ms'] is None else round(row['old_ms'], 3)} ms, x{row.get('speedup')}")
            del pool, tables, q
    return rows


def _rates(row: dict) -> None:
    for k in ("new", "old"):
        ms = row.get(f"{k}_ms")
        if ms:
            row[f"{k}_GBps"] = row["bytes"] / ms / 1e6
            row[f"{k}_TFLOPs"] = row["flops"] / ms / 1e9
    if row.get("old_ms") and row.get("new_ms"):
        row["speedup"] = round(row["old_ms"] / row["new_ms"], 2)


def _old_prefill(q_nope, q_pe, pool, tables, starts, ns, w_kvb, heads):
    """The old per-sequence path (MLAttention._expanded over each chunk's gathered context)."""
    out, at = [], 0
    for s, n, table in zip(starts, ns, tables):
        ctx = s + n
        pos = torch.arange(ctx, device="cuda")
        lat = pool[table[pos // BS] * BS + pos % BS]  # [L, R + Dr]
        kv = (lat[:, :R] @ w_kvb.t()).view(ctx, heads, DN + DV)
        k = torch.cat([kv[..., :DN], lat[:, None, R:].expand(-1, heads, -1)], -1)
        q = torch.cat([q_nope[at:at + n], q_pe[at:at + n]], -1)
        mask = None if s == 0 else (pos[None, :] <= torch.arange(s, ctx, device="cuda")[:, None])[None, None]
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           kv[..., DN:].transpose(0, 1)[None], attn_mask=mask,
                                           is_causal=mask is None, scale=SCALE)
        out.append(o[0].transpose(0, 1))
        at += n
    return torch.cat(out)


def bench_prefill(gen, heads: int, cases) -> list[dict]:
    """cases: (name, [(cached tokens, new tokens)] per sequence)."""
    rows = []
    w_kvb = torch.randn(heads * (DN + DV), R, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.05
    w = w_kvb.view(heads, DN + DV, R)
    w_uk, w_uv = w[:, :DN], w[:, DN:]
    for name, chunks in cases:
        starts, ns = [s for s, _ in chunks], [n for _, n in chunks]
        pool, tables, lens = _paged(len(chunks), [s + n for s, n in chunks], gen)
        t = sum(ns)
        q_nope = torch.randn(t, heads, DN, device="cuda", dtype=torch.bfloat16, generator=gen)
        q_pe = torch.randn(t, heads, DR, device="cuda", dtype=torch.bfloat16, generator=gen)
        qsl = torch.tensor([0] + ns, device="cuda").cumsum(0)
        row = {"heads": heads, "case": name, "tokens": t,
               "attn_pairs": sum(n * s + n * (n + 1) // 2 for s, n in chunks)}

        def new(cfg, plan):
            q_lat = torch.einsum("thn,hnr->thr", q_nope, w_uk)
            q = torch.cat([q_lat, q_pe], -1)
            o = mp.mla_attention(q, pool, tables, lens, qsl, plan[0], plan[1], SCALE, BS, R, plan[2],
                                 use_triton=True, config=cfg)
            return torch.einsum("thr,hvr->thv", o, w_uv)

        ref = _old_prefill(q_nope.float(), q_pe.float(), pool.float(), tables, starts, ns, w_kvb.float(), heads)
        for i, cfg in enumerate(PREFILL_CONFIGS):
            bq = mp.tile_q(heads, cfg["BLOCK_H"], cfg["BLOCK_M"])
            ts, tr = tile_plan(qsl.cpu().numpy(), bq)
            plan = (torch.from_numpy(ts).cuda(), torch.from_numpy(tr).cuda(), bq)
            try:
                err = rel_err(new(cfg, plan), ref)
                assert err < 2e-2, f"prefill {name} H={heads} cfg {i}: rel err {err}"
                row[f"new_ms_cfg{i}"] = timed(lambda: new(cfg, plan))
                row[f"rel_err_cfg{i}"] = err
            except AssertionError:
                raise
            except Exception as exc:
                row[f"new_ms_cfg{i}"] = None
                log(f"  prefill config {cfg}: {type(exc).__name__} {str(exc)[:120]}")
        best = min((v, k) for k, v in row.items() if k.startswith("new_ms_cfg") and v is not None)
        row["new_ms"], row["best_cfg"] = best[0], int(best[1][len("new_ms_cfg"):])
        row["old_ms"] = timed(lambda: _old_prefill(q_nope, q_pe, pool, tables, starts, ns, w_kvb, heads),
                              budget_s=0.3, max_reps=10)
        row["speedup"] = round(row["old_ms"] / row["new_ms"], 2)
        # Absorbed-form attention FLOPs: 2 * H * pairs * (576 + 512), plus absorbing q and W_UV.
        row["new_TFLOPs"] = (2.0 * heads * row["attn_pairs"] * (R + DR + R) + 4.0 * t * heads * DN * R) / row["new_ms"] / 1e9
        rows.append(row)
        log(f"  prefill H={heads} {name}: new {row['new_ms']:.3f} ms (cfg {row['best_cfg']}, "
            f"{row['new_TFLOPs']:.0f} TFLOP/s absorbed-form) old {row['old_ms']:.3f} ms, x{row['speedup']}")
    return rows


EXPAND_CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3),
                  (128, 32, 8, 2), (128, 128, 8, 2), (64, 128, 4, 2)]
EXPAND_CASES = [("8 prompts x 512 from 0", [(0, 512)] * 8),
                ("4 prompts x 1024 from 0", [(0, 1024)] * 4),
                ("1 prompt x 2048 from 0", [(0, 2048)]),
                ("8 chunks of 256 after 1536 cached", [(1536, 256)] * 8),
                ("mixed: 2 chunks of 1024 + 64 decodes at 1000", [(0, 1024)] * 2 + [(1000, 1)] * 64),
                ("mixed workload step: 4096 tokens of prompts 64-1023", "mixed")]


def bench_expand(gen, heads: int, cases=EXPAND_CASES, min_tokens: int | None = None) -> list[dict]:
    """The micro-batch's attention with chunks of >= min_tokens (default: the tuning's
    mla_expand_min_tokens) in the expanded form
    (kernels/mla_expand.py: gather + kv_b_proj GEMM + the MHA kernel, other rows on the absorbed
    kernel) against all of it in the absorbed form (mla_prefill, its default tiles), both with
    the q absorption and W_UV product they need; outputs checked against the float32 per-sequence
    MHA path. A block-shape sweep of the MHA kernel."""
    import numpy as np
    import random

    rows = []
    min_tokens = tuning.active().mla_expand_min_tokens if min_tokens is None else min_tokens
    w_kvb = torch.randn(heads * (DN + DV), R, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.05
    w = w_kvb.view(heads, DN + DV, R)
    w_uk, w_uv = w[:, :DN], w[:, DN:]
    for name, chunks in cases:
        if chunks == "mixed":
            rng, chunks, t = random.Random(0), [], 0
            while t < 4096:
                n = min(rng.randrange(64, 1024), 4096 - t)
                chunks.append((0, n))
                t += n
        starts, ns = [s for s, _ in chunks], [n for _, n in chunks]
        pool, tables, lens = _paged(len(chunks), [s + n for s, n in chunks], gen)
        t = sum(ns)
        q_nope = torch.randn(t, heads, DN, device="cuda", dtype=torch.bfloat16, generator=gen)
        q_pe = torch.randn(t, heads, DR, device="cuda", dtype=torch.bfloat16, generator=gen)
        qsl_np = np.array([0] + ns).cumsum()
        qsl = torch.from_numpy(qsl_np).cuda()
        bq = mp.tile_q(heads)
        ts, tr = tile_plan(qsl_np, bq)
        chosen = me.choose(np.array(ns), np.array(starts) + np.array(ns), min_tokens)
        keep = ~np.isin(ts, chosen)
        rest = (torch.from_numpy(ts[keep]).cuda(), torch.from_numpy(tr[keep]).cuda())
        every = (torch.from_numpy(ts).cuda(), torch.from_numpy(tr).cuda())
        pairs = sum(n * s + n * (n + 1) // 2 for s, n in chunks)
        row = {"heads": heads, "case": name, "tokens": t, "attn_pairs": pairs, "expanded_chunks": int(chosen.size)}

        def absorbed(plan):
            q = torch.cat([torch.einsum("thn,hnr->thr", q_nope, w_uk), q_pe], -1)
            o = mp.mla_attention(q, pool, tables, lens, qsl, plan[0], plan[1], SCALE, BS, R, bq, use_triton=True)
            return q, torch.einsum("thr,hvr->thv", o, w_uv)

        def expanded(cfg, parts):  # the model forms every row's latent query (q_cat) either way
            q, out = absorbed(rest) if keep.any() else (torch.cat([torch.einsum("thn,hnr->thr", q_nope, w_uk), q_pe], -1), None)
            e_rows, slots, cu_q, cu_k, e_ts, e_tr = parts
            k_nope, k_pe, v = me.expand_context(pool, slots, w_kvb, heads, R, DN)
            o = me.attention(q_nope[e_rows], q[e_rows][..., -DR:], k_nope, k_pe, v, cu_q, cu_k, e_ts, e_tr, SCALE,
                             use_triton=True, config=cfg)
            if out is None:
                return o
            out[e_rows] = o
            return out

        ref = _old_prefill(q_nope.float(), q_pe.float(), pool.float(), tables, starts, ns, w_kvb.float(), heads)
        row["absorbed_ms"] = timed(lambda: absorbed(every))
        row["absorbed_rel_err"] = rel_err(absorbed(every)[1], ref)
        tab_np = tables.cpu().numpy()
        for i, cfg in enumerate(EXPAND_CONFIGS):
            me_cfg = me.CONFIG
            try:
                me.CONFIG = cfg  # plan_arrays tiles by CONFIG's BLOCK_M
                arrs = me.plan_arrays(chosen, qsl_np, lens.cpu().numpy(), tab_np, BS)
                parts = [torch.from_numpy(a).cuda() for a in arrs]
                got = expanded(cfg, parts)
                err, worst = rel_err(got, ref), worst_row_err(got, ref)
                assert err < 2e-2 and worst < 5e-2, f"expand {name} H={heads} cfg {cfg}: rel err {err}, row {worst}"
                row[f"expanded_worst_row_err_cfg{i}"] = worst
                row[f"expanded_ms_cfg{i}"] = timed(lambda: expanded(cfg, parts))
                row[f"expanded_rel_err_cfg{i}"] = err
            except AssertionError:
                raise
            except Exception as exc:
                row[f"expanded_ms_cfg{i}"] = None
                log(f"  expand config {cfg}: {type(exc).__name__} {str(exc)[:160]}")
            finally:
                me.CONFIG = me_cfg
        found = [(v, k) for k, v in row.items() if k.startswith("expanded_ms_cfg") and v is not None]
        if found:
            best = min(found)
            row["expanded_ms"], row["best_cfg"] = best[0], EXPAND_CONFIGS[int(best[1][len("expanded_ms_cfg"):])]
            row["speedup"] = round(row["absorbed_ms"] / row["expanded_ms"], 2)
            default = row.get(f"expanded_ms_cfg{EXPAND_CONFIGS.index(me.CONFIG)}")
            row["default_cfg_speedup"] = round(row["absorbed_ms"] / default, 2) if default else None
        rows.append(row)
        log(f"  expand H={heads} {name}: absorbed {row['absorbed_ms']:.3f} ms, expanded {row.get('expanded_ms')} ms "
            f"(cfg {row.get('best_cfg')}), x{row.get('speedup')} (default cfg x{row.get('default_cfg_speedup')}), "
            f"{int(chosen.size)}/{len(chunks)} chunks expanded")
    return rows


def run(out_dir, quick: bool = False) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    import triton

    res["triton"] = triton.__version__
    t0 = time.time()
    res["check_decode"] = check_decode(gen)
    res["check_graph"] = check_graph(gen)
    res["decode_v3"] = bench_decode(gen, 128, (1, 32, 128, 256), (512, 2048, 8192), sweep=not quick)
    res["decode_v2lite"] = bench_decode(gen, 16, (1, 32, 128, 256), (512, 2048), sweep=False)
    cases = [("8 prompts x 512 from 0", [(0, 512)] * 8),
             ("8 chunks of 256 after 1536 cached", [(1536, 256)] * 8),
             ("mixed: 2 chunks of 1024 + 64 decodes at 1000", [(0, 1024)] * 2 + [(1000, 1)] * 64)]
    res["prefill_v3"] = bench_prefill(gen, 128, cases)
    res["prefill_v2lite"] = bench_prefill(gen, 16, cases)
    res["kernels_s"] = time.time() - t0
    torch.cuda.empty_cache()  # the mesh's worker (another process) runs next on this GPU
    (out_dir / "mla_kernels.json").write_text(json.dumps(res, indent=1))
    print(table(res), flush=True)
    return res


def table(res: dict) -> str:
    lines = [f"MLA kernels on {res['device']} (torch {res['torch']}, triton {res['triton']}); bf16, R 512 + Dr 64, "
             f"page {BS}", "decode: heads batch ctx | new ms (cfg) GB/s TFLOP/s | old ms | old/new"]
    for r in res["decode_v3"] + res["decode_v2lite"]:
        old = f"{r['old_ms']:.3f}" if r.get("old_ms") else "OOM"
        lines.append(f"  {r['heads']:3d} {r['batch']:4d} {r['ctx']:5d} | {r['new_ms']:.3f} ({r['best_cfg']}) "
                     f"{r['new_GBps']:.0f} {r['new_TFLOPs']:.0f} | {old} | {r.get('speedup', '-')}")
    lines.append("prefill/mixed: heads case | new ms (cfg) TFLOP/s | old per-sequence MHA ms | old/new")
    for r in res["prefill_v3"] + res["prefill_v2lite"]:
        lines.append(f"  {r['heads']:3d} {r['case']} | {r['new_ms']:.3f} ({r['best_cfg']}) {r['new_TFLOPs']:.0f} | "
                     f"{r['old_ms']:.3f} | {r['speedup']}")
    return "\n".join(lines)


if __name__ == "__main__":  # the expanded form alone: python -m benchmarks.gpu.mla_kernels --out DIR
    import argparse
    from pathlib import Path

    ap = argparse.ArgumentParser(description="MLA prefill: the expanded form against the absorbed kernel")
    ap.add_argument("--out", required=True, help="directory for mla_expand.json")
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    res = {"device": torch.cuda.get_device_name(0), "expand_v3": bench_expand(g, 128)}
    (out / "mla_expand.json").write_text(json.dumps(res, indent=1))
    res["expand_v2lite"] = bench_expand(g, 16)
    (out / "mla_expand.json").write_text(json.dumps(res, indent=1))
