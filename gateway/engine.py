"""Drives one pipeline replica: keeps micro-batches in flight through its stage chain.

Data flow: `submit()` queues a Sequence in the replica's Scheduler; the loop asks the scheduler
for micro-batches while fewer than `inflight_target` are in flight and sends each to stage 0 as a
Forward (token ids + block-table deltas). When the sampled ids come back up the chain,
`Scheduler.update` appends them and the request's `TokenSink` streams them out.

A returned step's next micro-batch goes out before the clients hear of its tokens: the Forward
call that takes its slot is made while the gateway's `Outbox` (gateway/outbox.py) holds the
sinks' deltas. Answers already back when a step is applied are applied first; the last of them
refills, as before.

Runs on the gateway's event loop only; the scheduler and block manager are never touched from
another thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

import grpc

from stagemesh import metrics
from stagemesh.net import GRPC_OPTIONS
from stagemesh.sampling import SamplingSpec
from stagemesh.security import channel as secure_channel
from stagemesh.v1 import stagemesh_pb2 as pb
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc

from gateway.block_manager import BlockManager, CacheEvents
from gateway.outbox import Outbox
from gateway.scheduler import Scheduler, SchedulerConfig, StepShape
from gateway.sequence import Sequence, Status
from gateway.step_plan import StepPlan


# A single stage with async scheduling runs a decode up to this many steps ahead of its answers
# (measured on an H100, mixed workload: 4,887 -> 5,233 tok/s at 2 against 1, GPU idle between
# steps 0.59 -> 0.35 s of ~7; 3 gained nothing measurable and drops more tokens at a stop).
SINGLE_STAGE_DEPTH = 2


def inflight_for(configured: int, num_stages: int, lookahead: bool, separate_decodes: bool) -> int:
    """Micro-batches in flight on a replica: as configured, or (0) enough to keep every stage busy.
    A single stage with async scheduling keeps one per step of its lookahead plus the step they
    follow; the decodes' own chain (async scheduling on a chain) holds two slots more."""
    if separate_decodes:  # decodes and their followers hold two slots: prefills need a third
        return max(configured, 3) if configured else num_stages + 2
    if configured:
        return configured
    if lookahead and num_stages == 1:
        return SINGLE_STAGE_DEPTH + 1
    return max(2, num_stages)


def lookahead_depth_for(inflight: int, num_stages: int) -> int:
    """Steps a decode may run ahead of its answers: on a single stage as many as the micro-batches
    in flight allow, up to SINGLE_STAGE_DEPTH; on a chain one (its samples come back by answer)."""
    return min(SINGLE_STAGE_DEPTH, max(1, inflight - 1)) if num_stages == 1 else 1


class TokenSink(Protocol):
    """Receives a sequence's progress; implemented by the request handler."""

    def on_tokens(self, seq: Sequence) -> str | None:
        """New output ids were appended; returns a finish reason to stop the sequence, or None."""

    def on_finish(self, seq: Sequence) -> None:
        """The sequence ended (finish_reason set)."""


@dataclass(frozen=True)
class ReplicaPlan:
    """What the gateway needs to drive one replica: its first stage, capacity and epoch."""

    index: int
    epoch: int
    first_address: str
    num_blocks: int
    block_size: int
    num_stages: int


_last_order = 0


def next_lease_order() -> int:
    """Strictly increasing within this process and, through the wall clock, across its restarts:
    a restarted gateway's leases supersede the ones of the process before it."""
    global _last_order
    _last_order = max(time.time_ns(), _last_order + 1)
    return _last_order


class ReplicaEngine:
    def __init__(self, plan: ReplicaPlan, model_id: str, sched_config: SchedulerConfig, log,
                 forward_timeout_s: float = 120.0, on_cache_events=None, on_stale_epoch=None,
                 on_stage_failure=None, tls=None, owner: str = "", outbox: Outbox | None = None):
        self.plan = plan
        self.outbox = outbox or Outbox()  # where this replica's sinks post their clients' deltas
        self.tls = tls  # TlsConfig of the link to the first stage (mutual TLS); None: plaintext
        self.model_id = model_id
        self.log = log.bind(replica=plan.index)
        self.forward_timeout_s = forward_timeout_s
        self.sched_config = sched_config
        # KV on the stages belongs to a lease: a new one per chain generation, owned by this
        # gateway's stable identity and replica, so a stage drops the older generations' (and an
        # earlier process's) sequences as soon as it sees the newer lease (stage_worker/executor.py).
        self.owner = f"{owner or uuid.uuid4().hex[:12]}/r{plan.index}"
        self.lease_id = ""
        self.lease_order = 0
        self.sinks: dict[int, TokenSink] = {}
        # KV blocks each queued request is expected to add here (the router's estimate, for load).
        self._expected_blocks: dict[int, int] = {}
        self._on_cache_events = on_cache_events
        self._on_stale_epoch = on_stale_epoch
        self._on_stage_failure = on_stage_failure  # nudges the plan watcher to poll now
        self._stall_start: float | None = None  # start of the current pause: a refused step, or a replan
        self._debug = log.is_enabled_for(logging.DEBUG)  # per-step debug lines cost a list build
        self._wakeup = asyncio.Event()
        self.generation = 0  # bumps when the replica's KV is reset (new chain): old steps are void
        self._inflight: dict[int, int] = {}  # generation -> micro-batches in flight
        # Answers are applied in the order their steps were sent (a decode may follow the sample
        # of the step before it): each step waits for this future of the step sent before it.
        self._last_sent: asyncio.Future | None = None
        self._step_id = 0
        self._answered = 0  # steps whose answer is back, waiting for the one before to be applied
        self._task: asyncio.Task | None = None
        self._closed = False
        self._failures = 0
        self._install(plan)

    # -- public API ----------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        self._closed = True
        self._wakeup.set()
        if self._task:
            await asyncio.gather(self._task, return_exceptions=True)
        await self._channel.close()

    def submit(self, seq: Sequence, sink: TokenSink, expected_blocks: int = 0) -> None:
        """Queue `seq`; `expected_blocks`: the KV blocks the router expects it to add here."""
        self.scheduler.add(seq)  # raises ResourceExhausted when the queue is full
        self.sinks[seq.seq_id] = sink
        self._expected_blocks[seq.seq_id] = expected_blocks
        self._wakeup.set()

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Client went away: stop the sequence and free its blocks (now, or when its step returns)."""
        if seq.status != Status.FINISHED:
            self._finish(seq, reason)
            self._wakeup.set()

    @property
    def active_blocks(self) -> int:
        """Load for routing, in blocks of work still to do on this replica.

        A waiting sequence counts the blocks it will add beyond its shared prefix (the router's
        estimate); a running one counts what it has left to prefill and to decode. Blocks of a
        prefix that is already cached cost nothing, so a replica holding popular prefixes is
        not "loaded" by them.
        """
        sched = self.scheduler
        waiting = sum(self._expected_blocks.get(s.seq_id, 0) for s in sched.waiting_sequences())
        return -(-sched.tokens_to_run() // sched.bm.block_size) + waiting

    @property
    def replica_id(self) -> str:
        """Name of this replica's KV in the global index; a new plan gives a new name."""
        return f"{self.model_id}/{self.lease_id}/r{self.plan.index}g{self.generation}"

    def set_epoch(self, epoch: int) -> None:
        """A new plan that leaves this replica's chain as it was: keep KV, stamp the new epoch."""
        self.plan = dataclasses.replace(self.plan, epoch=epoch)
        self._wakeup.set()

    def replan(self, plan: ReplicaPlan) -> int:
        """A new chain: every live sequence re-prefills on the new stages from its token history.

        Returns the number of sequences replayed. Their streams continue where they were: tokens
        are only ever appended, so the client sees no gap and no duplicate.
        """
        old_channel = self._channel
        live = self.scheduler.num_running + self.scheduler.num_waiting
        if self._stall_start is None and live:  # the pause runs until the first step on the new chain
            self._stall_start = time.perf_counter()
        self._install(plan, keep=self.scheduler)
        asyncio.get_running_loop().create_task(old_channel.close())
        self.log.info("replica_replanned", epoch=plan.epoch, replayed=live)
        self._wakeup.set()
        return live

    def stalled_s(self) -> float:
        """How long this replica has gone without a good step while it has work (0: it is not stalled)."""
        return 0.0 if self._stall_start is None else time.perf_counter() - self._stall_start

    def fail_all(self, reason: str) -> int:
        """End every live sequence with `reason` (its stream ends with that finish reason)."""
        live = self.scheduler.running_sequences() + list(self.scheduler.waiting_sequences())
        for seq in live:
            self._finish(seq, reason)
        self._wakeup.set()
        return len(live)

    def adopt(self, handed_over) -> None:
        """Take over sequences of a replica that left the plan (re-prefilled here), as `surrender`
        hands them: (sequence, sink, expected blocks)."""
        for seq, sink, expected in handed_over:
            self.scheduler.add_front(seq)
            self.sinks[seq.seq_id] = sink
            self._expected_blocks[seq.seq_id] = expected
        self._wakeup.set()

    def surrender(self):
        """Hand every live sequence (with its sink and expected blocks) over; this engine is being retired."""
        return [(seq, self.sinks.pop(seq.seq_id), self._expected_blocks.pop(seq.seq_id, 0))
                for seq in self.scheduler.drain_live() if seq.seq_id in self.sinks]

    # -- internals -----------------------------------------------------------------------------
    def _install(self, plan: ReplicaPlan, keep: Scheduler | None = None) -> None:
        self.plan = plan
        self.generation += 1
        self.lease_id, self.lease_order = uuid.uuid4().hex[:12], next_lease_order()
        self._channel = secure_channel(plan.first_address, self.tls, options=GRPC_OPTIONS)
        self._stub = pb_grpc.StageStub(self._channel)
        self._announce()
        mode = self.sched_config.async_scheduling
        lookahead = mode == "on" or (mode == "auto" and plan.num_stages == 1)
        separate = lookahead and plan.num_stages > 1
        inflight = inflight_for(self.sched_config.inflight, plan.num_stages, lookahead, separate)
        shape = StepShape(inflight_target=inflight, lookahead=lookahead,
                          lookahead_depth=lookahead_depth_for(inflight, plan.num_stages), separate_decodes=separate)
        self._last_sent = None  # a new chain's answers need not wait for the old one's
        bm = BlockManager(plan.num_blocks, plan.block_size, self.model_id)
        self._preemptions_seen = 0  # a new scheduler counts from zero
        if keep is None:
            self.scheduler = Scheduler(self.sched_config, bm, shape)
            return
        metrics.REPLAYS.inc(keep.num_running)  # their KV is gone: re-prefilled from their history
        self.scheduler = Scheduler(self.sched_config, bm, shape)
        for seq in keep.drain_live():
            self.scheduler.add_front(seq)

    def _announce(self) -> None:
        """Tell the new chain's stages about the new lease at once (its first Forward would too, but
        an idle replica sends none): each frees this owner's older leases, e.g. the KV of a chain
        generation this replaced, or of this gateway's previous process."""
        req = pb.ReleaseRequest(lease_id=self.lease_id, lease_owner=self.owner, lease_order=self.lease_order,
                                supersede_only=True)

        async def send(stub=self._stub):
            try:
                await stub.Release(req, timeout=10)
            except grpc.aio.AioRpcError as exc:  # a chain that is not up yet: Forwards carry the lease too
                self.log.info("lease_announce_failed", code=exc.code().name)

        try:
            self._announcing = asyncio.get_running_loop().create_task(send())  # held: a bare task may be collected
        except RuntimeError:  # no event loop (a unit test builds the engine outside one)
            pass

    async def _loop(self) -> None:
        while not self._closed:
            self._wakeup.clear()
            self._fill()
            await self._wakeup.wait()

    def _fill(self, answered_at: float | None = None) -> None:
        """Send micro-batches while fewer than the target are in flight and the scheduler has one
        (answered_at: when the step whose slot they take began to be applied). The call is made
        here, not in the step's task: inside an Outbox hold, so the RPC's own tasks are queued
        before the clients' deltas are handed over."""
        while not self._closed and self._inflight.get(self.generation, 0) < self.scheduler.shape.inflight_target:
            plan = self.scheduler.schedule()
            for seq in self.scheduler.rejected:
                self._finish(seq, seq.finish_reason or "error")
            self.scheduler.rejected.clear()
            if plan is None:
                return
            gen = self.generation
            self._inflight[gen] = self._inflight.get(gen, 0) + 1
            prev, self._last_sent = self._last_sent, asyncio.get_running_loop().create_future()
            # Built now: the next plan may already append blocks to these sequences' tables.
            req = self._request(plan)
            sent_at = time.perf_counter()
            call = self._stub.Forward(req, timeout=self.forward_timeout_s)
            if answered_at is not None:
                metrics.TURNAROUND.observe(sent_at - answered_at)
                answered_at = None  # one slot was freed: the steps after it are sent for other reasons
            asyncio.get_running_loop().create_task(self._run_step(plan, call, gen, prev, self._last_sent, sent_at))

    def _request(self, plan: StepPlan) -> pb.ForwardRequest:
        self._step_id += 1
        # The one place a step meets its requests: stages log lease and step ids, not request ids.
        if self._debug:
            self.log.debug("step_sent", lease_id=self.lease_id, step_id=self._step_id, epoch=self.plan.epoch,
                           request_ids=[c.seq.request_id for c in plan.chunks])
        req = build_forward_request(plan, self.plan.epoch, self.lease_id, self._step_id)
        req.lease_owner, req.lease_order = self.owner, self.lease_order
        return req

    async def _run_step(self, plan: StepPlan, call, generation: int, prev: asyncio.Future | None,
                        applied: asyncio.Future, sent_at: float) -> None:
        try:
            error = None
            try:
                resp = await call
            except grpc.aio.AioRpcError as exc:
                error = exc
            self._answered += 1
            try:
                if prev is not None:
                    await prev  # the step sent before this one is applied first
            finally:
                self._answered -= 1
            if error is not None:
                await self._step_failed(plan, generation, error)  # backs off before the slot frees
            else:
                with self.outbox.hold():  # the clients hear of these tokens after the next step is sent
                    answered_at = time.perf_counter()
                    self._apply(plan, generation, resp, sent_at)
                    self._free_slot(generation, applied)
                    if not self._answered:  # answers already back are applied first (their EOS
                        self._fill(answered_at)  # and stops known), the last of them refills
        finally:
            self._free_slot(generation, applied)

    def _free_slot(self, generation: int, applied: asyncio.Future) -> None:
        """A returned step's slot (once): the next step may apply, the loop may send another."""
        if applied.done():
            return
        applied.set_result(None)
        self._inflight[generation] -= 1
        if generation != self.generation and not self._inflight[generation]:
            del self._inflight[generation]  # the last step of a replaced chain is back
        self._wakeup.set()

    def _apply(self, plan: StepPlan, generation: int, resp: pb.ForwardResponse, t0: float) -> None:
        if generation != self.generation:
            return  # the chain changed meanwhile: these sequences were re-queued for replay
        self._failures = 0
        if self._stall_start is not None:  # first good step after a refusal: the pause is over
            pause_ms = (time.perf_counter() - self._stall_start) * 1e3
            self._stall_start = None
            self.log.info("replica_resumed", pause_ms=round(pause_ms, 1), epoch=self.plan.epoch)
        sampled = {s.seq_id: s.token_id for s in resp.samples}
        keep_logprobs(plan, resp)  # before update: a sequence may finish on the token they go with
        for seq in self.scheduler.update(plan, sampled):
            sink = self.sinks.get(seq.seq_id)
            reason = sink.on_tokens(seq) if sink else None
            if reason:
                self._finish(seq, reason)
        self._publish_cache_events()
        self._observe(plan, resp, t0)

    async def _step_failed(self, plan: StepPlan, generation: int, exc: grpc.aio.AioRpcError) -> None:
        """A micro-batch failed. Its sequences run again (KV writes are idempotent per slot);
        a dead stage is replaced by the coordinator and the new plan replays them. Only a batch
        the stages refuse as malformed fails its requests."""
        if generation != self.generation:
            return
        self.scheduler.update(plan, None)  # its sequences become runnable again
        if self._stall_start is None:
            self._stall_start = time.perf_counter()
        code = exc.code()
        self._failures += 1
        self.log.warning("step_failed", code=code.name, detail=exc.details(), failures=self._failures)
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
            for c in plan.chunks:
                self._finish(c.seq, f"error:{code.name.lower()}")
            return
        if code == grpc.StatusCode.ABORTED:
            return  # it followed a step that failed: both run again
        if code == grpc.StatusCode.FAILED_PRECONDITION and self._on_stale_epoch:
            await self._on_stale_epoch()
            return
        # UNAVAILABLE / DEADLINE_EXCEEDED / CANCELLED: wait for the plan to change, then retry.
        if self._on_stage_failure:
            self._on_stage_failure(self.plan.index, self.plan.epoch, f"{code.name}: {exc.details()}")
        await asyncio.sleep(min(0.02 * 2 ** self._failures, 1.0))

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self._expected_blocks.pop(seq.seq_id, None)
        sink = self.sinks.pop(seq.seq_id, None)
        if sink:
            sink.on_finish(seq)

    def _observe(self, plan: StepPlan, resp: pb.ForwardResponse, t0: float) -> None:
        """Metrics of a returned step. The scheduler stays pure: its counters are read here."""
        rtt_s = time.perf_counter() - t0
        compute_s = sum(resp.stage_compute_us) / 1e6
        # What is not compute is wire, (de)serialisation and waiting for a busy stage, per hop.
        metrics.HOP.observe(max(0.0, rtt_s - compute_s) / max(1, self.plan.num_stages))
        sched, replica = self.scheduler, str(self.plan.index)
        metrics.QUEUE_DEPTH.labels(replica).set(sched.num_waiting)
        metrics.RUNNING.labels(replica).set(sched.num_running)
        metrics.KV_USED.labels(replica).set(sched.bm.num_blocks - sched.bm.num_free)
        metrics.KV_FREE.labels(replica).set(sched.bm.num_free)
        if sched.num_preemptions > self._preemptions_seen:
            metrics.REPLAYS.inc(sched.num_preemptions - self._preemptions_seen)
            self._preemptions_seen = sched.num_preemptions
        if self._debug:
            self.log.debug("step", tokens=plan.num_tokens, seqs=len(plan.chunks), ms=round(rtt_s * 1e3, 3),
                           compute_us=list(resp.stage_compute_us))

    def _publish_cache_events(self) -> None:
        events: CacheEvents = self.scheduler.bm.drain_events()
        if self._on_cache_events and (events.stored or events.removed):
            self._on_cache_events(self.plan.index, events)


def keep_logprobs(plan: StepPlan, resp: pb.ForwardResponse) -> None:
    """Log-probabilities of a returned step onto its sequences: a sampled token's goes with the
    output id it belongs to (appended by Scheduler.update right after), prompt ones into their
    positions (a re-prefill after a fault writes the same values again)."""
    by_wire = {c.wire_id: c for c in plan.chunks}
    for s in resp.samples:
        c = by_wire.get(s.seq_id)
        if c is None or not s.HasField("logprob") or c.output_index != len(c.seq.output_ids):
            continue
        del c.seq.output_logprobs[c.output_index:]
        c.seq.output_logprobs.append(s.logprob)
    for p in resp.prompt_logprobs:
        c = by_wire.get(p.seq_id)
        if c is None or c.seq.prompt_logprobs is None:
            continue
        slots = c.seq.prompt_logprobs
        for i, entry in enumerate(p.logprobs):
            if 0 < p.start_pos + i < len(slots):
                slots[p.start_pos + i] = entry


def sampling_params(s: SamplingSpec) -> pb.SamplingParams:
    """A SamplingSpec on a stage's wire. Its stop tokens (the gateway added EOS to them) go only
    with min_tokens: the stage masks them, the gateway stops on them."""
    sp = pb.SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
                           presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                           min_tokens=s.min_tokens, logit_bias=dict(s.logit_bias),
                           stop_token_ids=s.stop_token_ids if s.min_tokens else ())
    for name in ("seed", "logprobs", "prompt_logprobs"):
        if getattr(s, name) is not None:
            setattr(sp, name, getattr(s, name))
    if s.repetition_penalty != 1.0:
        sp.repetition_penalty = s.repetition_penalty
    if s.grammar is not None:
        s.grammar.to_wire(sp.grammar)
    return sp


def _new_sequence(req: pb.ForwardRequest, c) -> None:
    seq, s = c.seq, c.seq.sampling
    sampling = sampling_params(s)
    if s.prompt_logprobs is not None and (seq.prompt_logprobs is None or None in seq.prompt_logprobs[1:]):
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None] * len(seq.prompt_ids)
    else:
        sampling.ClearField("prompt_logprobs")  # computed already (a readmission): not again
    ns = req.new_sequences.add(seq_id=c.wire_id, block_ids=c.admission.block_table, sampling=sampling)
    # A replayed constrained sequence: the last stage advances its grammar over the outputs.
    if s.needs_history or sampling.HasField("prompt_logprobs") or (s.grammar is not None and seq.output_ids):
        ns.history_ids.extend(seq.all_ids)
        ns.num_prompt_tokens = len(seq.prompt_ids)


def build_forward_request(plan: StepPlan, epoch: int, lease_id: str, step_id: int) -> pb.ForwardRequest:
    """The wire form of a micro-batch: token ids, block-table deltas, sampling of new sequences."""
    req = pb.ForwardRequest(
        epoch=epoch, lease_id=lease_id, step_id=step_id, finished_seq_ids=plan.finished_wire_ids,
        token_ids=plan.token_ids(),
    )
    for src, dst in plan.block_copies:
        req.block_copies.add(src_block_id=src, dst_block_id=dst)
    for c in plan.chunks:
        if c.is_new:
            _new_sequence(req, c)
        req.chunks.add(
            seq_id=c.wire_id, start_pos=c.start_pos, num_tokens=c.num_tokens,
            new_block_ids=c.new_block_ids, sample=c.sample, output_index=c.output_index,
            follows_sample=c.follows,
        )
    return req
