"""Hugging Face transformers as the correctness reference (test-only dependency)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def _load(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@functools.cache
def _load_eager(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def hf_model(path):
    """transformers' model of a checkpoint, fp32 with eager attention (the logits reference), cached."""
    return _load_eager(str(path))


_REF: dict = {}


def hf_reference(path, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """(transformers' greedy continuation, its logits [L-1, V] over prompt + that continuation),
    computed once per checkpoint and prompt (the stage counts share it)."""
    key = (str(path), tuple(prompt), new_tokens)
    if key not in _REF:
        hf = hf_model(path)
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=new_tokens)
            _REF[key] = out[0, len(prompt):].tolist(), hf(out).logits[0, :-1]
    return _REF[key]


def hf_greedy(model_dir, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
    """transformers' greedy `generate` continuation (new tokens only, EOS included when hit)."""
    model = _load(str(model_dir))
    kwargs = {}
    if ignore_eos:
        kwargs = dict(eos_token_id=None, min_new_tokens=max_new_tokens)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0, **kwargs)
    return out[0, len(prompt_ids):].tolist()


def random_prompts(seed: int, lengths: list[int], vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
