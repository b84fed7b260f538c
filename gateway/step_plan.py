"""What one micro-batch carries from the scheduler to execution: a `StepPlan` of `ScheduledChunk`s,
each a slice of one sequence's `Admission` (its stay on a replica: wire id, block table, progress).

The Scheduler (gateway/scheduler.py) creates and owns the admissions and builds the plans; the
engine (gateway/engine.py) turns a plan into a ForwardRequest and hands it back with the answer.

Pure Python: no torch, no grpc. Used from the gateway's event loop only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from gateway.sequence import Sequence

_wire_ids = itertools.count(1)  # process-wide: a re-prefill on any chain never reuses a wire id


@dataclass(eq=False)
class Admission:
    """A sequence's stay on this replica, from admission to preemption, finish or hand-over.

    Created by the Scheduler on admission (`_admit`, `_fork`) and dropped when the sequence
    leaves, so a readmission (after a preemption, or on a new chain) starts from a fresh one.
    Owned by the Scheduler: the engine reads it through the plan's chunks only.
    """

    seq: Sequence
    block_table: list[int]
    # Tokens whose KV is in the replica's cache (computed or reused from the prefix cache).
    num_computed: int
    # The id stages know this admission by; a fresh one per admission so a re-prefill never
    # collides with a stale table still on a stage.
    wire_id: int = field(default_factory=lambda: next(_wire_ids))
    # Whether the stages have been told about this admission (NewSequence sent).
    announced: bool = False
    # Micro-batches holding this admission (more than one when decodes follow samples in flight).
    in_flight: int = 0
    # output_index of the newest sampling chunk sent (-1: none since the stages were told).
    last_sample_index: int = -1
    # A forked sample's copy-on-write (src, dst), sent with its first chunk; the admission holds
    # a reference on src until that chunk is back (the stages have copied it by then).
    copy: tuple[int, int] | None = None

    @property
    def num_uncomputed(self) -> int:
        return self.seq.num_tokens - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        return self.num_uncomputed > 1


@dataclass
class ScheduledChunk:
    admission: Admission
    start_pos: int
    num_tokens: int
    new_block_ids: list[int]
    sample: bool
    output_index: int
    is_new: bool  # first chunk of this admission: the stages get the full block table
    follows: bool = False  # the token is the sample of the micro-batch in flight before (lookahead)

    @property
    def seq(self) -> Sequence:
        return self.admission.seq

    @property
    def wire_id(self) -> int:
        return self.admission.wire_id


@dataclass
class StepPlan:
    """One micro-batch: what the stages run and which stale sequences they drop."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    finished_wire_ids: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst), before the forward

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def token_ids(self) -> list[int]:
        out: list[int] = []
        for c in self.chunks:
            if c.follows:
                out.append(0)  # the stage puts the sample there
            else:
                out.extend(c.seq.token_slice(c.start_pos, c.start_pos + c.num_tokens))
        return out
