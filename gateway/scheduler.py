"""Continuous batching with chunked prefill for one pipeline replica.

`schedule()` builds the next micro-batch (a StepPlan) from sequences not already in flight:
decodes first, then prefill chunks of running sequences, then new admissions, all under a token
budget. `update(plan, sampled)` folds the stages' answer back in. Several micro-batches are in
flight at once (by default one per stage at least) and, without lookahead, a sequence is in at
most one of them, so each micro-batch takes about 1/inflight of the runnable decodes.

With `lookahead` (async scheduling; see `SchedulerConfig.async_scheduling`) a greedy sequence
whose next token is being sampled by a micro-batch in flight is also decoded in the next one: its
chunk `follows` that sample, which the stage puts in place on the device. Every micro-batch then carries all the
decodes, the stage runs them back to back, and the gateway's round trip hides behind a step (as
vLLM's and SGLang's async schedulers). With `lookahead_depth` k, up to k steps follow one after
the other (a single stage: k = 2). The cost: a sequence that stops on EOS or a stop string
computes up to k tokens more, which are dropped.

Pure Python: no torch, no grpc. Called from the gateway's event loop only.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field

from stagemesh.errors import NoFreeBlocks, ResourceExhausted

from gateway.block_manager import BlockManager
from gateway.sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    """Knobs of the batch builder; validated at construction."""

    max_batched_tokens: int = 512  # token budget of one micro-batch (prefill chunk size bound)
    max_seqs_per_batch: int = 256
    max_running: int = 256  # sequences holding KV at once
    max_waiting: int = 1024  # queue bound: past it, RESOURCE_EXHAUSTED
    # Micro-batches kept in flight. 0 (the gateway's default): the engine's inflight_for (3 on a
    # single stage with async scheduling, else max(2, stages) of the replica's plan). Fewer than
    # the stages leaves stages idle (measured slower even with four stages time-slicing one GPU,
    # where fewer, larger decode micro-batches read the weights less).
    inflight_target: int = 2
    # Async scheduling: "auto" on single-stage replicas, "on" on every replica, "off" never. The
    # engine turns it into `lookahead` per replica. On a chain the decodes then wait for their
    # samples to come back through every stage (measured on one H100 shared by 2 / 4 stages:
    # batch-1 decode 1.10x / 1.00x, mixed throughput 0.92x / 0.69x of splitting), so "auto"
    # leaves chains to split decodes across micro-batches that pipeline.
    async_scheduling: str = "auto"
    lookahead: bool = False  # decode greedy sequences again while their sample is in flight
    # How many steps of one sequence may be in flight at once with lookahead, each following the
    # sample of the one before (a single stage keeps every sample on its device; on a chain a
    # follower waits for its sample's answer at the first stage, so chains keep 1).
    lookahead_depth: int = 1
    # Decodes in micro-batches of their own, prefill chunks in others (lookahead on a chain: the
    # decodes' chain of samples then never waits behind a prefill's hidden states on the wire).
    separate_decodes: bool = False

    def __post_init__(self):
        if self.async_scheduling not in ("auto", "on", "off"):
            raise ValueError(f"async_scheduling must be auto, on or off, got {self.async_scheduling!r}")
        for name in ("max_batched_tokens", "max_seqs_per_batch", "max_running", "max_waiting"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SchedulerConfig.{name} must be positive, got {getattr(self, name)}")
        if self.lookahead_depth < 1:
            raise ValueError(f"SchedulerConfig.lookahead_depth must be >= 1, got {self.lookahead_depth}")
        if self.inflight_target < 0:
            raise ValueError(f"SchedulerConfig.inflight_target must be >= 0 (0: auto), got {self.inflight_target}")


@dataclass
class ScheduledChunk:
    seq: Sequence
    wire_id: int
    start_pos: int
    num_tokens: int
    new_block_ids: list[int]
    sample: bool
    output_index: int
    is_new: bool  # first chunk of this admission: the stages get the full block table
    follows: bool = False  # the token is the sample of the micro-batch in flight before (lookahead)


@dataclass
class StepPlan:
    """One micro-batch: what the stages run and which stale sequences they drop."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    finished_wire_ids: list[int] = field(default_factory=list)

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


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        if config.inflight_target < 1:
            raise ValueError("the engine resolves inflight_target 0 (auto) before building a Scheduler")
        self.config = config
        self.bm = block_manager
        self._waiting: list[tuple[int, float, int, Sequence]] = []  # heap by (priority, arrival)
        self._tie = itertools.count()
        self.running: list[Sequence] = []  # admission order
        self._to_release: list[int] = []  # wire ids the stages should drop
        self.rejected: list[Sequence] = []  # finished by the scheduler itself; drained by the engine
        self.num_preemptions = 0

    # -- queue ---------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def waiting_sequences(self):
        return (e[3] for e in self._waiting)

    def add(self, seq: Sequence) -> None:
        if len(self._waiting) >= self.config.max_waiting:
            raise ResourceExhausted(
                f"the request queue is full ({self.config.max_waiting} waiting); retry later"
            )
        seq.status = Status.WAITING
        heapq.heappush(self._waiting, (seq.priority, seq.arrival, next(self._tie), seq))

    def has_work(self) -> bool:
        return bool(self._waiting or self.running or self._to_release)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (stop condition, cancellation); frees its blocks now."""
        if seq.status == Status.FINISHED:
            return
        if seq.status == Status.WAITING:
            self._waiting = [e for e in self._waiting if e[3] is not seq]
            heapq.heapify(self._waiting)
        else:
            self.running.remove(seq)
            if not seq.in_flight:  # else: released when its micro-batch returns (stages still use the blocks)
                self._release(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    # -- scheduling ----------------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        """Next micro-batch, or None when nothing can run now."""
        plan = StepPlan()
        budget = self.config.max_batched_tokens
        idle = [s for s in self.running if not s.in_flight]
        prefills = [s for s in idle if s.is_prefilling]
        if self.config.lookahead:  # every micro-batch takes every decode
            decodes = [s for s in self.running if (not s.in_flight and not s.is_prefilling) or self._can_follow(s)]
            share = len(decodes)
        else:
            decodes = [s for s in idle if not s.is_prefilling]
            # Spread decodes across the micro-batches in flight so every stage has work.
            share = math.ceil(len([s for s in self.running if not s.is_prefilling]) / self.config.inflight_target)
        for seq in decodes[: max(1, share)]:
            if budget <= 0 or len(plan.chunks) >= self.config.max_seqs_per_batch:
                break
            if seq.status != Status.RUNNING:  # preempted above to make room
                continue
            if seq.in_flight:
                if self._schedule_follow(plan, seq):
                    budget -= 1
            elif self._schedule_chunk(plan, seq, 1):
                budget -= 1
        if self.config.separate_decodes and plan.chunks:
            budget = 0
        for seq in prefills:
            if budget <= 0 or len(plan.chunks) >= self.config.max_seqs_per_batch:
                break
            if seq.status != Status.RUNNING:  # preempted above to make room
                continue
            take = min(budget, seq.num_uncomputed)
            if self._schedule_chunk(plan, seq, take):
                budget -= take
        budget = self._admit(plan, budget)
        plan.finished_wire_ids, self._to_release = self._to_release, []
        if not plan.chunks and not plan.finished_wire_ids:
            return None
        for c in plan.chunks:
            c.seq.in_flight += 1
        return plan

    def update(self, plan: StepPlan, sampled: dict[int, int]) -> list[Sequence]:
        """Apply a finished micro-batch; returns sequences that received a token (by wire id)."""
        produced = []
        for c in plan.chunks:
            seq = c.seq
            seq.in_flight -= 1
            if seq.status == Status.FINISHED and seq.wire_id == c.wire_id and seq.block_table and not seq.in_flight:
                self._release(seq)  # finished (cancelled) while this micro-batch ran
            if seq.status != Status.RUNNING or seq.wire_id != c.wire_id:
                continue
            if c.start_pos != seq.num_computed or (c.sample and c.output_index != len(seq.output_ids)):
                continue  # followed a micro-batch that failed: dropped, scheduled again
            seq.num_computed = c.start_pos + c.num_tokens
            self.bm.seal_computed_blocks(seq)
            if c.sample:
                seq.output_ids.append(sampled[seq.wire_id])
                produced.append(seq)
        return produced

    def abort_in_flight(self, plan: StepPlan) -> None:
        """A micro-batch failed: its sequences become runnable again (replayed by the caller)."""
        for c in plan.chunks:
            c.seq.in_flight -= 1
            if c.seq.status == Status.FINISHED and c.seq.block_table:
                if not c.seq.in_flight:
                    self._release(c.seq)  # finished meanwhile (cancelled): the stages drop it
            elif c.seq.wire_id == c.wire_id:
                # Some stages may have applied this step's NewSequence or block deltas and others
                # not (a later stage refused it): announce the sequence again, full block table,
                # so every stage holds the same table whatever it saw. A chunk in flight that
                # follows this one's sample is dropped when it returns (update).
                c.seq.announced = False
                c.seq.last_sample_index = -1
        self._to_release.extend(plan.finished_wire_ids)

    def drain_live(self) -> list[Sequence]:
        """Hand over every unfinished sequence (a new plan epoch: the stages' KV is gone).

        Running sequences come first, in admission order, then the queue in priority order; each
        will re-prefill from its token history under the new plan.
        """
        live = list(self.running) + [e[3] for e in sorted(self._waiting)]
        self.running, self._waiting, self._to_release = [], [], []
        for seq in live:
            seq.in_flight = 0
            seq.last_sample_index = -1
            seq.block_table = []
            seq.num_computed = 0
            seq.status = Status.WAITING
        return live

    # -- internals -----------------------------------------------------------------------------
    def _schedule_chunk(self, plan: StepPlan, seq: Sequence, num_tokens: int) -> bool:
        while True:
            try:
                new_blocks = self.bm.append_slots(seq, num_tokens)
                break
            except NoFreeBlocks:
                if not self._preempt_for(seq, plan):
                    return False
        is_new = not seq.announced
        seq.announced = True
        done = seq.num_computed + num_tokens == seq.num_tokens
        if done:
            seq.last_sample_index = len(seq.output_ids)
        plan.chunks.append(
            ScheduledChunk(
                seq=seq,
                wire_id=seq.wire_id,
                start_pos=seq.num_computed,
                num_tokens=num_tokens,
                new_block_ids=[] if is_new else new_blocks,
                sample=done,
                output_index=len(seq.output_ids),
                is_new=is_new,
            )
        )
        return True

    def _can_follow(self, seq: Sequence) -> bool:
        """Whether seq's micro-batches in flight (fewer than lookahead_depth + 1) sample its next
        tokens one after another, and a step after the last one is still wanted (greedy: the
        samples stay on the stage's device)."""
        return (1 <= seq.in_flight <= self.config.lookahead_depth
                and seq.last_sample_index == len(seq.output_ids) + seq.in_flight - 1 and seq.announced
                and seq.sampling.greedy and seq.last_sample_index + 1 < seq.max_tokens)

    def _schedule_follow(self, plan: StepPlan, seq: Sequence) -> bool:
        """Decode the token that seq's newest micro-batch in flight is sampling (module docstring)."""
        start = seq.num_tokens + seq.in_flight - 1  # where the newest sample in flight goes
        try:
            new_blocks = self.bm.append_slots(seq, 1, start=start)
        except NoFreeBlocks:
            return False  # no preemption for a step ahead: it runs when the sample is back
        seq.last_sample_index += 1
        plan.chunks.append(ScheduledChunk(
            seq=seq, wire_id=seq.wire_id, start_pos=start, num_tokens=1, new_block_ids=new_blocks,
            sample=True, output_index=seq.last_sample_index, is_new=False, follows=True,
        ))
        return True

    def _admit(self, plan: StepPlan, budget: int) -> int:
        """Admit waiting sequences in priority order while blocks and budget last.

        A sequence whose next prefix block is being computed by a running sequence is passed
        over for now: a step later it reuses those blocks instead of computing them again.
        """
        deferred = []
        while self._waiting and budget > 0 and len(plan.chunks) < self.config.max_seqs_per_batch:
            if len(self.running) >= self.config.max_running:
                break
            entry = self._waiting[0]
            seq = entry[3]
            if self.running and self.bm.prefix_in_progress(seq):
                deferred.append(heapq.heappop(self._waiting))
                continue
            if not self.bm.can_allocate(seq):
                if not self.running:
                    # Nothing will ever free up: this sequence cannot fit the replica at all.
                    heapq.heappop(self._waiting)
                    seq.status = Status.FINISHED
                    seq.finish_reason = "error:kv_capacity"
                    self.rejected.append(seq)
                    continue
                break
            heapq.heappop(self._waiting)
            seq.new_admission()
            cached = self.bm.allocate(seq)
            if not seq.admitted_once:
                seq.num_cached_tokens = min(cached, len(seq.prompt_ids))
                seq.admitted_once = True
            seq.status = Status.RUNNING
            self.running.append(seq)
            take = min(budget, seq.num_uncomputed)
            self._schedule_chunk(plan, seq, take)
            budget -= take
        for entry in deferred:
            heapq.heappush(self._waiting, entry)
        return budget

    def _preempt_for(self, seq: Sequence, plan: StepPlan) -> bool:
        """Free the newest idle sequence not in `plan` (recomputed later from its history)."""
        in_plan = {id(c.seq) for c in plan.chunks}
        for victim in reversed(self.running):
            if victim is seq or victim.in_flight or id(victim) in in_plan:
                continue
            self.running.remove(victim)
            self._release(victim)
            victim.new_admission()  # recomputed from its token history when re-admitted
            self.num_preemptions += 1
            self.add_front(victim)
            return True
        return False

    def add_front(self, seq: Sequence) -> None:
        """Requeue a preempted sequence ahead of new arrivals of its priority."""
        seq.status = Status.WAITING
        heapq.heappush(self._waiting, (seq.priority, float("-inf"), next(self._tie), seq))

    def _release(self, seq: Sequence) -> None:
        if seq.announced:
            self._to_release.append(seq.wire_id)
        self.bm.free(seq)
