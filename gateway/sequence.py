"""A request's state inside the gateway: its token history, blocks and progress.

Pure Python (no torch, no grpc). The token history (`prompt_ids + output_ids`) is the source of
truth: after a preemption or a failover the sequence is re-prefilled from it.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from stagemesh.sampling import SamplingSpec

_wire_ids = itertools.count(1)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request. Owned by one replica's scheduler; mutated from the gateway's event loop only."""

    seq_id: int
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    priority: int = 0  # 0 interactive, 1 batch: lower is served first
    request_id: str = ""
    arrival: float = field(default_factory=time.monotonic)

    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    # Tokens whose KV is in the replica's cache (computed or reused from the prefix cache).
    num_computed: int = 0
    # Prompt tokens reused from the prefix cache at the first admission (reported in usage).
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # The id stages know this admission by; a fresh one per (re-)admission so a re-prefill never
    # collides with a stale table still on a stage.
    wire_id: int = 0
    # Whether the stages have been told about this admission (NewSequence sent).
    announced: bool = False
    # Micro-batches holding this sequence (two when a decode follows a sample still in flight).
    in_flight: int = 0
    # output_index of the newest sampling chunk sent (-1: none this admission).
    last_sample_index: int = -1
    finish_reason: str | None = None
    admitted_once: bool = False
    # Chained hashes of the full blocks of all_ids, extended as tokens arrive (see block_manager).
    hashes: list[bytes] = field(default_factory=list, repr=False)
    # KV blocks this request is expected to add on its replica (router's estimate, for load).
    expected_new_blocks: int = 0
    # Leading blocks of block_table whose hashes are registered (sealed) this admission.
    sealed: int = 0
    # Leading blocks whose hashes this admission announced as being computed (block_manager).
    computing_upto: int = 0

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

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        return self.num_uncomputed > 1

    def new_admission(self) -> None:
        """Start a fresh admission (first time, after preemption or after a failover)."""
        self.wire_id = next(_wire_ids)
        self.announced = False
        self.num_computed = 0
        self.block_table = []
        self.last_sample_index = -1
