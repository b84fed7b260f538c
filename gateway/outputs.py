"""What a request's stream carries beside tokens and text: samples of one prompt (n), their stop
tokens, min_tokens, and log-probabilities. Used by gateway/server.py's RequestStream, per sample.

Pure Python (no torch, no grpc beyond the message types): called on the event loop.
"""

from __future__ import annotations

import dataclasses

from stagemesh.sampling import SamplingSpec, sample_seed
from stagemesh.v1 import stagemesh_pb2 as pb


def sample_specs(spec: SamplingSpec, n: int, eos_ids, ignore_eos: bool) -> list[SamplingSpec]:
    """The spec of each of n samples: the model's EOS ids joined to the stop tokens (unless
    ignore_eos: the stage masks them under min_tokens, the gateway stops on them), and each
    sample's own seed (sample_seed). Only sample 0 asks for prompt logprobs (they are the same
    for every sample, and asking computes the prompt without the prefix cache)."""
    stops = tuple(sorted(set(spec.stop_token_ids) | (set() if ignore_eos else set(eos_ids))))
    base = dataclasses.replace(spec, stop_token_ids=stops)
    return [dataclasses.replace(base, seed=sample_seed(spec.seed, i),
                                prompt_logprobs=spec.prompt_logprobs if i == 0 else None) for i in range(n)]


def add_logprobs(msg: pb.GenerateResponse, seq, start: int, end: int) -> None:
    """The log-probabilities of output ids [start, end) (and, with start 0, the prompt's) into msg."""
    if seq.sampling.logprobs is not None:
        msg.logprobs.extend(seq.output_logprobs[start:end])
    if start == 0 and seq.prompt_logprobs is not None:
        msg.prompt_token_ids.extend(seq.prompt_ids)
        msg.prompt_logprobs.extend(e if e is not None else pb.TokenLogprob() for e in seq.prompt_logprobs[1:])


def stop_reason(seq, new_ids: list[int], stop_hit: bool) -> str | None:
    """"stop" for a stop string or stop token (none before min_tokens), "length" at max_tokens.

    A stop token before min_tokens under a grammar came because the grammar allowed nothing else
    (the stage masks them otherwise): the answer is complete, and it stops (as vLLM)."""
    done = len(seq.output_ids) >= seq.sampling.min_tokens
    stop_token = bool(new_ids) and new_ids[-1] in seq.sampling.stop_token_ids
    if (done and (stop_hit or stop_token)) or (stop_token and seq.sampling.grammar is not None):
        return "stop"
    if len(seq.output_ids) >= seq.max_tokens:
        return "length"
    return None
