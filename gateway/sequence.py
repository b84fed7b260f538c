"""A request inside the gateway: its ids, token history, sampling, status and timing.

Pure Python (no torch, no grpc). The token history (`prompt_ids + output_ids`) is the source of
truth: after a preemption or a failover the sequence is re-prefilled from it. What a replica holds
of a sequence while it runs there belongs to that replica's components, keyed by `seq_id`: the
scheduler's `Admission` (wire id, block table, progress) and the block manager's hashing state.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from stagemesh.sampling import SamplingSpec


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request. Owned by one replica's scheduler at a time; mutated from the gateway's event
    loop only. `seq_id` is unique within the gateway process (the replica's components key their
    state by it)."""

    seq_id: int
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    priority: int = 0  # 0 interactive, 1 batch: lower is served first
    request_id: str = ""
    arrival: float = field(default_factory=time.monotonic)

    output_ids: list[int] = field(default_factory=list)
    # With sampling.logprobs: one entry per output id (stagemesh.v1 TokenLogprob, as the last stage
    # sent it). With sampling.prompt_logprobs: one per prompt position (None until computed; the
    # first prompt token never has one).
    output_logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None
    status: Status = Status.WAITING
    finish_reason: str | None = None
    # Prompt tokens reused from the prefix cache at the first admission (reported in usage);
    # None until the first admission (a readmission recomputes, but the usage keeps the first).
    first_cached_tokens: int | None = None
    # n > 1: the request's sample 0, whose prompt KV this sample forks from instead of computing
    # it again (Scheduler._admit); None for sample 0 and n = 1.
    fork_of: Sequence | None = None

    @property
    def num_cached_tokens(self) -> int:
        return self.first_cached_tokens or 0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_ids[start:end] without concatenating the whole history (a decode step wants one id)."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n : end - n]
        if end <= n:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[: end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)
