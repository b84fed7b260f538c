"""The sequences a stage holds, per gateway lease: block tables, sampling, owners and expiry.

The gateway sends each sequence's block table and sampling spec once, then deltas. A lease names
its owner (a gateway's replica) and its order: a newer lease of an owner frees the older ones'
sequences here at once (a re-planned chain, a restarted gateway), also on a stage whose own
assignment did not change, so no block is kept that nobody owns; a step of an older lease is
refused from then on. A lease not heard from for its TTL (its gateway died) goes too.

A step is checked against the table (`plan`) before anything changes (`commit`), so a refused
step leaves every sequence as it was. Each sequence's newest sample (async scheduling) is kept
in `samples` and goes with the sequence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from stagemesh.errors import FailedPrecondition, InvalidArgument
from stagemesh.sampling import SamplingSpec

from stage_worker.samples import SampleBook
from stage_worker.step_input import StepInput


@dataclass
class SeqState:
    block_table: list[int]
    sampling: SamplingSpec
    history: list[int] = field(default_factory=list)  # last stage: tokens so far (penalties, prompt logprobs)
    num_prompt: int = 0  # how many of `history` are the prompt


class LeaseTable:
    """(lease, seq_id) -> SeqState, and which leases are live. Used on the compute thread; the
    event loop only reads (`in`, get) and writes the SampleBook (samples.py says why that is safe)."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.seqs: dict[tuple[str, int], SeqState] = {}
        self.samples = SampleBook()  # where each greedy sequence's newest sample is
        self._seen: dict[str, float] = {}  # lease id -> last step (monotonic s)
        self._newest: dict[str, tuple[int, str]] = {}  # lease owner -> (order, lease id) of its newest lease
        self._owner_of: dict[str, str] = {}  # lease id -> its owner

    def __len__(self) -> int:
        return len(self.seqs)

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self.seqs

    def get(self, lease_id: str, seq_id: int) -> SeqState | None:
        return self.seqs.get((lease_id, seq_id))

    def blocks_in_use(self) -> int:
        return len({b for s in list(self.seqs.values()) for b in s.block_table})

    # -- a step ----------------------------------------------------------------------------------
    def check_lease(self, step: StepInput) -> None:
        """Refuse a step of a superseded lease before it changes anything (commit claims)."""
        if step.lease_owner:
            self._check_order(step.lease_id, step.lease_owner, step.lease_order)

    def plan(self, step: StepInput) -> dict[int, list[int]]:
        """Each chunk's block table once its new blocks are appended; InvalidArgument for a chunk
        of a sequence the lease does not hold, or a table that cannot hold its tokens. Changes
        nothing but the lease's last-heard time."""
        lease = step.lease_id
        self._seen[lease] = time.monotonic()
        tables: dict[int, list[int]] = {}
        for c in step.chunks:
            new = step.new.get(c.seq_id)
            state = None if new or c.seq_id in step.finished else self.seqs.get((lease, c.seq_id))
            if new is None and state is None:
                raise InvalidArgument(f"unknown sequence {c.seq_id} for lease {lease!r}: send it in new_sequences first")
            table = (new.block_ids if new is not None else state.block_table) + c.new_block_ids
            if c.new_block_ids and len(set(table)) != len(table):  # a sequence's blocks are its own
                raise InvalidArgument(f"sequence {c.seq_id}: a block id appears twice in its table")
            if len(table) * self.block_size < c.start_pos + c.num_tokens:
                raise InvalidArgument(
                    f"sequence {c.seq_id}: {len(table)} blocks cannot hold {c.start_pos + c.num_tokens} tokens"
                )
            tables[c.seq_id] = table
        return tables

    def commit(self, step: StepInput, tables: dict[int, list[int]]) -> None:
        """Apply a planned step: claim its lease, drop finished sequences, add new ones, set tables."""
        lease = step.lease_id
        self.claim(lease, step.lease_owner, step.lease_order)
        for sid in step.finished:
            self.seqs.pop((lease, sid), None)
            self.samples.forget(lease, [sid])
        for sid, ns in step.new.items():
            self.seqs[(lease, sid)] = SeqState(list(ns.block_ids), ns.sampling, list(ns.history), ns.num_prompt)
        for sid, table in tables.items():
            self.seqs[(lease, sid)].block_table = table

    # -- leases ----------------------------------------------------------------------------------
    def claim(self, lease_id: str, owner: str, order: int, strict: bool = True) -> int:
        """A lease of `owner` with `order` is in use: drop every sequence of the owner's older
        leases. Returns the sequences dropped. A lease older than the owner's newest is refused
        (FAILED_PRECONDITION: a step of a superseded chain generation, still on its way) when
        strict, else ignored (a Release of it has nothing left to free)."""
        if not owner:
            return 0
        try:
            self._check_order(lease_id, owner, order)
        except FailedPrecondition:
            if strict:
                raise
            return 0
        newest = self._newest.get(owner)
        if newest is not None and newest[1] == lease_id:
            return 0
        self._newest[owner] = (order, lease_id)
        self._owner_of[lease_id] = owner
        old = {lease for lease, o in self._owner_of.items() if o == owner and lease != lease_id}
        return self.drop_leases(old)

    def _check_order(self, lease_id: str, owner: str, order: int) -> None:
        newest = self._newest.get(owner)
        if newest is not None and (order, lease_id) < newest:
            raise FailedPrecondition(f"lease {lease_id} of {owner} is superseded by lease {newest[1]}")

    def release(self, lease_id: str, seq_ids=()) -> None:
        """Drop the given sequences of a lease, or every one of it."""
        if seq_ids:
            for sid in seq_ids:
                self.seqs.pop((lease_id, sid), None)
        else:
            for key in [k for k in self.seqs if k[0] == lease_id]:
                del self.seqs[key]
        self.samples.forget(lease_id, seq_ids)

    def drop_leases(self, leases: set[str]) -> int:
        """Forget leases entirely (sequences, samples, owner, last-heard); returns sequences dropped."""
        keys = [k for k in self.seqs if k[0] in leases]
        for key in keys:
            del self.seqs[key]
        self.samples.drop_leases(leases)
        for lease in leases:
            self._seen.pop(lease, None)
            self._owner_of.pop(lease, None)
        return len(keys)

    def stale(self, ttl_s: float, now: float | None = None) -> set[str]:
        """Leases not heard from for ttl_s (their gateway died)."""
        now = time.monotonic() if now is None else now
        return {lease for lease, seen in self._seen.items() if now - seen > ttl_s}

    def reset(self) -> None:
        """Every sequence goes (a new chain, or out of the plan); owners and their order stay."""
        self.seqs.clear()
        self.samples.clear()
