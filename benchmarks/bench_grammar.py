"""Grammar engines for structured output, measured side by side: xgrammar against llguidance.

What the last stage pays per constrained token is one mask computation (the set of tokens the
grammar allows next, as a bitmask over the vocabulary) plus one matcher advance with the sampled
token; what a request pays once is compiling its grammar against the tokenizer. This script
measures both on real tokenizer vocabularies:

  - demo-768: the byte-level BPE the test and demo checkpoints ship (stagemesh demo-model);
  - bpe-128k: a byte-level BPE of 128,256 tokens (Llama 3's vocabulary size) trained here on a
    synthetic corpus (pseudo-words, numbers, punctuation, whitespace runs, CJK), since nothing may
    be downloaded; written once to --tok128k (about 15 s).

Workloads: a JSON schema (object with bounded strings, an enum, a ranged integer, an array of
objects), a regex (a date-and-time line), a choice among 4 strings, and free JSON (json_object).
Each walk draws tokens at random among those the mask allows (seeded; at most --max-tokens
tokens, EOS only once the grammar has nothing else), the way a random-weights model walks: masks
inside strings and numbers (many tokens allowed) are the expensive ones. Times are per token,
median / p90 / max over every step of --walks walks, single-threaded, on this machine's CPU.

    pip install xgrammar==0.2.8   # the comparison only: stagemesh itself depends on llguidance alone
    python benchmarks/bench_grammar.py [--walks 5] [--max-tokens 200] [--out benchmarks/results/cpu_bench_grammar.json]

With --mesh (a checkpoint dir, or "demo"; one without tokenizer.json, such as bench_gpu's random
Llama-3.1-8B shape, gets the synthetic 128k BPE written into it): the issue's throughput figure. `stagemesh up`
serves it; rounds of --requests concurrent greedy requests of --gen-tokens tokens each (ignore_eos,
so both sides generate the same tokens), unconstrained and with the JSON schema above, alternated;
every constrained output is checked (complete and valid); prints json_schema / free of the median throughputs.

    python benchmarks/bench_grammar.py --mesh demo [--stages 1] [--requests 16] [--gen-tokens 192]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "kind": {"enum": ["river", "mill", "bridge", "weir"]},
        "year": {"type": "integer", "minimum": 1200, "maximum": 2100},
        "open": {"type": "boolean"},
        "parts": {"type": "array", "maxItems": 3,
                  "items": {"type": "object", "properties": {"label": {"type": "string", "maxLength": 12},
                                                             "count": {"type": "integer", "minimum": 0,
                                                                       "maximum": 99}},
                            "required": ["label", "count"], "additionalProperties": False}},
    },
    "required": ["name", "kind", "year", "open", "parts"],
    "additionalProperties": False,
}
REGEX = r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01]) [0-2]\d:[0-5]\d [a-z]{2,12}"
CHOICES = ["the river", "the old mill", "the stone bridge", "nothing at all"]
WORKLOADS = ("json_schema", "regex", "choice", "json_object")
# Both engines write JSON the same way: `{"a": 1, "b": 2}`, no free whitespace (a random walk, like
# a random-weights model, would otherwise fill strings of whitespace until max_tokens).
LL_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# --- tokenizers ------------------------------------------------------------------------------------


def demo_tokenizer_json() -> str:
    from stagemesh.cli.demo_model import train_tokenizer

    return train_tokenizer(768).to_str()


def synthetic_128k_json(path: Path) -> str:
    """A 128,256-token byte-level BPE trained on a synthetic corpus (cached at `path`)."""
    if path.is_file():
        return path.read_text()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    syl = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + list("aeiou") + ["th", "ch", "sh", "ng", "st"]
    words = []
    for _ in range(300_000):
        w = "".join(rng.choice(syl) for _ in range(rng.choice([1, 2, 2, 3, 3, 4, 5])))
        r = rng.random()
        words.append(w.capitalize() if r < 0.1 else (w.upper() if r < 0.12 else w))
    punct = [",", ".", ":", ";", '"', "{", "}", "[", "]", "(", ")", "\n", "  ", "    ", "-", "_", "/", "'",
             "\t", "!", "?", "=", "<", ">", "#", "*"]

    def line() -> str:
        out = []
        for _ in range(rng.randint(5, 25)):
            r = rng.random()
            if r < 0.7:
                out.append(" " + words[int(rng.paretovariate(0.6)) % len(words)])
            elif r < 0.8:
                out.append(" " + str(rng.randint(0, 10 ** rng.randint(1, 6))))
            elif r < 0.95:
                out.append(rng.choice(punct))
            else:
                out.append(" " + "".join(chr(rng.randint(0x4E00, 0x4FFF)) for _ in range(rng.randint(1, 3))))
        return "".join(out)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=128_256, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((line() for _ in range(400_000)), trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path.read_text()


# --- the two engines behind one small interface --------------------------------------------------------


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer_json: str, eos: int):
        import llguidance

        self.ll = llguidance
        self.tok = llguidance.LLTokenizer(tokenizer_json, eos_token=eos)
        self.vocab = self.tok.vocab_size

    def compile(self, kind: str):
        M = self.ll.LLMatcher
        if kind in ("json_schema", "json_object"):
            g = M.grammar_from_json_schema(json.dumps(SCHEMA if kind == "json_schema" else {"type": "object"}),
                                           overrides=LL_JSON)
        elif kind == "regex":
            g = M.grammar_from_regex(REGEX)
        else:
            g = M.grammar_from_regex("|".join(_re_escape(c) for c in CHOICES))
        err = M.validate_grammar(g, self.tok)
        assert not err, err
        return g

    def matcher(self, grammar):
        return _LLMatcher(self.ll.LLMatcher(self.tok, grammar, log_level=0))


class _LLMatcher:
    def __init__(self, m):
        self.m = m

    def fill(self, mask: np.ndarray) -> None:
        self.m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)

    def accept(self, token: int) -> bool:
        return self.m.consume_token(token)

    def done(self) -> bool:
        return self.m.is_stopped()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer_json: str, eos: int):
        import xgrammar
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        self.xgr = xgrammar
        hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json))
        self.vocab = hf.backend_tokenizer.get_vocab_size()
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab, stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, kind: str):
        c = self.compiler
        if kind == "json_schema":
            return c.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
        if kind == "json_object":
            return c.compile_json_schema(json.dumps({"type": "object"}), any_whitespace=False)
        if kind == "regex":
            return c.compile_regex(REGEX)
        return c.compile_regex("|".join(_re_escape(c) for c in CHOICES))

    def matcher(self, grammar):
        return _XGMatcher(self.xgr, self.xgr.GrammarMatcher(grammar), self.vocab)


class _XGMatcher:
    def __init__(self, xgr, m, vocab: int):
        import torch

        self.m = m
        self.buf = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)

    def fill(self, mask: np.ndarray) -> None:
        self.m.fill_next_token_bitmask(self.buf, 0)
        mask[:] = self.buf.numpy()[0]

    def accept(self, token: int) -> bool:
        return self.m.accept_token(token)

    def done(self) -> bool:
        return self.m.is_terminated()


def _re_escape(s: str) -> str:
    return "".join("\\" + ch if ch in r".^$*+?{}[]\|()" else ch for ch in s)


# --- the walk -----------------------------------------------------------------------------------------


def allowed(mask: np.ndarray, vocab: int) -> np.ndarray:
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def walk(engine, grammar, seed: int, max_tokens: int, eos: int) -> tuple[list[float], list[float], int]:
    """One random walk: (mask times, accept times) in seconds per step, tokens generated."""
    rng = np.random.default_rng(seed)
    m = engine.matcher(grammar)
    mask = np.zeros((engine.vocab + 31) // 32, dtype=np.int32)
    fills, accepts = [], []
    for _ in range(max_tokens):
        t0 = time.perf_counter()
        m.fill(mask)
        fills.append(time.perf_counter() - t0)
        ids = allowed(mask, engine.vocab)
        non_eos = ids[ids != eos]
        if len(non_eos) == 0:
            break
        tok = int(rng.choice(non_eos))
        t0 = time.perf_counter()
        ok = m.accept(tok)
        accepts.append(time.perf_counter() - t0)
        assert ok, f"{engine.name} refused a token its own mask allowed"
        if m.done():
            break
    return fills, accepts, len(accepts)


def measure(engine, kind: str, walks: int, max_tokens: int, eos: int) -> dict:
    t0 = time.perf_counter()
    grammar = engine.compile(kind)
    compile_ms = (time.perf_counter() - t0) * 1e3
    fills, accepts, tokens = [], [], []
    for seed in range(walks):
        f, a, n = walk(engine, grammar, seed, max_tokens, eos)
        fills += f
        accepts += a
        tokens.append(n)
    fills_us = sorted(x * 1e6 for x in fills)
    per_request_ms = compile_ms + sum(fills) * 1e3 / walks  # what one request pays, compile + every mask
    return {"compile_ms": round(compile_ms, 2), "steps": len(fills), "tokens_per_walk": tokens,
            "mask_us_mean": round(statistics.mean(fills_us), 1), "per_request_ms": round(per_request_ms, 2),
            "mask_us_median": round(statistics.median(fills_us), 1),
            "mask_us_p90": round(fills_us[int(0.9 * (len(fills_us) - 1))], 1),
            "mask_us_max": round(fills_us[-1], 1),
            "accept_us_median": round(statistics.median(accepts) * 1e6, 1) if accepts else None}


# --- the mesh: constrained against unconstrained generation, same workload ---------------------------


async def _drive(address: str, constrained: bool, args, vocab: int) -> tuple[float, int, list[str]]:
    """args.requests concurrent greedy requests of args.gen_tokens tokens each (ignore_eos: a
    completed grammar allows only EOS, so both modes generate the same number of tokens):
    (seconds, tokens, texts)."""
    import grpc

    from stagemesh.client import build_request
    from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc

    rng = random.Random(1)
    reqs = []
    for _ in range(args.requests):
        req = build_request(prompt_ids=[rng.randrange(2, vocab) for _ in range(32)], max_tokens=args.gen_tokens,
                            ignore_eos=True)
        if constrained:
            req.sampling.grammar.json_schema = json.dumps(SCHEMA)
        reqs.append(req)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.GenerationStub(ch)

        async def one(req):
            text, n = "", 0
            async for msg in stub.Generate(req, timeout=600):
                text += msg.text
                n += len(msg.token_ids)
            return text, n

        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(r) for r in reqs))
        return time.perf_counter() - t0, sum(n for _, n in done), [t for t, _ in done]


def _valid(text: str) -> bool:
    """Whether a constrained output is complete JSON valid under SCHEMA (False: cut by --gen-tokens)."""
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def _use_tokenizer_specials(model_dir: Path) -> None:
    """config.json's bos/eos ids -> the synthetic tokenizer's <s> and </s>. The checkpoint's own
    (Llama 3's 128000/128001) are ordinary BPE tokens there: a completed grammar, which allows only
    EOS, would then append that token's text to every output (ignore_eos) and no output would parse."""
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(bos_token_id=0, eos_token_id=1)  # synthetic_128k_json's special tokens
    cfg_path.write_text(json.dumps(cfg, indent=1))
    (model_dir / "generation_config.json").unlink(missing_ok=True)  # it would restate the old ids


def mesh_throughput(args) -> None:
    """`stagemesh up` on args.mesh (a checkpoint dir, or "demo"); rounds of free and json_schema
    runs alternated; the ratio of their median throughputs (goal: >= 0.9 on a GPU)."""
    from stagemesh.cli.demo_model import write_demo_model
    from stagemesh.cli.harness import mesh
    from stagemesh.model_config import ModelConfig

    model_dir = args.mesh
    if model_dir == "demo":
        model_dir = write_demo_model(Path(tempfile.mkdtemp()) / "demo", num_layers=8, hidden_size=256)
    vocab = ModelConfig.from_dir(model_dir).vocab_size
    if not (Path(model_dir) / "tokenizer.json").is_file():  # e.g. bench_gpu's random Llama-3.1-8B shape
        print(f"{model_dir} has no tokenizer.json: writing the synthetic 128k BPE there (vocab {vocab})")
        (Path(model_dir) / "tokenizer.json").write_text(synthetic_128k_json(args.tok128k))
        _use_tokenizer_specials(Path(model_dir))
    rows = []
    with mesh(model_dir, stages=args.stages, extra=args.up_args.split()) as m:
        asyncio.run(_drive(m.address, True, args, vocab))  # warm-up (and the grammar tokenizer's build)
        for rnd in range(args.rounds):
            for constrained in (False, True):
                secs, tokens, texts = asyncio.run(_drive(m.address, constrained, args, vocab))
                rows.append({"round": rnd, "mode": "json_schema" if constrained else "free", "seconds": round(secs, 3),
                             "tokens": tokens, "tok_s": round(tokens / secs, 1),
                             "valid": sum(map(_valid, texts)) if constrained else None})
                print(rows[-1], flush=True)
    free = statistics.median(r["tok_s"] for r in rows if r["mode"] == "free")
    constrained = statistics.median(r["tok_s"] for r in rows if r["mode"] == "json_schema")
    print(f"throughput json_schema / free: {constrained:.1f} / {free:.1f} tok/s = {constrained / free:.3f} "
          f"({args.requests} requests x {args.gen_tokens} tokens, {args.stages} stage(s)); constrained outputs "
          f"complete and valid: {sum(r['valid'] for r in rows if r['valid'] is not None)} of "
          f"{args.requests * args.rounds}")
    if args.out_mesh:
        args.out_mesh.write_text(json.dumps({"model": str(model_dir), "stages": args.stages, "requests": args.requests,
                                             "gen_tokens": args.gen_tokens, "rows": rows,
                                             "ratio_json_schema_over_free": round(constrained / free, 3)},
                                            indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--walks", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--tok128k", type=Path, default=Path(tempfile.gettempdir()) / "stagemesh-bench-bpe128k.json")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_bench_grammar.json")
    ap.add_argument("--mesh", help="instead: throughput on `stagemesh up --model MESH` (a dir, or 'demo'), "
                                   "json_schema-constrained against free")
    ap.add_argument("--stages", type=int, default=1)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--up-args", default="", help="more `stagemesh up` flags, one string")
    ap.add_argument("--out-mesh", type=Path, default=None, help="write the mesh run's rows here (JSON)")
    args = ap.parse_args()
    if args.mesh:
        mesh_throughput(args)
        return
    vocabs = {"demo-768": (demo_tokenizer_json(), 1), "bpe-128k": (synthetic_128k_json(args.tok128k), 1)}
    results = []
    for vname, (tok_json, eos) in vocabs.items():
        for cls in (XGrammar, LLGuidance):
            t0 = time.perf_counter()
            engine = cls(tok_json, eos)
            setup_ms = (time.perf_counter() - t0) * 1e3
            for kind in WORKLOADS:
                row = {"vocab": vname, "vocab_size": engine.vocab, "engine": engine.name,
                       "tokenizer_setup_ms": round(setup_ms, 1), "workload": kind,
                       **measure(engine, kind, args.walks, args.max_tokens, eos)}
                results.append(row)
                print(f"{vname:9} {engine.name:10} {kind:11} compile {row['compile_ms']:8.2f} ms  mask/token "
                      f"median {row['mask_us_median']:8.1f} us p90 {row['mask_us_p90']:8.1f} max "
                      f"{row['mask_us_max']:8.1f} mean {row['mask_us_mean']:7.1f}  accept {row['accept_us_median']} us"
                      f"  per request {row['per_request_ms']:7.2f} ms",
                      flush=True)
    _ratios(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": "CPU (this 2-core machine), single thread", "walks": args.walks,
                                    "max_tokens": args.max_tokens, "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


def _ratios(results: list[dict]) -> None:
    """xgrammar / llguidance per (vocabulary, workload): above 1, llguidance is faster."""
    by = {(r["vocab"], r["workload"], r["engine"]): r for r in results}
    print("\nratio xgrammar / llguidance (median mask time; compile time; per request: compile + all masks)")
    for (vocab, kind, engine), r in by.items():
        if engine == "xgrammar":
            ll = by[(vocab, kind, "llguidance")]
            print(f"  {vocab:9} {kind:11} mask {r['mask_us_median'] / max(ll['mask_us_median'], 1e-9):6.2f}  "
                  f"compile {r['compile_ms'] / max(ll['compile_ms'], 1e-9):6.2f}  "
                  f"per request {r['per_request_ms'] / max(ll['per_request_ms'], 1e-9):6.2f}")


if __name__ == "__main__":
    main()
