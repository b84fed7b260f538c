"""GPU benchmark (issue 7): stagemesh vs transformers on a DeepSeek-V2-Lite-shaped model, "mixed" workload.

Runs on the device machine in ONE call (no hub access there):

1. writes a DeepSeek-V2-Lite-shaped checkpoint (transformers' DeepseekV2Config with the public V2-Lite
   values: 27 layers, hidden 2048, MLA with kv_lora_rank 512, 64 routed + 2 shared experts, top-6,
   YaRN x40) of random bf16 weights drawn on the GPU (std 0.02), as sharded safetensors, to /tmp;
2. `stagemesh up --stages 1 --device cuda:0` on it, driven by the gRPC AsyncClient: the mixed workload
   of BENCHMARKS.md (prompts uniform [64, 1024), outputs uniform [32, 256), all at once, EOS ignored,
   seed 0) at each size in --sizes (mixed_workload(64) is the first 64 requests of mixed_workload(256));
3. transformers, in a child process with a hard timeout (what it finished is kept):
   a. `generate_batch` (continuous batching, paged attention) probed on two prompts; if it works, the
      mixed workload through the manager API (per-request max_new_tokens);
   b. `generate` with static batches of --hf-batch requests in submission order (left padding,
      dynamic cache, min_new_tokens = max_new_tokens = the longest output of the batch); only the
      tokens each request asked for are counted (the rest is static batching's waste).

Everything runs against a deadline (--deadline-s from the start of the script); results are written
to OUT/bench_deepseek_gpu.json after every step, and the table is printed last.

    python benchmarks/bench_deepseek_gpu.py --out $OUT
    python benchmarks/bench_deepseek_gpu.py --kernels --skip stagemesh,reference --out $OUT  # MLA kernels only

--graphs runs benchmarks/gpu/mla_graphs.py (a V2-Lite-shaped stage in process: decode and mixed
steps eager vs replayed from their CUDA graphs, outputs compared). --kernels first runs benchmarks/gpu/mla_kernels.py: the MLA decode and mixed-batch kernels
checked against float32 references on the GPU (and a CUDA-graph replay), then timed against the
old eager path (gather + SDPA decode, per-sequence MHA-form prefill) at V3 (128 heads) and
V2-Lite (16 heads) widths; OUT/mla_kernels.json and a table.
    python benchmarks/bench_deepseek_gpu.py --tiny --mesh-device cpu --out /tmp/ds  # CPU smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu import probes  # noqa: E402
from benchmarks.gpu.checkpoint import ShardWriter  # noqa: E402
from benchmarks.gpu.common import Vocab, log, mixed_workload, rand_prompt  # noqa: E402
from benchmarks.gpu.mesh import start_mesh  # noqa: E402

T0 = time.time()


# -- checkpoint ------------------------------------------------------------------------------------
def v2_lite_config(tiny: bool = False):
    """DeepSeek-V2-Lite's public config.json values (greedy routing, n_group = topk_group = 1)."""
    from transformers import DeepseekV2Config

    kw = dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512,
        q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
        moe_layer_freq=1, n_group=1, topk_group=1, topk_method="greedy", norm_topk_prob=False,
        routed_scaling_factor=1.0, max_position_embeddings=163840, rms_norm_eps=1e-6,
        bos_token_id=100000, eos_token_id=100001, tie_word_embeddings=False, attention_bias=False,
        hidden_act="silu", initializer_range=0.02,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 4096, "mscale": 0.707,
                         "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1},
    )
    if tiny:  # same structure, CPU-sized (smoke test of this script only)
        kw.update(vocab_size=2048, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64,
                  qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8,
                  num_experts_per_tok=2, bos_token_id=1, eos_token_id=2)
    cfg = DeepseekV2Config(**kw)
    cfg.torch_dtype = "bfloat16"
    return cfg


def write_checkpoint(path: Path, tiny: bool) -> Path:
    """Random bf16 weights (std 0.02; norms 1 + N(0, 0.05)) drawn on the GPU, sharded safetensors + index."""
    if (path / "config.json").is_file():
        return path
    t0 = time.time()
    path.mkdir(parents=True, exist_ok=True)
    cfg = v2_lite_config(tiny)
    cfg.save_pretrained(path)
    h, v, nh = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    w = ShardWriter(path)
    w["model.embed_tokens.weight"] = w.rnd(v, h)
    w.flush("model-embed.safetensors")
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = w.norm(h)
        w[p + "post_attention_layernorm.weight"] = w.norm(h)
        a = p + "self_attn."
        w[a + "q_proj.weight"] = w.rnd(nh * qk, h)
        w[a + "kv_a_proj_with_mqa.weight"] = w.rnd(cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)
        w[a + "kv_a_layernorm.weight"] = w.norm(cfg.kv_lora_rank)
        w[a + "kv_b_proj.weight"] = w.rnd(nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        w[a + "o_proj.weight"] = w.rnd(h, nh * cfg.v_head_dim)
        _mlp(w, cfg, layer, p + "mlp.")
        if layer % 2 == 1 or layer == cfg.num_hidden_layers - 1:
            w.flush(f"model-layers-{layer // 2:02d}.safetensors")
    w["model.norm.weight"] = w.norm(h)
    w["lm_head.weight"] = w.rnd(v, h)
    w.flush("model-head.safetensors")
    w.close()
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    log(f"checkpoint: {len(w.weight_map)} tensors, {size / 1e9:.2f} GB, written to {path} in {time.time() - t0:.1f}s")
    return path


def _mlp(w: ShardWriter, cfg, layer: int, m: str) -> None:
    """A dense MLP on the first layers, routed + shared experts after."""
    h = cfg.hidden_size
    if layer < cfg.first_k_dense_replace:
        i = cfg.intermediate_size
        w[m + "gate_proj.weight"], w[m + "up_proj.weight"] = w.rnd(i, h), w.rnd(i, h)
        w[m + "down_proj.weight"] = w.rnd(h, i)
        return
    i = cfg.moe_intermediate_size
    w[m + "gate.weight"] = w.rnd(cfg.n_routed_experts, h)
    for e in range(cfg.n_routed_experts):
        x = f"{m}experts.{e}."
        w[x + "gate_proj.weight"], w[x + "up_proj.weight"] = w.rnd(i, h), w.rnd(i, h)
        w[x + "down_proj.weight"] = w.rnd(h, i)
    si = i * cfg.n_shared_experts
    w[m + "shared_experts.gate_proj.weight"] = w.rnd(si, h)
    w[m + "shared_experts.up_proj.weight"] = w.rnd(si, h)
    w[m + "shared_experts.down_proj.weight"] = w.rnd(h, si)


# -- stagemesh ------------------------------------------------------------------------------------
async def _mesh_mixed(target, sizes, deadline, res, vocab: Vocab):
    from stagemesh.client import AsyncClient

    async with AsyncClient(target) as client:
        t0 = time.perf_counter()
        for _ in range(2):  # warm-up: prefill shapes, decode batch shapes, sampler
            await asyncio.gather(*[client.generate(prompt_ids=rand_prompt(300 + 50 * k, 100 + k, vocab), max_tokens=16,
                                                   ignore_eos=True, timeout=600) for k in range(8)])
        log(f"  warm-up {time.perf_counter() - t0:.1f}s")
        for n in sizes:
            if time.time() > deadline:
                log(f"  mixed {n}: skipped (deadline)")
                break
            work = mixed_workload(n, vocab=vocab)
            smi = probes.start_util_sampler()
            count = [0]  # output tokens streamed so far, finished requests or not

            async def one(p, o):
                got = 0
                async for msg in client.stream(timeout=max(30, deadline - time.time() + 60), prompt_ids=p,
                                               max_tokens=o, ignore_eos=True):
                    got += len(msg.token_ids)
                    count[0] += len(msg.token_ids)
                return got

            t0 = time.perf_counter()
            tasks = [asyncio.ensure_future(one(p, o)) for p, o in work]
            pending = set(tasks)
            while pending and time.time() < deadline:
                _, pending = await asyncio.wait(pending, timeout=min(20.0, max(0.1, deadline - time.time())))
                log(f"  mixed {n}: {time.perf_counter() - t0:.0f}s, {len(tasks) - len(pending)}/{n} done, "
                    f"{count[0]} tokens streamed")
            wall = time.perf_counter() - t0
            util = probes.stop_util_sampler(smi)
            if pending:  # deadline: keep the partial rate (tokens streamed so far / time)
                for t in pending:
                    t.cancel()
                res[f"partial_mixed_{n}"] = {"wall_s": wall, "output_tokens_streamed": count[0],
                                             "requests_done": n - len(pending), "output_tok_s": count[0] / wall,
                                             "gpu_util_pct": util}
                log(f"  mixed {n} cut at the deadline: {res[f'partial_mixed_{n}']}")
                break
            gots = [t.result() for t in tasks]
            gen = sum(gots)
            assert all(g == w[1] for g, w in zip(gots, work)), "a request stopped early"
            res[f"mixed_{n}"] = {"wall_s": wall, "output_tokens": gen, "output_tok_s": gen / wall,
                                 "total_tok_s": (gen + sum(len(p) for p, _ in work)) / wall, "gpu_util_pct": util}
            log(f"  mixed {n}: {gen} tokens in {wall:.1f}s = {gen / wall:.0f} tok/s (GPU busy {util}%)")


def bench_stagemesh(model_dir, sizes, kv_bytes, mbt, out_dir, device, deadline, save) -> dict:
    res = {"max_batched_tokens": mbt, "kv_cache_bytes": kv_bytes, "stages": 1}
    mesh = start_mesh(model_dir, 1, 52000, kv_bytes, mbt, out_dir / "mesh_deepseek.log", device)
    try:
        up = mesh.wait_ready(max(60, deadline - time.time()))
        res["startup_s"] = up
        log(f"stagemesh ready after {up:.0f}s")
        asyncio.run(asyncio.wait_for(_mesh_mixed(mesh.address, sizes, deadline, res, Vocab.of(model_dir)),
                                     timeout=max(60, deadline - time.time() + 90)))
    except BaseException as exc:  # keep what finished, and the reference still runs
        log(f"  stagemesh FAILED: {exc!r}")
        res["error"] = repr(exc)
    finally:
        mesh.stop(60)
    return res


# -- transformers (child process) -----------------------------------------------------------------
def hf_child(model_dir: Path, sizes: list[int], batch: int, result_path: Path, probe_only_cb: bool):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    vocab = Vocab.of(model_dir)
    cuda = torch.cuda.is_available()
    dev = "cuda:0" if cuda else "cpu"
    res = {}

    def save():
        result_path.write_text(json.dumps(res, indent=1))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="paged|sdpa",
                                                 device_map=dev if cuda else None).eval()
    res["load_s"] = time.time() - t0
    log(f"[hf] loaded in {res['load_s']:.0f}s; experts implementation: "
        f"{getattr(model.config, '_experts_implementation', None)}")
    save()
    # a. generate_batch probe: two prompts, a small paged cache.
    cfg = GenerationConfig(max_new_tokens=256, do_sample=False, pad_token_id=0, eos_token_id=None,
                           num_blocks=256, max_batch_tokens=512)
    import logging

    errors = []

    class _Keep(logging.Handler):  # continuous batching logs a failed request instead of raising
        def emit(self, record):
            if record.levelno >= logging.ERROR:
                exc = record.exc_info[1] if record.exc_info else None
                errors.append(f"{record.getMessage()} {exc!r}"[:300])

    for name in ("ContinuousBatchingLogger", "transformers"):
        logging.getLogger(name).addHandler(_Keep())
    probe = {}
    try:
        outs = model.generate_batch(inputs=[rand_prompt(200, 7, vocab), rand_prompt(100, 8, vocab)],
                                    generation_config=cfg, max_new_tokens=8)
        got = [len(o.generated_tokens) for o in outs.values()]
        probe = {"generated": got, "ok": got == [8, 8]}
    except Exception as exc:
        probe = {"ok": False, "error": repr(exc)[:400]}
    if errors:
        probe["logged_errors"] = errors[:3]
    res["generate_batch_probe"] = probe
    log(f"[hf] generate_batch probe: {probe}")
    save()
    if probe.get("ok"):
        for n in sizes:
            work = mixed_workload(n, vocab=vocab)
            cfg = GenerationConfig(max_new_tokens=256, do_sample=False, pad_token_id=0)
            sync()
            t0 = time.perf_counter()
            manager = model.init_continuous_batching(generation_config=cfg)
            manager.start()
            for p, o in work:
                manager.add_request(p, max_new_tokens=o)
            got = 0
            for _ in work:
                r = manager.get_result(timeout=900)
                got += len(getattr(r, "generated_tokens", None) or []) if r is not None else 0
            wall = time.perf_counter() - t0
            manager.stop(block=True)
            res[f"generate_batch_mixed_{n}"] = {"wall_s": wall, "output_tokens": got, "output_tok_s": got / wall}
            log(f"[hf] generate_batch mixed {n}: {res[f'generate_batch_mixed_{n}']}")
            save()
        if probe_only_cb:
            return
    # b. generate, static batches in submission order.
    import gc

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    try:
        model.set_attn_implementation("sdpa")
    except Exception as exc:
        log(f"[hf] set_attn_implementation('sdpa') failed ({exc!r}); reloading")
        del model
        gc.collect()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                     device_map=dev if cuda else None).eval()
    work = mixed_workload(max(sizes), vocab=vocab)

    def run_batch(reqs):
        plen = max(len(p) for p, _ in reqs)
        ids = torch.zeros(len(reqs), plen, dtype=torch.long)
        mask = torch.zeros(len(reqs), plen, dtype=torch.long)
        for r, (p, _) in enumerate(reqs):
            ids[r, plen - len(p):] = torch.tensor(p)
            mask[r, plen - len(p):] = 1
        new = max(o for _, o in reqs)
        sync()
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0)
        sync()
        assert out.shape[1] == plen + new
        return time.perf_counter() - t0

    run_batch([(rand_prompt(128, 9, vocab), 4)] * 2)  # warm-up
    walls = []
    for b in range(0, len(work), batch):
        reqs = work[b:b + batch]
        walls.append(run_batch(reqs))
        done = b + len(reqs)
        log(f"[hf] generate static batch {b // batch}: {len(reqs)} requests in {walls[-1]:.1f}s")
        if done in sizes:
            gen = sum(o for _, o in work[:done])
            res[f"generate_static_mixed_{done}"] = {"wall_s": sum(walls), "output_tokens": gen,
                                                    "output_tok_s": gen / sum(walls), "batch": batch,
                                                    "batch_walls_s": list(walls)}
            save()


def bench_reference(model_dir, sizes, batch, out_dir, deadline) -> dict:
    """The transformers side in a child process (GPU memory is returned when it ends); killed at the deadline."""
    result = out_dir / "hf_result.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--hf-child", "--model-dir", str(model_dir), "--sizes",
           ",".join(map(str, sizes)), "--hf-batch", str(batch), "--hf-result", str(result)]
    timeout = max(10, deadline - time.time())
    log(f"transformers child: timeout {timeout:.0f}s")
    status = "finished"
    try:
        p = subprocess.run(cmd, cwd=ROOT, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if p.returncode:
            status = f"exited with rc={p.returncode}"
    except subprocess.TimeoutExpired:
        status = f"killed at the deadline after {timeout:.0f}s"
    log(f"transformers child {status}")
    res = json.loads(result.read_text()) if result.is_file() else {}
    res["status"] = status
    return res


# -- table --------------------------------------------------------------------------------------------
def table(res: dict) -> str:
    sm, hf = res.get("stagemesh", {}), res.get("transformers", {})
    lines = [f"device: {res.get('device')}; model: DeepSeek-V2-Lite shape, random bf16 weights; "
             f"mixed workload, EOS ignored, seed 0",
             "requests | system                                      | output tok | wall s | output tok/s | x ref"]
    sizes = sorted({int(k.rsplit("_", 1)[1]) for d in (sm, hf) for k in d if k.rsplit("_", 1)[-1].isdigit()})
    for n in sizes:
        ref = hf.get(f"generate_batch_mixed_{n}") or hf.get(f"generate_static_mixed_{n}")
        for name, r in ((f"stagemesh 1 stage, mbt {sm.get('max_batched_tokens')}", sm.get(f"mixed_{n}")),
                        ("transformers generate_batch (paged|sdpa)", hf.get(f"generate_batch_mixed_{n}")),
                        (f"transformers generate, static batches of {hf.get(f'generate_static_mixed_{n}', {}).get('batch')}",
                         hf.get(f"generate_static_mixed_{n}"))):
            if not r:
                continue
            x = f"{r['output_tok_s'] / ref['output_tok_s']:.2f}x" if ref else "-"
            lines.append(f"{n:8d} | {name:43s} | {r['output_tokens']:10d} | {r['wall_s']:6.1f} | "
                         f"{r['output_tok_s']:12.0f} | {x}")
    probe = hf.get("generate_batch_probe")
    if probe is not None:
        lines.append(f"generate_batch probe: {probe}")
    for k in ("error",):
        if k in sm:
            lines.append(f"stagemesh error: {sm[k]}")
    lines.append(f"transformers child: {hf.get('status')}; stagemesh startup {sm.get('startup_s', 0):.0f}s")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/deepseek-v2-lite-random")
    ap.add_argument("--sizes", default="64,256", help="mixed workload sizes, run in this order")
    ap.add_argument("--kv-cache-bytes", type=int, default=12 * 2**30)
    ap.add_argument("--max-batched-tokens", type=int, default=4096)
    ap.add_argument("--hf-batch", type=int, default=64, help="requests per static batch of transformers generate")
    ap.add_argument("--deadline-s", type=float, default=540, help="from the script's start")
    ap.add_argument("--mesh-share", type=float, default=0.45,
                    help="share of the time left after the checkpoint given to stagemesh")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--tiny", action="store_true", help="CPU-sized config (smoke test)")
    ap.add_argument("--mesh-device", default="cuda:0")
    ap.add_argument("--kernels", action="store_true", help="MLA kernel checks and timings first")
    ap.add_argument("--quick-kernels", action="store_true", help="no block-shape sweep")
    ap.add_argument("--graphs", action="store_true",
                    help="a V2-Lite-shaped stage in process (random weights): eager vs CUDA-graph steps")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: stagemesh,reference")
    ap.add_argument("--hf-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--hf-result", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    model_dir = Path(args.model_dir)
    if args.hf_child:
        hf_child(model_dir, sizes, args.hf_batch, Path(args.hf_result), probe_only_cb=True)
        return
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = T0 + args.deadline_s
    res = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke test only)",
           "torch": torch.__version__, "config": vars(args)}
    import transformers

    res["transformers"] = {}
    res["transformers_version"] = transformers.__version__

    def save():
        (out / "bench_deepseek_gpu.json").write_text(json.dumps(res, indent=1))

    skip = args.skip.split(",")
    if args.kernels:
        from benchmarks.gpu import mla_kernels

        res["mla_kernels_table"] = mla_kernels.table(mla_kernels.run(out, quick=args.quick_kernels)).splitlines()
        save()
    if args.graphs:
        from benchmarks.gpu import mla_graphs

        raw = v2_lite_config(args.tiny).to_dict()
        res["graphs"] = mla_graphs.run(raw, "cpu" if args.tiny else "cuda:0", layers=3 if args.tiny else 27,
                                       batch=8 if args.tiny else 64, ctx=40 if args.tiny else 512,
                                       prefill=(2, 12) if args.tiny else (4, 96), reps=3 if args.tiny else 20)
        save()
    if args.kernels or args.graphs:
        if "stagemesh" in skip and "reference" in skip:
            return
    model_dir = write_checkpoint(model_dir, args.tiny)
    res["checkpoint_s"] = time.time() - T0
    res["checkpoint_gb"] = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e9
    mcfg = json.loads((model_dir / "config.json").read_text())
    res["model_config"] = {k: mcfg.get(k) for k in (
        "num_hidden_layers", "hidden_size", "num_attention_heads", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim",
        "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
        "moe_intermediate_size", "intermediate_size", "first_k_dense_replace", "vocab_size", "rope_parameters",
        "rope_scaling", "topk_method", "n_group", "topk_group")}
    save()
    if "stagemesh" not in skip:
        mesh_deadline = time.time() + (deadline - time.time()) * args.mesh_share
        res["stagemesh"] = bench_stagemesh(model_dir, sizes, args.kv_cache_bytes, args.max_batched_tokens, out,
                                           args.mesh_device, mesh_deadline, save)
        save()
        # The reference runs only the sizes stagemesh finished (the ratio needs both).
        done = [n for n in sizes if f"mixed_{n}" in res["stagemesh"]]
        sizes = done or sizes[:1]
    if "reference" not in skip:
        res["transformers"] = bench_reference(model_dir, sizes, args.hf_batch, out, deadline)
        save()
    text = table(res)
    (out / "table.txt").write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
