"""Per-request sampling parameters, shared by the gateway (which validates and sends them) and the
last stage (which samples with them). Pure Python: the gateway imports no torch.

The parameters are vLLM's (its SamplingParams / OpenAI server): the last stage applies them in
the order min_tokens and logit_bias, penalties, temperature, top_k, top_p, min_p
(stage_worker/sampler.py). Log-probabilities come from the raw distribution, before any of them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from stagemesh.grammar import GrammarSpec

MAX_LOGPROBS = 20  # top alternatives per position (vLLM's default max_logprobs)


@dataclass(frozen=True)
class SamplingSpec:
    """Per-request sampling; temperature 0 = greedy, top_p 0 or 1 = off, top_k 0 = off; each
    further field is off at its default."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), sorted by id
    stop_token_ids: tuple[int, ...] = ()  # on a stage: the user's plus EOS (masked under min_tokens)
    logprobs: int | None = None  # top alternatives per generated token; None: no logprobs
    prompt_logprobs: int | None = None  # the same for prompt tokens
    grammar: GrammarSpec | None = None  # structured output, masked on the last stage (stagemesh/grammar.py)

    def __post_init__(self):
        ok = (self.temperature >= 0 and 0 <= self.top_p <= 1 and self.top_k >= 0  # NaN fails too
              and 0 <= self.min_p <= 1 and self.repetition_penalty > 0
              and -2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2 and self.min_tokens >= 0
              and all(-100 <= b <= 100 for _, b in self.logit_bias)
              and all(k is None or 0 <= k <= MAX_LOGPROBS for k in (self.logprobs, self.prompt_logprobs)))
        if not ok:
            raise ValueError(f"invalid sampling parameters {self}")

    @property
    def greedy(self) -> bool:
        """The arg-max of the processed logits (no random draw)."""
        return self.temperature == 0

    @property
    def needs_history(self) -> bool:
        """Whether the last stage needs the sequence's tokens (penalties)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def moves_argmax(self) -> bool:
        """Whether anything may change which token is the most likely (min_p, top-k and top-p
        never do: they only drop less likely ones)."""
        return self.needs_history or bool(self.logit_bias) or self.min_tokens > 0

    @property
    def plain_greedy(self) -> bool:
        """The arg-max of the raw logits (after the grammar's mask, with structured output) with
        nothing else to return: the stage takes it on the device, and a decode may follow it before
        it is back (async scheduling; the mask of the follower waits for this sample's)."""
        return self.greedy and not self.moves_argmax and self.logprobs is None


def sample_seed(seed: int | None, index: int) -> int | None:
    """The seed of sample `index` of a request with `seed` (n > 1): sample 0 keeps the request's
    seed (so n = 1 and choice 0 of n = 3 agree), the others get one derived from (seed, index)."""
    if seed is None or index == 0:
        return seed
    data = int(seed).to_bytes(16, "little") + int(index).to_bytes(4, "little") + b"stagemesh-n"
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
