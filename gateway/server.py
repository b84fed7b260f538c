"""The public Generation service: validate, tokenize, route to a replica, stream tokens back.

One `Gateway` per process holds the plan (from the coordinator) and one ReplicaEngine per
replica. Each Generate call owns a `RequestStream`, the engine's TokenSink for that sequence: the
engine pushes progress into its queue from the event loop and the handler drains it.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
import uuid
from pathlib import Path

import grpc
from structlog.contextvars import bound_contextvars

from stagemesh import metrics
from stagemesh.errors import Unavailable
from stagemesh.finish import copy_finish, finish_text, set_finish
from stagemesh.grpc_status import grpc_errors
from stagemesh.model_config import ModelConfig
from stagemesh.security import channel as secure_channel
from stagemesh.v1 import stagemesh_pb2 as pb
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc

from gateway.auth import ApiKeyAuth
from gateway.config import GatewayConfig
from gateway.engine import ReplicaEngine, ReplicaPlan
from gateway.outbox import Outbox
from gateway.outputs import add_logprobs, sample_specs, stop_reason
from gateway.prefix_index import PrefixIndexLink
from gateway.readiness import NOT_READY, Readiness
from gateway.router import Router
from gateway.sequence import Sequence
from gateway.text import Detokenizer, TokenizerPool, load_tokenizer
from gateway.validation import ModelLimits, validate_request


class RequestStream:
    """TokenSink of one request: turns sequence progress into GenerateResponse deltas."""

    def __init__(self, seq: Sequence, detok: Detokenizer, queue: asyncio.Queue | None = None, index: int = 0,
                 outbox: Outbox | None = None):
        """seq.sampling.stop_token_ids hold the EOS ids (unless ignore_eos: outputs.sample_specs);
        several samples of one request (n) share `queue`, each with its `index`; deltas reach the
        queue through the engines' `outbox`."""
        self.seq = seq
        self.outbox = outbox or Outbox()
        self.detok = detok
        self.index = index
        self.queue: asyncio.Queue[pb.GenerateResponse] = asyncio.Queue() if queue is None else queue
        self._stops: list[str] = []
        if seq.sampling.min_tokens:  # stop strings are not checked before min_tokens (vLLM)
            self._stops, detok.stop = detok.stop, []
        self._sent_ids = 0
        self.first_token_s: float | None = None  # seconds from arrival to the first output token
        self._last_token_at = 0.0

    def on_tokens(self, seq: Sequence) -> str | None:
        start, new_ids = self._sent_ids, seq.output_ids[self._sent_ids :]
        self._sent_ids = len(seq.output_ids)
        self._observe_tokens(seq, len(new_ids))
        if self._stops and len(seq.output_ids) >= seq.sampling.min_tokens:
            self.detok.stop, self._stops = self._stops, []
        text, stop_hit = self.detok.update(seq.output_ids)
        msg = pb.GenerateResponse(token_ids=new_ids, text=text, request_id=seq.request_id, index=self.index)
        add_logprobs(msg, seq, start, len(seq.output_ids))
        self.outbox.put(self.queue, msg)
        return stop_reason(seq, new_ids, stop_hit)

    def _observe_tokens(self, seq: Sequence, count: int) -> None:
        if not count:
            return
        now = time.monotonic()
        if self.first_token_s is None:
            self.first_token_s = now - seq.arrival
            metrics.TTFT.observe(self.first_token_s)
        else:
            gap = (now - self._last_token_at) / count  # tokens that arrive together share the gap
            for _ in range(count):
                metrics.ITL.observe(gap)
        self._last_token_at = now

    def on_finish(self, seq: Sequence) -> None:
        if not (seq.finish_reason or "").startswith(("error", "cancelled")):
            metrics.E2E.observe(time.monotonic() - seq.arrival)
            metrics.PROMPT_TOKENS.inc(len(seq.prompt_ids))
            metrics.PREFIX_HIT_TOKENS.inc(seq.num_cached_tokens)
        usage = pb.Usage(
            prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids),
            cached_tokens=seq.num_cached_tokens,
        )
        last = pb.GenerateResponse(text=self.detok.flush(), usage=usage, request_id=seq.request_id, index=self.index)
        set_finish(last, seq.finish_reason or "stop")
        self.outbox.put(self.queue, last)


def coalesce(msg: pb.GenerateResponse, queue: asyncio.Queue) -> pb.GenerateResponse:
    """msg plus every delta already waiting behind it, as one message: a client (or a gateway
    busy with a large batch) that lags gets one write per turn, not one per step."""
    while not msg.finish_reason and not queue.empty():
        nxt = queue.get_nowait()
        msg.token_ids.extend(nxt.token_ids)
        msg.logprobs.extend(nxt.logprobs)
        msg.text += nxt.text
        copy_finish(msg, nxt)
        if nxt.HasField("usage"):
            msg.usage.CopyFrom(nxt.usage)
    return msg


class Gateway:
    """Plan holder and router. Lives on the event loop."""

    def __init__(self, config: GatewayConfig, log):
        self.config = config
        self.log = log
        self.model = ModelConfig.from_dir(config.model_dir)
        if config.max_model_len > self.model.max_position_embeddings:
            raise ValueError(f"--max-model-len {config.max_model_len} exceeds the model's context of "
                             f"{self.model.max_position_embeddings} tokens (max_position_embeddings)")
        self.tokenizer = load_tokenizer(config.model_dir)
        self.tokenizer_pool = TokenizerPool(self.tokenizer) if self.tokenizer is not None else None
        self.model_id = config.model_id or _default_model_id(config.model_dir)
        self.engines: list[ReplicaEngine] = []
        self.outbox = Outbox()  # every engine's client deltas, sent after each step's next one
        self.epoch = 0
        self._seq_ids = itertools.count(1)
        self._connect_coordinator(config.coordinator)
        auth = ApiKeyAuth(config.api_keys, config.rate_limit_rps, config.rate_limit_burst,
                          max_failures=config.auth_max_failures, lockout_s=config.auth_lockout_s)
        self.auth = auth if auth.enabled else None  # API keys / rate limit of both front ends
        self._refresh_lock = asyncio.Lock()
        self._watcher: asyncio.Task | None = None
        self._poke = asyncio.Event()  # a stage failed: poll the coordinator now
        self._reported: set[tuple[int, int]] = set()  # failure reports in flight
        self.limits: ModelLimits | None = None
        self.index = PrefixIndexLink(config.cache_service, log, tls=config.tls) if config.cache_service else None
        self.router: Router | None = None
        self._chains: list[tuple] = []
        self.readiness = Readiness(config.plan_wait_s, config.coordinator)  # health status, not-ready errors
        # Owner of this gateway's KV leases on the stages, stable across its restarts on this
        # host and port: a restarted gateway's first lease frees the old process's KV at once.
        self.identity = f"{socket.gethostname()}:{config.port}" if config.port else uuid.uuid4().hex[:12]

    async def start(self) -> None:
        while True:  # no deadline: meanwhile health says NOT_SERVING and requests get UNAVAILABLE saying why
            try:
                plan = await self._wait_for_plan()
                break
            except Unavailable:
                self.log.warning("still_waiting_for_plan", reason=self.readiness.reason,
                                 waited_s=round(self.readiness.unready_s(), 1))
        self._apply_plan(plan)
        if self.index is not None:
            self.index.start(self._index_snapshot)
        self._watcher = asyncio.get_running_loop().create_task(self._watch_plan())

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self.index is not None:
            await self.index.close()
        for engine in self.engines:
            await engine.close()
        if self.tokenizer_pool is not None:
            self.tokenizer_pool.close()
        await self._coord_channel.close()

    def set_coordinator(self, address: str) -> None:
        """Talk to another coordinator from now on (a standby took the Consul leader lock).

        Called on the event loop. Calls in flight on the old channel get a second, then fail and
        are retried on the new one by the plan watcher.
        """
        old = self._coord_channel
        self._connect_coordinator(address)
        asyncio.get_running_loop().create_task(old.close(grace=1.0))

    def _connect_coordinator(self, address: str) -> None:
        tls = None if self.config.coordinator_plaintext else self.config.tls
        self._coord_channel = secure_channel(address, tls)
        self._coord = pb_grpc.CoordinatorStub(self._coord_channel)

    async def tokenize(self, text: str, max_tokens: int, add_special_tokens: bool = True) -> list[int]:
        """Off the event loop; OutOfRange as soon as the text has more than max_tokens tokens."""
        return await self.tokenizer_pool.encode(text, max_tokens, add_special_tokens)

    @property
    def configured_max_len(self) -> int:
        """--max-model-len, else the model's own context."""
        return self.config.max_model_len or self.model.max_position_embeddings

    @property
    def max_model_len(self) -> int:
        """The longest sequence served: the configured length, capped by what a replica's KV holds."""
        return self.limits.max_model_len if self.limits is not None else self.configured_max_len

    @property
    def ready(self) -> bool:
        """Whether a request can be served now: a ready plan has been applied."""
        return self.limits is not None and bool(self.engines)

    @property
    def serving(self) -> bool:
        """What the health checks report (gRPC health, HTTP /health): ready, and not in an outage."""
        return self.ready and not self._outage()

    def _on_cache_events(self, replica: int, events) -> None:
        if self.index is not None:
            self.index.publish(self.engines[replica].replica_id, events.stored, events.removed)

    def _index_snapshot(self) -> list[tuple[str, list[bytes]]]:
        return [(e.replica_id, list(e.scheduler.bm.cached_hashes)) for e in self.engines]

    async def generate(self, request: pb.GenerateRequest):
        """Validate, queue and stream one request; shared by the gRPC and HTTP front ends.

        Yields GenerateResponse deltas; the last one has finish_reason (FINISH_REASON_ERROR when
        the pipeline failed it). Raises StagemeshError subclasses for bad input or a full queue.
        Closing the generator early (client gone) cancels the sequence and frees its KV.
        """
        if self.limits is None:
            raise Unavailable(self.readiness.message(starting=True))
        if self._outage():
            raise Unavailable(self.readiness.message())
        tokenize = self.tokenize if self.tokenizer is not None else None
        prompt_ids, max_tokens, sampling = await validate_request(request, self.limits, tokenize)
        request_id = request.request_id or uuid.uuid4().hex[:16]
        specs = sample_specs(sampling, request.n if request.HasField("n") else 1, self.model.eos_token_ids,
                             request.ignore_eos)
        queue: asyncio.Queue[pb.GenerateResponse] = asyncio.Queue()  # every sample's deltas (index)
        running = []
        # One replica for every sample: the later ones reuse the prompt blocks the first computes.
        engine, expected_blocks = await self.router.route(prompt_ids, max_tokens)
        for index, spec in enumerate(specs):
            seq = Sequence(seq_id=next(self._seq_ids), prompt_ids=prompt_ids, max_tokens=max_tokens, sampling=spec,
                           priority=int(request.priority), request_id=request_id,
                           fork_of=running[0][1] if running else None)  # forks sample 0's prompt KV
            stream = RequestStream(seq, Detokenizer(self.tokenizer, list(request.stop)), queue, index, self.outbox)
            # The later samples add only their own tails (they fork the prompt's blocks).
            tail = -(-max_tokens // engine.plan.block_size) + 1
            engine.submit(seq, stream, expected_blocks if index == 0 else min(expected_blocks, tail))
            running.append((engine, seq, stream))
            # Bound only around log calls, never across a yield: the generator may be resumed or closed
            # from another context (HTTP front end), where a contextvar reset would fail.
            with bound_contextvars(request_id=seq.request_id):
                self.log.info("request_queued", replica=engine.plan.index, seq_id=seq.seq_id, index=index,
                              prompt_tokens=len(prompt_ids), max_tokens=max_tokens)
        unfinished = len(running)
        try:
            while unfinished:
                msg = await queue.get()
                if len(running) == 1:
                    msg = coalesce(msg, queue)
                if finish_text(msg) == NOT_READY:
                    raise Unavailable(self.readiness.message())
                unfinished -= bool(msg.finish_reason)
                yield msg
        finally:
            for engine, seq, stream in running:
                engine.cancel(seq)
                self._log_finished(seq, stream)

    def _log_finished(self, seq: Sequence, stream: RequestStream) -> None:
        with bound_contextvars(request_id=seq.request_id):
            self.log.info("request_finished", finish_reason=seq.finish_reason, prompt_tokens=len(seq.prompt_ids),
                          completion_tokens=len(seq.output_ids), cached_tokens=seq.num_cached_tokens,
                          ttft_ms=None if stream.first_token_s is None else round(stream.first_token_s * 1e3, 2),
                          e2e_ms=round((time.monotonic() - seq.arrival) * 1e3, 2))

    async def refresh_plan(self) -> None:
        """Called when a stage answers FAILED_PRECONDITION: take the coordinator's newer plan."""
        async with self._refresh_lock:
            plan = await self._wait_for_plan()
            if plan.epoch != self.epoch:
                self._apply_plan(plan)

    def stage_failed(self, replica: int, epoch: int, detail: str) -> None:
        """A Forward failed: ask the coordinator to check that replica now, then re-poll the plan."""
        if (replica, epoch) in self._reported:
            return
        self._reported.add((replica, epoch))

        async def report():
            try:
                await self._coord.ReportFailure(
                    pb.ReportFailureRequest(replica=replica, epoch=epoch, detail=detail), timeout=2)
            except grpc.aio.AioRpcError:
                pass  # coordinator down: its heartbeat expiry still catches a dead worker
            self._reported.discard((replica, epoch))
            self._poke.set()

        asyncio.get_running_loop().create_task(report())

    async def _watch_plan(self, interval_s: float = 0.25) -> None:
        """Follow the coordinator's plan: a failover or rebalance bumps the epoch."""
        while True:
            try:
                await asyncio.wait_for(self._poke.wait(), interval_s)
            except asyncio.TimeoutError:
                pass
            self._poke.clear()
            try:
                plan = await self._coord.GetPlan(pb.GetPlanRequest(), timeout=2)
                self.readiness.saw_plan(plan)
            except grpc.aio.AioRpcError as exc:
                self.readiness.saw_error(exc)
                await self._check_outage()
                continue  # coordinator restarting: keep serving on the plan we have
            await self._check_outage()
            if plan.epoch != self.epoch and _servable(plan):
                async with self._refresh_lock:
                    if plan.epoch != self.epoch:
                        self._apply_plan(plan)

    def _outage(self) -> bool:
        """The plan has been not ready past the bound and no replica gets a step through."""
        return self.readiness.past_bound() and all(e.stalled_s() > 0 for e in self.engines)

    async def _check_outage(self) -> None:
        """Fail what waits on a mesh that stays broken (UNAVAILABLE, saying why); health follows."""
        outage = self._outage()
        if outage:
            failed = sum(e.fail_all(NOT_READY) for e in self.engines)
            if failed:
                self.log.warning("plan_not_ready_requests_failed", requests=failed, reason=self.readiness.reason,
                                 unready_s=round(self.readiness.unready_s(), 1))
        await self.readiness.set_serving(self.ready and not outage)

    async def _wait_for_plan(self) -> pb.Plan:
        deadline = asyncio.get_running_loop().time() + self.config.plan_wait_s
        while True:
            try:
                plan = await self._coord.GetPlan(pb.GetPlanRequest(), timeout=5)
                self.readiness.saw_plan(plan)
                if _servable(plan):
                    return plan
            except grpc.aio.AioRpcError as exc:
                self.readiness.saw_error(exc)
                self.log.info("waiting_for_coordinator", code=exc.code().name)
            if asyncio.get_running_loop().time() > deadline:
                raise Unavailable("no ready plan from the coordinator in time")
            await asyncio.sleep(0.1)

    def _apply_plan(self, plan: pb.Plan) -> None:
        self.epoch = plan.epoch
        # The worker id too: a new process at an old address (its KV gone) is a changed chain.
        chains = [tuple((st.worker_id, st.address, st.layer_start, st.layer_end) for st in r.stages)
                  for r in plan.replicas]
        specs = [
            ReplicaPlan(index=i, epoch=plan.epoch, first_address=r.stages[0].address, num_blocks=r.num_blocks,
                        block_size=plan.block_size, num_stages=len(r.stages))
            for i, r in enumerate(plan.replicas)
        ]
        if not self.engines:
            self.engines = [
                ReplicaEngine(spec, self.model_id, self.config.scheduler, self.log,
                              forward_timeout_s=self.config.forward_timeout_s, on_stale_epoch=self.refresh_plan,
                              on_cache_events=self._on_cache_events, on_stage_failure=self.stage_failed,
                              owner=self.identity, tls=self.config.tls, outbox=self.outbox)
                for spec in specs
            ]
            for engine in self.engines:
                engine.start()
            self.router = Router(self.engines, self.model_id, plan.block_size, index=self.index,
                                 policy=self.config.routing, weight=self.config.routing_weight, log=self.log)
        else:
            self._replan_engines(specs, chains)
        self._chains = chains
        capacity = min(s.num_blocks for s in specs) * plan.block_size
        self.limits = ModelLimits(
            model_id=self.model_id, vocab_size=self.model.vocab_size,
            max_model_len=min(self.configured_max_len, capacity), kv_capacity_tokens=capacity,
            default_max_tokens=self.config.default_max_tokens, max_stop_strings=self.config.max_stop_strings,
            max_prompt_bytes=self.config.max_prompt_bytes,
        )
        self.log.info("plan_applied", epoch=plan.epoch, replicas=len(specs), kv_tokens=capacity)

    def _replan_engines(self, specs: list[ReplicaPlan], chains: list[tuple]) -> None:
        """Replay only replicas whose chain changed; retire replicas that left the plan."""
        for engine in self.engines[len(specs):]:  # no worker left for them: move their requests
            if specs:
                self.engines[0].adopt(engine.surrender())
            asyncio.get_running_loop().create_task(engine.close())
        del self.engines[len(specs):]
        for i, (engine, spec) in enumerate(zip(self.engines, specs)):
            if self._chains[i] == chains[i] and engine.plan.num_blocks == spec.num_blocks:
                engine.set_epoch(spec.epoch)
                continue
            if self.index is not None:
                self.index.clear(engine.replica_id)  # its KV is gone with the old chain
            engine.replan(spec)
            self.router.reset_replica(i)


REQUEST_ID_METADATA = "x-request-id"


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, gateway: Gateway):
        self.gw = gateway

    @grpc_errors
    async def Generate(self, request, context):
        if not request.request_id:  # a caller's trace id (x-request-id metadata), else a fresh one
            metadata = dict(context.invocation_metadata() or ())
            request.request_id = str(metadata.get(REQUEST_ID_METADATA, ""))[:128] or uuid.uuid4().hex[:16]
        # This rpc runs in its own task (context), so the binding covers every line it logs.
        with bound_contextvars(request_id=request.request_id):
            async for msg in self.gw.generate(request):
                if finish_text(msg).startswith("error:"):
                    await context.abort(grpc.StatusCode.UNAVAILABLE,
                                        f"request {msg.request_id} failed in the pipeline ({finish_text(msg)})")
                yield msg

    @grpc_errors
    async def ListModels(self, request, context):
        gw = self.gw
        return pb.ListModelsResponse(models=[
            pb.ModelInfo(id=gw.model_id, max_model_len=gw.max_model_len, vocab_size=gw.model.vocab_size)
        ])


def _default_model_id(model_dir: str) -> str:
    return Path(model_dir).resolve().name


def _servable(plan: pb.Plan) -> bool:
    """Every stage of every replica has loaded its layers and sized its KV pool."""
    return plan.ready and bool(plan.replicas) and all(r.num_blocks > 0 for r in plan.replicas)
