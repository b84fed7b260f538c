"""Continuous batching with chunked prefill for one pipeline replica.

`schedule()` builds the next micro-batch (a StepPlan) from sequences not already in flight:
decodes first, then prefill chunks of running sequences, then new admissions, all under a token
budget. `update(plan, sampled)` folds the stages' answer (or their failure) back in. These two
calls are all that execution (gateway/engine.py) asks of it. Several micro-batches are in
flight at once (by default one per stage at least) and, without lookahead, a sequence is in at
most one of them, so each micro-batch takes about 1/inflight of the runnable decodes.

With `lookahead` (async scheduling; see `SchedulerConfig.async_scheduling`) a greedy sequence
whose next token is being sampled by a micro-batch in flight is also decoded in the next one: its
chunk `follows` that sample, which the stage puts in place on the device. Every micro-batch then carries all the
decodes, the stage runs them back to back, and the gateway's round trip hides behind a step (as
vLLM's and SGLang's async schedulers). With `lookahead_depth` k, up to k steps follow one after
the other (a single stage: k = 2). The cost: a sequence that stops on EOS or a stop string
computes up to k tokens more, which are dropped.

What the replica holds of a running sequence is its `Admission` (wire id, block table, progress),
made on admission and dropped on preemption, finish or hand-over; the `Sequence` itself keeps only
the request (gateway/sequence.py). Admissions, and the StepPlan built of their chunks, are defined
in gateway/step_plan.py.

Pure Python: no torch, no grpc. Called from the gateway's event loop only.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass

from stagemesh.config_cli import knob
from stagemesh.errors import NoFreeBlocks, ResourceExhausted

from gateway.block_manager import BlockManager
from gateway.sequence import Sequence, Status
from gateway.step_plan import Admission, ScheduledChunk, StepPlan


@dataclass(frozen=True)
class SchedulerConfig:
    """The batch builder's user knobs (flags of `python -m gateway` and `stagemesh up`); validated here."""

    max_batched_tokens: int = knob(512, "token budget of one micro-batch (bounds a prefill chunk)")
    max_seqs_per_batch: int = 256
    max_running: int = knob(256, "sequences holding KV at once, per replica")
    max_waiting: int = knob(1024, "queue bound; past it requests get RESOURCE_EXHAUSTED")
    # Fewer micro-batches in flight than stages leaves stages idle (measured slower even with four
    # stages time-slicing one GPU, where fewer, larger decode micro-batches read the weights less).
    inflight: int = knob(0, "micro-batches in flight per replica (0: 3 on a single stage with async scheduling, "
                            "stages + 2 on a chain with it, else max(2, stages), following the plan's changes); "
                            "more hides longer hops")
    # On a chain the decodes then wait for their samples to come back through every stage
    # (measured on one H100 shared by 2 / 4 stages: batch-1 decode 1.10x / 1.00x, mixed
    # throughput 0.92x / 0.69x of splitting), so "auto" leaves chains to split decodes across
    # micro-batches that pipeline.
    async_scheduling: str = knob("auto", "send a greedy decode before the sample it follows is back: auto on "
                                         "single-stage replicas, on on every replica (chains: lower batch-1 "
                                         "latency, lower throughput), off never", choices=("auto", "on", "off"))

    def __post_init__(self):
        if self.async_scheduling not in ("auto", "on", "off"):
            raise ValueError(f"async_scheduling must be auto, on or off, got {self.async_scheduling!r}")
        for name in ("max_batched_tokens", "max_seqs_per_batch", "max_running", "max_waiting"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SchedulerConfig.{name} must be positive, got {getattr(self, name)}")
        if self.inflight < 0:
            raise ValueError(f"SchedulerConfig.inflight must be >= 0 (0: auto), got {self.inflight}")


@dataclass(frozen=True)
class StepShape:
    """How one replica's steps are shaped: derived by the engine from the knobs and the replica's
    plan (gateway/engine.py `_install`), never set by users."""

    inflight_target: int = 2  # micro-batches kept in flight (the knob's 0 resolved)
    lookahead: bool = False  # decode greedy sequences again while their sample is in flight
    # How many steps of one sequence may be in flight at once with lookahead, each following the
    # sample of the one before (a single stage keeps every sample on its device; on a chain a
    # follower waits for its sample's answer at the first stage, so chains keep 1).
    lookahead_depth: int = 1
    # Decodes in micro-batches of their own, prefill chunks in others (lookahead on a chain: the
    # decodes' chain of samples then never waits behind a prefill's hidden states on the wire).
    separate_decodes: bool = False

    def __post_init__(self):
        if self.inflight_target < 1:
            raise ValueError("the engine resolves inflight 0 (auto) before building a Scheduler")
        if self.lookahead_depth < 1:
            raise ValueError(f"StepShape.lookahead_depth must be >= 1, got {self.lookahead_depth}")


_WAIT = object()  # Scheduler._fork_source: not yet


class Scheduler:
    """The batch builder of one replica. Execution talks to it through `schedule()` and
    `update(plan, sampled)`; the engine adds and finishes sequences. Event loop only."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, shape: StepShape = StepShape()):
        self.config = config
        self.shape = shape
        self.bm = block_manager
        self._waiting: list[tuple[int, float, int, Sequence]] = []  # heap by (priority, arrival)
        self._tie = itertools.count()
        self._running: dict[int, Admission] = {}  # seq_id -> its admission, in admission order
        self._to_release: list[int] = []  # wire ids the stages should drop
        self.rejected: list[Sequence] = []  # finished by the scheduler itself; drained by the engine
        self.num_preemptions = 0

    # -- queue ---------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def waiting_sequences(self):
        return (e[3] for e in self._waiting)

    def running_sequences(self) -> list[Sequence]:
        """Sequences holding KV here, in admission order."""
        return [a.seq for a in self._running.values()]

    def admission(self, seq: Sequence) -> Admission | None:
        """seq's current admission here (None while it waits or once it left)."""
        return self._running.get(seq.seq_id)

    def tokens_to_run(self) -> int:
        """Tokens the running sequences still have to compute: the rest of their prompts and
        their decodes up to max_tokens (the engine's load estimate for routing)."""
        return sum(a.num_uncomputed + max(0, a.seq.max_tokens - len(a.seq.output_ids)) for a in self._running.values())

    def add(self, seq: Sequence) -> None:
        if len(self._waiting) >= self.config.max_waiting:
            raise ResourceExhausted(
                f"the request queue is full ({self.config.max_waiting} waiting); retry later"
            )
        seq.status = Status.WAITING
        heapq.heappush(self._waiting, (seq.priority, seq.arrival, next(self._tie), seq))

    def add_front(self, seq: Sequence) -> None:
        """Requeue a preempted or handed-over sequence ahead of new arrivals of its priority."""
        seq.status = Status.WAITING
        heapq.heappush(self._waiting, (seq.priority, float("-inf"), next(self._tie), seq))

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._to_release)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (stop condition, cancellation); frees its blocks now, or when its last
        micro-batch in flight returns (the stages still use them)."""
        if seq.status == Status.FINISHED:
            return
        if seq.status == Status.WAITING:
            self._waiting = [e for e in self._waiting if e[3] is not seq]
            heapq.heapify(self._waiting)
            self.bm.free(seq)  # it may have been hashed while it waited
        else:
            adm = self._running.pop(seq.seq_id)
            if not adm.in_flight:
                self._release(adm)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    # -- scheduling ----------------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        """Next micro-batch, or None when nothing can run now."""
        plan = StepPlan()
        budget = self.config.max_batched_tokens
        running = list(self._running.values())
        idle = [a for a in running if not a.in_flight]
        prefills = [a for a in idle if a.is_prefilling]
        if self.shape.lookahead:  # every micro-batch takes every decode
            decodes = [a for a in running if (not a.in_flight and not a.is_prefilling) or self._can_follow(a)]
            share = len(decodes)
        else:
            decodes = [a for a in idle if not a.is_prefilling]
            # Spread decodes across the micro-batches in flight so every stage has work.
            share = math.ceil(len([a for a in running if not a.is_prefilling]) / self.shape.inflight_target)
        for adm in decodes[: max(1, share)]:
            if budget <= 0 or len(plan.chunks) >= self.config.max_seqs_per_batch:
                break
            if adm.seq.status != Status.RUNNING:  # preempted above to make room
                continue
            if adm.in_flight:
                if self._schedule_follow(plan, adm):
                    budget -= 1
            elif self._schedule_chunk(plan, adm, 1):
                budget -= 1
        if self.shape.separate_decodes and plan.chunks:
            budget = 0
        for adm in prefills:
            if budget <= 0 or len(plan.chunks) >= self.config.max_seqs_per_batch:
                break
            if adm.seq.status != Status.RUNNING:  # preempted above to make room
                continue
            take = min(budget, adm.num_uncomputed)
            if self._schedule_chunk(plan, adm, take):
                budget -= take
        budget = self._admit(plan, budget)
        plan.finished_wire_ids, self._to_release = self._to_release, []
        if not plan.chunks and not plan.finished_wire_ids:
            return None
        for c in plan.chunks:
            c.admission.in_flight += 1
        return plan

    def update(self, plan: StepPlan, sampled: dict[int, int] | None) -> list[Sequence]:
        """Fold a returned micro-batch in: `sampled` maps wire id -> token id, or is None when
        the step failed. Returns the sequences that received a token."""
        if sampled is None:
            self._abort(plan)
            return []
        produced = []
        for c in plan.chunks:
            adm, seq = c.admission, c.seq
            adm.in_flight -= 1
            if self._running.get(seq.seq_id) is not adm:  # finished (cancelled) while this micro-batch ran
                if seq.status == Status.FINISHED and not adm.in_flight:
                    self._release(adm)
                continue
            if c.start_pos != adm.num_computed or (c.sample and c.output_index != len(seq.output_ids)):
                continue  # followed a micro-batch that failed: dropped, scheduled again
            adm.num_computed = c.start_pos + c.num_tokens
            if c.is_new and adm.copy is not None:  # the stages copied the forked block: let go of src
                self.bm.drop([adm.copy[0]])
                adm.copy = None
            self.bm.seal_computed_blocks(seq, adm.block_table, adm.num_computed)
            if c.sample:
                seq.output_ids.append(sampled[adm.wire_id])
                produced.append(seq)
        return produced

    def drain_live(self) -> list[Sequence]:
        """Hand over every unfinished sequence (a new plan epoch: the stages' KV is gone, and this
        scheduler's block manager goes with it).

        Running sequences come first, in admission order, then the queue in priority order; each
        will re-prefill from its token history under the new plan, in a new admission.
        """
        live = self.running_sequences() + [e[3] for e in sorted(self._waiting)]
        self._running, self._waiting, self._to_release = {}, [], []
        for seq in live:
            seq.status = Status.WAITING
        return live

    # -- internals -----------------------------------------------------------------------------
    def _abort(self, plan: StepPlan) -> None:
        """A micro-batch failed: its sequences become runnable again (replayed by the engine)."""
        for c in plan.chunks:
            adm = c.admission
            adm.in_flight -= 1
            if self._running.get(c.seq.seq_id) is adm:
                # Some stages may have applied this step's NewSequence or block deltas and others
                # not (a later stage refused it): announce the sequence again, full block table,
                # so every stage holds the same table whatever it saw. A chunk in flight that
                # follows this one's sample is dropped when it returns (update).
                adm.announced = False
                adm.last_sample_index = -1
            elif c.seq.status == Status.FINISHED and not adm.in_flight:
                self._release(adm)  # finished meanwhile (cancelled): the stages drop it
        self._to_release.extend(plan.finished_wire_ids)

    def _schedule_chunk(self, plan: StepPlan, adm: Admission, num_tokens: int) -> bool:
        while True:
            try:
                new_blocks = self.bm.append_slots(adm.block_table, adm.num_computed + num_tokens)
                break
            except NoFreeBlocks:
                if not self._preempt_for(adm, plan):
                    return False
        adm.block_table.extend(new_blocks)
        is_new = not adm.announced
        adm.announced = True
        if is_new and adm.copy is not None:  # again after a failed step: stages may have missed it
            plan.block_copies.append(adm.copy)
        seq = adm.seq
        done = adm.num_computed + num_tokens == seq.num_tokens
        if done:
            adm.last_sample_index = len(seq.output_ids)
        plan.chunks.append(
            ScheduledChunk(
                admission=adm,
                start_pos=adm.num_computed,
                num_tokens=num_tokens,
                new_block_ids=[] if is_new else new_blocks,
                sample=done,
                output_index=len(seq.output_ids),
                is_new=is_new,
            )
        )
        return True

    def _can_follow(self, adm: Admission) -> bool:
        """Whether adm's micro-batches in flight (fewer than lookahead_depth + 1) sample its next
        tokens one after another, and a step after the last one is still wanted (greedy: the
        samples stay on the stage's device)."""
        seq = adm.seq
        return (1 <= adm.in_flight <= self.shape.lookahead_depth
                and adm.last_sample_index == len(seq.output_ids) + adm.in_flight - 1 and adm.announced
                and seq.sampling.plain_greedy and adm.last_sample_index + 1 < seq.max_tokens)

    def _schedule_follow(self, plan: StepPlan, adm: Admission) -> bool:
        """Decode the token that adm's newest micro-batch in flight is sampling (module docstring)."""
        start = adm.seq.num_tokens + adm.in_flight - 1  # where the newest sample in flight goes
        try:
            new_blocks = self.bm.append_slots(adm.block_table, start + 1)
        except NoFreeBlocks:
            return False  # no preemption for a step ahead: it runs when the sample is back
        adm.block_table.extend(new_blocks)
        adm.last_sample_index += 1
        plan.chunks.append(ScheduledChunk(
            admission=adm, start_pos=start, num_tokens=1, new_block_ids=new_blocks,
            sample=True, output_index=adm.last_sample_index, is_new=False, follows=True,
        ))
        return True

    def _admit(self, plan: StepPlan, budget: int) -> int:
        """Admit waiting sequences in priority order while blocks and budget last.

        A sequence whose next prefix block is being computed by a running sequence is passed
        over for now: a step later it reuses those blocks instead of computing them again.
        """
        deferred = []
        while self._waiting and budget > 0 and len(plan.chunks) < self.config.max_seqs_per_batch:
            if len(self._running) >= self.config.max_running:
                break
            seq = self._waiting[0][3]
            source = self._fork_source(seq)
            if source is _WAIT or (source is None and self._running and self.bm.prefix_in_progress(seq)):
                deferred.append(heapq.heappop(self._waiting))
                continue
            if source is not None:
                if not self._fork(plan, seq, source):
                    break
                budget -= 1
                continue
            if not self.bm.can_allocate(seq):
                if not self._running:
                    # Nothing will ever free up: this sequence cannot fit the replica at all.
                    heapq.heappop(self._waiting)
                    self.bm.free(seq)
                    seq.status = Status.FINISHED
                    seq.finish_reason = "error:kv_capacity"
                    self.rejected.append(seq)
                    continue
                break
            heapq.heappop(self._waiting)
            block_table, cached = self.bm.allocate(seq)
            adm = self._running[seq.seq_id] = Admission(seq, block_table, num_computed=cached)
            if seq.first_cached_tokens is None:
                seq.first_cached_tokens = min(cached, len(seq.prompt_ids))
            seq.status = Status.RUNNING
            take = min(budget, adm.num_uncomputed)
            self._schedule_chunk(plan, adm, take)
            budget -= take
        for entry in deferred:
            heapq.heappush(self._waiting, entry)
        return budget

    def _fork_source(self, seq: Sequence):
        """Where a fresh sample of n > 1 comes from: sample 0's admission once it has computed
        the prompt (fork from it), _WAIT while sample 0 is on its way there, None when there is
        nothing to fork (admitted as any sequence: n = 1, a readmission with outputs, sample 0
        gone or on another replica)."""
        lead = seq.fork_of
        if lead is None or seq.output_ids or lead.status == Status.FINISHED:
            return None
        adm = self._running.get(lead.seq_id)
        if adm is not None and adm.num_computed >= len(seq.prompt_ids):
            return adm
        if adm is not None or any(e[3] is lead for e in self._waiting):
            return _WAIT
        return None

    def _fork(self, plan: StepPlan, seq: Sequence, source: Admission) -> bool:
        """Admit `seq` on `source`'s prompt KV: it shares the full blocks, copies the partial one
        and computes only the prompt's last token, whose logits it samples with its own seed
        (vLLM V0's parallel sampling forks after the prompt too, and copies on write)."""
        start = len(seq.prompt_ids) - 1
        try:
            table, copy = self.bm.fork(seq, source.block_table, start)
        except NoFreeBlocks:
            return False
        heapq.heappop(self._waiting)
        adm = self._running[seq.seq_id] = Admission(seq, table, num_computed=start, copy=copy)
        if seq.first_cached_tokens is None:
            seq.first_cached_tokens = start
        seq.status = Status.RUNNING
        self._schedule_chunk(plan, adm, 1)
        return True

    def _preempt_for(self, adm: Admission, plan: StepPlan) -> bool:
        """Free the newest idle admission not in `plan`; its sequence is requeued and recomputed
        from its token history in a new admission."""
        in_plan = {id(c.admission) for c in plan.chunks}
        for victim in reversed(self._running.values()):
            if victim is adm or victim.in_flight or id(victim) in in_plan:
                continue
            del self._running[victim.seq.seq_id]
            self._release(victim)
            self.num_preemptions += 1
            self.add_front(victim.seq)
            return True
        return False

    def _release(self, adm: Admission) -> None:
        if adm.announced:
            self._to_release.append(adm.wire_id)
        self.bm.free(adm.seq, adm.block_table)
        if adm.copy is not None:
            self.bm.drop([adm.copy[0]])
            adm.copy = None
