"""transformers on the same checkpoint: `generate` (dynamic cache; static cache with compiled
decode) for TTFT and batch-1 decode, and continuous batching (`generate_batch`, `paged|sdpa`) on
the mixed workload."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from benchmarks.gpu.common import Vocab, log, mixed_workload, rand_prompt


def bench_reference(model_dir: Path, quick: bool, vocab: Vocab = Vocab()) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    res = {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                 device_map="cuda:0").eval()

    def gen(prompt_len, new, cache=None, seed=0):
        ids = torch.tensor([rand_prompt(prompt_len, seed, vocab)], device="cuda")
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        if cache:
            kw["cache_implementation"] = cache
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    for name, cache, new in (("hf_dynamic", None, 32), ("hf_static", "static", 128)):
        try:
            log(f"{name}: warm-up / compile")
            gen(512, new, cache)  # the static cache compiles its decode step for this shape here
            ttft = {p: statistics.median([gen(p, 1, cache, seed=s) for s in range(3)]) for p in (512, 2048)}
            full = statistics.median([gen(512, new, cache, seed=s) for s in range(2)])
            r = {"ttft_512_ms": ttft[512] * 1e3, "ttft_2048_ms": ttft[2048] * 1e3,
                 "decode_b1_tok_s": (new - 1) / (full - ttft[512])}
            res[name] = r
            log(f"  {name}: {r}")
        except Exception as exc:
            log(f"  {name} FAILED: {exc!r}")
            res[name] = {"error": repr(exc)}
    del model
    torch.cuda.empty_cache()
    try:
        res["hf_generate_batch"] = generate_batch(model_dir, quick, vocab)
    except Exception as exc:
        log(f"  generate_batch FAILED: {exc!r}")
        res["hf_generate_batch"] = {"error": repr(exc)}
    return res


def _load_paged(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    for impl in ("paged|sdpa", "sdpa_paged"):  # the name changed between transformers versions
        try:
            return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation=impl,
                                                        device_map="cuda:0").eval()
        except Exception as exc:
            log(f"  attn_implementation={impl!r}: {exc!r}")
    return None


def generate_batch(model_dir: Path, quick: bool, vocab: Vocab = Vocab()) -> dict:
    """The mixed workload through continuous batching: the manager API (per-request
    max_new_tokens), or generate_batch with the mean output length if that API fails."""
    import torch
    from transformers import GenerationConfig

    model = _load_paged(model_dir)
    work = mixed_workload(64 if quick else 256, vocab=vocab)
    # Random weights: EOS (1 id in 128k) is rarely drawn; the tokens actually generated are counted.
    cfg = GenerationConfig(max_new_tokens=256, do_sample=False, pad_token_id=0)
    model.generate_batch(inputs=[rand_prompt(200, 7, vocab)] * 4, generation_config=cfg, max_new_tokens=8)
    mode = "per-request max_new_tokens (manager API)"
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        manager = model.init_continuous_batching(generation_config=cfg)
        manager.start()
        ids = [manager.add_request(p, max_new_tokens=o) for p, o in work]
        got = 0
        for _ in ids:
            r = manager.get_result(timeout=900)
            got += len(getattr(r, "generated_tokens", None) or []) if r is not None else 0
        wall = time.perf_counter() - t0
        try:
            manager.stop(block=True)
        except Exception as exc:
            log(f"  manager.stop: {exc!r}")
    except Exception as exc:
        log(f"  manager API failed ({exc!r}); generate_batch with the mean output length")
        mode = "generate_batch, max_new_tokens = mean of the mixed outputs"
        mean = round(sum(o for _, o in work) / len(work))
        t0 = time.perf_counter()
        outs = model.generate_batch(inputs=[p for p, _ in work], generation_config=cfg, max_new_tokens=mean)
        got = sum(len(o.generated_tokens) for o in outs.values())
        wall = time.perf_counter() - t0
    r = {"mixed_tok_s": got / wall, "mixed_output_tokens": got, "mixed_wall_s": wall, "mode": mode}
    log(f"  generate_batch mixed: {r}")
    return r
