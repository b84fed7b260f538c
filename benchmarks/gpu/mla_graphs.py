"""A DeepSeek stage's CUDA graphs in process: decode and mixed steps, eager against replayed.

Random weights drawn on the device into a DeepseekStage of the given config (no checkpoint),
contexts filled by eager prefills, then for each step shape: the eager forward (metadata built
per step, as the executor's eager route) and the captured graph's replay (DecodeGraphs /
MixedGraphs `run`: fill the static buffers, one copy, replay), their outputs compared and their
step times taken (median of CUDA-event timed steps). On CUDA, kernels/mla_rope's Triton path is
first compared with its torch reference on the stage's weights (`latent_kernel_check`). Off CUDA
the graphs run eagerly and the times are meaningless (a smoke test of this script).
"""

from __future__ import annotations

import time

import torch

from benchmarks.gpu.common import log
from stage_worker.attention import AttnMetadata
from stage_worker.cuda_graphs import DecodeGraphs, MixedGraphs
from stage_worker.kernels import mla_rope
from stage_worker.models.deepseek import DeepseekStage
from stagemesh.model_config import ModelConfig

BLOCK = 16


def _step_ms(fn, reps: int, cuda: bool) -> tuple[float, torch.Tensor]:
    out = fn()
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2], out


def _random_stage(raw: dict, device: str, layers: int) -> DeepseekStage:
    cfg = ModelConfig.from_dict({**raw, "num_hidden_layers": layers})
    stage = DeepseekStage(cfg, 0, layers, torch.bfloat16 if device != "cpu" else torch.float32, device)
    with torch.no_grad():
        for name, p in stage.named_parameters():
            if p.dtype.is_floating_point and p.dtype.itemsize > 1:
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
    return stage


@torch.inference_mode()
def latent_kernel_check(stage: DeepseekStage, tokens: int) -> dict:
    """kernels/mla_rope's Triton path against its torch reference on layer 0's attention weights, for
    `tokens` random rows: the largest difference of the latent queries and of the pool rows, and
    whether their rotary columns are bit-equal (they round as torch does)."""
    attn, d = next(iter(stage.layers.values())).self_attn, stage.dims
    r, dev, dt = d.kv_lora_rank, stage.inv_freq.device, stage.dtype
    gen = torch.Generator(device=dev).manual_seed(2)
    q = torch.randn(tokens, attn.n_heads, attn.qk_head_dim, device=dev, generator=gen).to(dt)
    kv = torch.randn(tokens, r + d.qk_rope_head_dim, device=dev, generator=gen).to(dt)
    cos, sin = stage.rotary(torch.arange(tokens, device=dev) * 37, dt)
    slots = torch.randperm(4 * tokens, device=dev, generator=gen)[:tokens]
    pools = [torch.zeros(4 * tokens, kv.shape[1], dtype=dt, device=dev) for _ in range(2)]
    ln = attn.kv_a_layernorm
    q_cats = [mla_rope.latent_query_and_cache(q, kv, attn._w_uk_uv()[0], cos, sin, ln.weight, ln.eps, pool, slots,
                                              d.rope_interleave, use_triton=triton) for pool, triton in
              zip(pools, (True, False))]
    return {"tokens": tokens, "q_max_abs_diff": float((q_cats[0].float() - q_cats[1].float()).abs().max()),
            "pool_max_abs_diff": float((pools[0].float() - pools[1].float()).abs().max()),
            "rope_bits_equal": bool(torch.equal(q_cats[0][..., r:], q_cats[1][..., r:])
                                    and torch.equal(pools[0][:, r:], pools[1][:, r:]))}


def run(raw: dict, device: str = "cuda:0", layers: int = 27, batch: int = 64, ctx: int = 512,
        prefill: tuple[int, int] = (4, 96), reps: int = 20) -> dict:
    """batch decode rows of context ~ctx; the mixed step: `prefill` = (chunks, tokens each) of fresh
    prompts beside the batch's decode rows."""
    cuda = device != "cpu"
    stage = _random_stage(raw, device, layers)
    n_pre, n_tok = prefill
    seqs = batch + n_pre
    per_seq = -(-(ctx + 64) // BLOCK)
    kv = stage.make_kv_cache(seqs * per_seq, BLOCK, scratch_blocks=1)
    tables = [list(range(s * per_seq, (s + 1) * per_seq)) for s in range(seqs)]
    gen = torch.Generator(device=device).manual_seed(0)
    vocab = stage.cfg.vocab_size
    for a in range(0, batch, 8):  # fill the decode rows' contexts, 8 prompts a step
        chunks = [(0, ctx - 1 - (s % 7), tables[s]) for s in range(a, min(batch, a + 8))]
        meta = AttnMetadata.build(chunks, BLOCK, device, tile_q=stage.attention_tile_q)
        ids = torch.randint(3, vocab, (sum(c[1] for c in chunks),), device=device, generator=gen)
        stage(ids, None, meta, kv)
    decode = [(ctx - 1 - (s % 7), 1, tables[s]) for s in range(batch)]
    mixed = [(0, n_tok, tables[batch + i]) for i in range(n_pre)] + decode
    res = {"layers": layers, "batch": batch, "ctx": ctx, "prefill": list(prefill)}
    if cuda:
        res["latent_kernel"] = [latent_kernel_check(stage, t) for t in (1, batch)]
        log(f"  kernels/mla_rope, Triton against torch: {res['latent_kernel']}")
    t0 = time.time()
    dg = DecodeGraphs(stage, kv, BLOCK, buckets=(1, batch), max_context=ctx + 64, capture=cuda if cuda else False)
    mg = MixedGraphs(stage, kv, BLOCK, buckets=(n_pre * n_tok + batch,), max_seqs=seqs, max_context=ctx + 64,
                     capture=cuda if cuda else False)
    res["capture_s"] = time.time() - t0
    for name, chunks, graphs in (("decode_b1", decode[:1], dg), (f"decode_b{batch}", decode, dg),
                                 ("mixed", mixed, mg)):
        t = sum(c[1] for c in chunks)
        ids_list = torch.randint(3, vocab, (t,), generator=torch.Generator().manual_seed(1)).tolist()
        ids = torch.tensor(ids_list, device=device)

        def eager():
            meta = AttnMetadata.build(chunks, BLOCK, device, tile_q=stage.attention_tile_q)
            return stage(ids, None, meta, kv)

        def replay():
            out = graphs.run(chunks, ids_list, None)
            return out[0] if isinstance(out, tuple) else out

        e_ms, e_out = _step_ms(eager, reps, cuda)
        g_ms, g_out = _step_ms(replay, reps, cuda)
        diff = float((e_out.float() - g_out.float()).abs().max())
        scale = float(e_out.float().abs().max())
        res[name] = {"tokens": t, "eager_ms": e_ms, "graph_ms": g_ms, "eager_over_graph": e_ms / g_ms,
                     "max_abs_diff": diff, "max_abs": scale}
        log(f"  {name}: {t} tokens, eager {e_ms:.2f} ms, graph {g_ms:.2f} ms ({e_ms / g_ms:.2f}x), "
            f"max |eager - graph| {diff:.3g} (max |out| {scale:.3g})")
        res[name]["equal"] = diff == 0.0
        if diff > 1e-3 * max(scale, 1e-6):
            log(f"  {name}: the graph's output differs from eager")
    return res
