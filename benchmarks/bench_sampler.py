"""The last stage's sampler: batched tensor ops over the micro-batch against a loop per row.

Two workloads on the same logits ([rows, vocab], float32, on --device):
  - draw: temperature + top-k + top-p, seeded (what every sampled row did before issue 19).
    Reference: the sampler as it was (per row: filter on the CPU, softmax, one seeded draw).
  - penalties: greedy with repetition 1.2 + frequency 0.5 + presence 0.5 + a 20-entry logit_bias,
    histories of --history tokens. Reference: transformers' RepetitionPenaltyLogitsProcessor and
    SequenceBiasLogitsProcessor plus vLLM's frequency/presence formula, one row at a time.
Both sides give the same tokens (checked); printed: ms per micro-batch and the ratio reference / ours.
The batching is for the GPU (a dozen kernel launches per micro-batch instead of a dozen per row);
on a CPU it can only hope to match the loop, whose rows stay in cache: run it with the torch
threads a CPU worker gets (`--threads`; `up` gives each worker cores / workers).

    python benchmarks/bench_sampler.py [--rows 64] [--vocab 32000] [--history 512] [--device cpu]
        [--threads 1] [--json benchmarks/results/cpu_bench_sampler.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from stage_worker.sampler import Row, draw_seed, sample_rows
from stagemesh.sampling import SamplingSpec


def reference_draw(logits: torch.Tensor, specs: list[SamplingSpec], outputs: list[int]) -> list[int]:
    """The sampler before issue 19: every sampled row filtered and drawn on its own."""
    tokens = []
    for row, spec, index in zip(logits, specs, outputs):
        row = row.detach().cpu().float() / spec.temperature
        if 0 < spec.top_k < row.shape[-1]:
            row = row.masked_fill(row < torch.topk(row, spec.top_k).values[-1], float("-inf"))
        if 0 < spec.top_p < 1:
            sorted_logits, sorted_idx = torch.sort(row, descending=False)
            remove = sorted_logits.softmax(-1).cumsum(-1) <= (1 - spec.top_p)
            remove[-1] = False
            row = row.masked_fill(remove.scatter(0, sorted_idx, remove), float("-inf"))
        gen = torch.Generator().manual_seed(draw_seed(spec.seed, index))
        tokens.append(int(torch.multinomial(row.softmax(-1), 1, generator=gen).item()))
    return tokens


def reference_penalties(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    from transformers import RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor

    tokens = []
    for i, r in enumerate(rows):
        s, hist = r.spec, r.history[: r.num_prompt + r.output_index]
        x = RepetitionPenaltyLogitsProcessor(s.repetition_penalty)(torch.tensor([hist], device=logits.device),
                                                                  logits[i : i + 1].clone())
        x = SequenceBiasLogitsProcessor([[[t], b] for t, b in s.logit_bias])(torch.tensor([hist]), x)[0]
        counts = torch.bincount(torch.tensor(hist[r.num_prompt:], device=x.device), minlength=x.shape[0]).float()
        x = x - s.frequency_penalty * counts - s.presence_penalty * (counts > 0).float()
        tokens.append(int(x.argmax()))
    return tokens


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--history", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(args.rows, args.vocab, generator=gen) * 4).to(args.device)
    res = {"rows": args.rows, "vocab": args.vocab, "history": args.history, "device": args.device,
           "threads": torch.get_num_threads()}

    specs = [SamplingSpec(temperature=0.8, top_k=50, top_p=0.9, seed=i) for i in range(args.rows)]
    rows = [Row(s, output_index=7) for s in specs]
    ref_ms, ref_tok = timed(lambda: reference_draw(logits, specs, [7] * args.rows), args.repeats)
    ours_ms, drawn = timed(lambda: sample_rows(logits, rows), args.repeats)
    assert drawn.tokens == ref_tok, "the batched draw must give the reference's tokens"
    res["draw"] = {"reference_ms": round(ref_ms, 3), "batched_ms": round(ours_ms, 3), "ratio": round(ref_ms / ours_ms, 2)}

    bias = tuple((t, 1.5) for t in range(0, args.vocab, args.vocab // 20))[:20]
    spec = SamplingSpec(repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.5, logit_bias=bias)
    hists = [torch.randint(0, args.vocab, (args.history,), generator=gen).tolist() for _ in range(args.rows)]
    prows = [Row(spec, output_index=args.history // 2, history=h, num_prompt=args.history // 2) for h in hists]
    ref_ms, ref_tok = timed(lambda: reference_penalties(logits, prows), args.repeats)
    ours_ms, drawn = timed(lambda: sample_rows(logits, prows), args.repeats)
    assert drawn.tokens == ref_tok, "the batched penalties must give the reference's tokens"
    res["penalties"] = {"reference_ms": round(ref_ms, 3), "batched_ms": round(ours_ms, 3),
                        "ratio": round(ref_ms / ours_ms, 2)}
    for name in ("draw", "penalties"):
        r = res[name]
        print(f"{name:10s} reference {r['reference_ms']:9.2f} ms   batched {r['batched_ms']:9.2f} ms   "
              f"reference / batched {r['ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
