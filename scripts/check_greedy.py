"""Check a running mesh's greedy tokens against transformers on the same checkpoint (a directory
or a .gguf file, which transformers dequantizes to float): the text prompt tokenized by the
mesh, and the same prompt's ids, must both give transformers' greedy continuation.
Called by `CHECK=1 bash scripts/demo.sh`; needs the test extra (transformers, accelerate).

    python scripts/check_greedy.py --target 127.0.0.1:50051 --model PATH [--prompt TEXT] [--max-tokens K]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from stagemesh.client import Client


def reference(model: Path, prompt: str, max_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy continuation) from transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = dict(pretrained_model_name_or_path=model.parent, gguf_file=model.name) if model.suffix == ".gguf" \
        else dict(pretrained_model_name_or_path=model)
    tok = AutoTokenizer.from_pretrained(**where)
    hf = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()
    ids = tok(prompt).input_ids
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=max_tokens, eos_token_id=None,
                          min_new_tokens=max_tokens, pad_token_id=0)
    return ids, out[0, len(ids):].tolist()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-tokens", type=int, default=16)
    a = p.parse_args()
    start = time.monotonic()
    ids, want = reference(a.model, a.prompt, a.max_tokens)
    print(f"transformers: {len(want)} greedy tokens in {time.monotonic() - start:.0f} s (load included)")
    with Client(a.target) as client:
        by_text = client.generate(prompt=a.prompt, max_tokens=a.max_tokens, ignore_eos=True, timeout=300).to_json()
        by_ids = client.generate(prompt_ids=ids, max_tokens=a.max_tokens, ignore_eos=True, timeout=300).to_json()
    ok = by_text["token_ids"] == want and by_ids["token_ids"] == want and by_text["usage"]["prompt_tokens"] == len(ids)
    print(f"mesh:         {by_text['token_ids']} {by_text['text']!r}\ntransformers: {want}")
    print("greedy tokens equal transformers'" if ok else "MISMATCH with transformers' greedy tokens")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
