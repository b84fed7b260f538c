"""Checks a GenerateRequest against the served model; raises typed errors with actionable text."""

from __future__ import annotations

import math
from dataclasses import dataclass

from stagemesh.errors import InvalidArgument, OutOfRange
from stagemesh.sampling import SamplingSpec
from stagemesh.v1 import stagemesh_pb2 as pb



@dataclass(frozen=True)
class ModelLimits:
    model_id: str
    vocab_size: int
    max_model_len: int
    kv_capacity_tokens: int  # tokens one sequence may hold on the smallest replica
    default_max_tokens: int = 16
    max_stop_strings: int = 16


def validate_request(req: pb.GenerateRequest, limits: ModelLimits, tokenize) -> tuple[list[int], int, SamplingSpec]:
    """Returns (prompt ids, max_tokens, sampling) or raises InvalidArgument / OutOfRange."""
    if req.model and req.model != limits.model_id:
        raise InvalidArgument(f"unknown model {req.model!r}: this gateway serves {limits.model_id!r}")
    prompt_ids = _prompt_ids(req, limits, tokenize)
    max_tokens = req.max_tokens if req.HasField("max_tokens") else limits.default_max_tokens
    if max_tokens <= 0:
        raise InvalidArgument(f"max_tokens must be >= 1, got {max_tokens}")
    if len(prompt_ids) >= limits.max_model_len:
        raise OutOfRange(
            f"the prompt has {len(prompt_ids)} tokens; the model's context is {limits.max_model_len} tokens"
        )
    total = len(prompt_ids) + max_tokens
    if total > limits.max_model_len:
        raise OutOfRange(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) = {total} exceeds the model's "
            f"context of {limits.max_model_len} tokens; lower max_tokens to at most {limits.max_model_len - len(prompt_ids)}"
        )
    if total > limits.kv_capacity_tokens:
        raise OutOfRange(
            f"prompt + max_tokens = {total} tokens exceeds the KV cache of a replica "
            f"({limits.kv_capacity_tokens} tokens); shorten the request"
        )
    if len(req.stop) > limits.max_stop_strings:
        raise InvalidArgument(f"at most {limits.max_stop_strings} stop strings, got {len(req.stop)}")
    return prompt_ids, max_tokens, _sampling(req.sampling)


def _prompt_ids(req: pb.GenerateRequest, limits: ModelLimits, tokenize) -> list[int]:
    if req.prompt and req.prompt_ids:
        raise InvalidArgument("set either prompt or prompt_ids, not both")
    if req.prompt_ids:
        ids = list(req.prompt_ids)
        bad = [t for t in ids if t < 0 or t >= limits.vocab_size]
        if bad:
            raise InvalidArgument(
                f"prompt_ids contains {len(bad)} id(s) outside the vocabulary [0, {limits.vocab_size}), e.g. {bad[0]}"
            )
        return ids
    if not req.prompt:
        raise InvalidArgument("the prompt is empty: set prompt (text) or prompt_ids")
    if tokenize is None:
        raise InvalidArgument("this checkpoint ships no tokenizer.json: send prompt_ids instead of prompt")
    ids = tokenize(req.prompt)
    if not ids:
        raise InvalidArgument("the prompt tokenizes to zero tokens")
    return ids


def _sampling(sp: pb.SamplingParams) -> SamplingSpec:
    temperature = sp.temperature
    if math.isnan(temperature) or temperature < 0:
        raise InvalidArgument(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    top_p = sp.top_p if sp.HasField("top_p") else 1.0
    if math.isnan(top_p) or not 0.0 < top_p <= 1.0:
        raise InvalidArgument(f"top_p must be in (0, 1], got {top_p}")
    if sp.top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0 (0 = no limit), got {sp.top_k}")
    seed = sp.seed if sp.HasField("seed") else None
    return SamplingSpec(temperature=float(temperature), top_p=float(top_p), top_k=int(sp.top_k), seed=seed)
