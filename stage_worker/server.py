"""Stage worker process: registers with the coordinator, loads its layer range, serves Forward.

Lifecycle: Register -> heartbeat until the coordinator's answer carries an Assignment -> load
that range's tensors and size the KV pool -> report `loaded_epoch` in heartbeats -> serve.
Forward runs the micro-batch on one compute thread (so the event loop keeps accepting the next
micro-batch and relaying answers), then calls the next stage with the hidden states and returns
its answer, which carries the sampled ids back up the chain.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import concurrent.futures
from dataclasses import dataclass

import grpc
import torch
from structlog.contextvars import bound_contextvars

from stagemesh import metrics, wire
from stagemesh.errors import Aborted, InvalidArgument, FailedPrecondition, StagemeshError, Unavailable
from stagemesh.grpc_status import grpc_errors
from stagemesh.net import GRPC_OPTIONS
from stagemesh.security import channel as secure_channel
from stagemesh.v1 import stagemesh_pb2 as pb
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc

from stage_worker.config import WorkerConfig
from stage_worker.device import free_memory_bytes
from stage_worker.executor import StageExecutor
from stage_worker.loader import load_stage
from stage_worker.models.quant import weight_bytes, with_quantization
from stage_worker.profile import profile_layer
from stage_worker.samples import SampleNotReady
from stage_worker import grammar, logprobs
from stage_worker.step_input import decode, outputs as step_outputs
from stagemesh.model_config import ModelConfig


SAMPLE_WAIT_S = 5.0  # how long a step waits for the step whose sample it follows
# This process, for the coordinator: a slot of a restored plan goes back only to the process that
# held it (whose KV is intact), never to a new one at the same address.
INSTANCE_ID = uuid.uuid4().hex


@dataclass
class Loaded:
    assignment: pb.Assignment
    executor: StageExecutor
    next_stub: pb_grpc.StageStub | None
    next_channel: grpc.aio.Channel | None
    next_forward: grpc.aio.UnaryUnaryMultiCallable | None  # Forward taking wire.forward_bytes


def add_stage_service(service: "StageService", server: grpc.aio.Server) -> None:
    """The generated registration, except that Forward's request is read by wire.parse_forward:
    the hidden states stay in the received bytes (the handler gets a wire.ForwardIn)."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(service, name), request_deserializer=parse, response_serializer=response.SerializeToString)
        for name, parse, response in (
            ("Forward", wire.parse_forward, pb.ForwardResponse),
            ("Release", pb.ReleaseRequest.FromString, pb.ReleaseResponse),
            ("Stats", pb.StatsRequest.FromString, pb.StatsResponse),
            ("SetSlowdown", pb.SetSlowdownRequest.FromString, pb.SetSlowdownResponse),
        )
    }
    if not service.config.test_controls:  # a test knob: off the production service
        handlers["SetSlowdown"] = grpc.unary_unary_rpc_method_handler(
            _test_controls_off, request_deserializer=pb.SetSlowdownRequest.FromString,
            response_serializer=pb.SetSlowdownResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("stagemesh.v1.Stage", handlers),))


async def _test_controls_off(_request, context):
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "SetSlowdown is a test control; this worker was not "
                        "started with --enable-test-controls")


class StageService(pb_grpc.StageServicer):
    """gRPC face of the worker. Handlers run on the event loop; torch runs on `_compute`."""

    # A failed load of new layers leaves the old ones serving (a TP group cannot: its followers
    # dropped theirs first, so it stops and the coordinator fails it over).
    survives_failed_load = True

    def __init__(self, config: WorkerConfig, log):
        self.config = config
        self.log = log
        self.loaded: Loaded | None = None
        self.slowdown = config.slowdown
        self._debug = log.is_enabled_for(logging.DEBUG)  # the per-step debug line sums the chunks
        # Both threads make the worker's GPU their current device: streams and events created
        # without one (torch's defaults) then belong to it, also on cuda:1 and beyond.
        device = torch.device(config.device)
        init = (lambda: torch.cuda.set_device(device)) if device.type == "cuda" else None
        self._compute = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute",
                                                              initializer=init)
        # Waits for launched steps' GPU work, in launch order, while `compute` launches the next.
        self._finish = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish",
                                                             initializer=init)
        self._ticks = 0  # launch attempts finished and answers noted (the event loop's count)
        self._launched = asyncio.Event()  # set (and replaced) at every tick

    @grpc_errors
    async def Forward(self, received: wire.ForwardIn, context):
        # A micro-batch holds many requests: its log lines carry the lease and step ids, and the
        # gateway's `step_sent` debug line maps a step id to its request ids.
        if received.error:
            raise InvalidArgument(received.error)
        request = received.request
        with bound_contextvars(lease_id=request.lease_id, step_id=request.step_id):
            return await self._forward(request, received.hidden, context)

    async def _forward(self, request, hidden, context):
        loaded = self.loaded
        if loaded is None:
            raise Unavailable("this stage has not loaded its layers yet")
        if request.epoch != loaded.assignment.epoch:
            raise FailedPrecondition(
                f"stale plan epoch {request.epoch}: this stage serves epoch {loaded.assignment.epoch}; refresh the plan"
            )
        step = self._decode(loaded.executor, request, hidden)
        launched = await self._launch(loaded.executor, step, context)
        loop = asyncio.get_running_loop()
        out, nxt = await loop.run_in_executor(self._finish, self._finish_step, loaded, launched, request)
        metrics.STAGE_STEP.labels(str(loaded.assignment.stage_index)).observe(out.compute_us / 1e6)
        if self._debug:
            self.log.debug("forward", tokens=sum(c.num_tokens for c in request.chunks), seqs=len(request.chunks),
                           compute_us=out.compute_us)
        if loaded.next_stub is None:
            return logprobs.forward_response(out)
        remaining = context.time_remaining()
        first = loaded.executor.model.is_first
        try:
            resp = await loaded.next_forward(nxt, timeout=remaining)
        except grpc.aio.AioRpcError as exc:
            if first:
                loaded.executor.refused(step.lease_id, step.outputs)  # steps that follow its samples fail at once
                self._tick()
            code = exc.code()
            if code == grpc.StatusCode.UNKNOWN or code == grpc.StatusCode.INTERNAL:
                code = grpc.StatusCode.UNAVAILABLE
            await context.abort(code, f"next stage {loaded.assignment.next_address}: {exc.details()}")
        if first:  # steps that follow these samples (async scheduling) may launch now
            loaded.executor.note_samples(step, [(s.seq_id, s.token_id) for s in resp.samples])
            self._tick()
        resp.stage_compute_us.insert(0, out.compute_us)
        return resp

    def _decode(self, executor, request: pb.ForwardRequest, hidden):
        """The request as the executor takes it (step_input.py: checked, no protobuf). A refused
        one's samples will never come: steps that follow them fail at once."""
        try:
            return decode(request, executor.shape, hidden)
        except StagemeshError:
            executor.refused(request.lease_id, step_outputs(request))
            self._tick()
            raise

    def _finish_step(self, loaded: Loaded, launched, request: pb.ForwardRequest):
        """On the finish thread: wait for the step, and serialise the next stage's request (the
        same deltas, this stage's hidden states for the token ids) off the event loop."""
        out = loaded.executor.finish(launched)
        if loaded.next_forward is None:
            return out, None
        request.ClearField("token_ids")  # the next stage takes the hidden states
        return out, wire.forward_bytes(request, out.hidden)

    async def _launch(self, executor, step, context):
        """Launch on the compute thread. A step that follows a sample not there yet (two steps
        of one gateway taken out of order; on a chain's first stage, the answer of the step before
        still on its way back) waits for the next launch or answer and tries again; after
        SAMPLE_WAIT_S the earlier step is taken as lost (ABORTED: the gateway schedules both again)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(SAMPLE_WAIT_S, context.time_remaining() or SAMPLE_WAIT_S)
        while True:
            before = self._ticks
            try:
                return await loop.run_in_executor(self._compute, executor.launch, step)
            except SampleNotReady as exc:
                if loop.time() >= deadline:
                    raise Aborted(f"{exc}: the step that samples it never came") from None
            finally:
                self._tick()
            if self._ticks - before > 1:
                continue  # another launch or answer came meanwhile: try again now
            try:
                await asyncio.wait_for(self._launched.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                pass

    def _tick(self) -> None:
        """A launch attempt finished or an answer's samples were noted: waiting steps look again."""
        self._ticks += 1
        self._launched.set()
        self._launched = asyncio.Event()

    @grpc_errors
    async def Release(self, request, context):
        if self.loaded is not None:
            ex = self.loaded.executor
            if request.lease_owner:  # a newer lease of this owner frees its older ones here
                await asyncio.get_running_loop().run_in_executor(
                    self._compute, ex.claim, request.lease_id, request.lease_owner, request.lease_order, False)
            if not request.supersede_only:
                await asyncio.get_running_loop().run_in_executor(
                    self._compute, ex.release, request.lease_id, list(request.seq_ids)
                )
            if self.loaded.next_stub is not None:
                await self.loaded.next_stub.Release(request, timeout=context.time_remaining())
        return pb.ReleaseResponse()

    @grpc_errors
    async def SetSlowdown(self, request, context):
        if not 1.0 <= request.factor <= 100.0:
            raise InvalidArgument(f"slowdown factor must be in [1, 100], got {request.factor}")
        self.slowdown = request.factor
        if self.loaded is not None:
            self.loaded.executor.slowdown = request.factor
        self.log.warning("slowdown_set", factor=request.factor)
        return pb.SetSlowdownResponse()

    @grpc_errors
    async def Stats(self, request, context):
        loaded = self.loaded
        if loaded is None:
            return pb.StatsResponse()
        ex, a = loaded.executor, loaded.assignment
        return pb.StatsResponse(
            num_blocks=ex.num_blocks, blocks_in_use=ex.leases.blocks_in_use(), live_sequences=len(ex.leases),
            steps=ex.steps, mean_step_us=ex.mean_step_us(), compute_us_total=ex.compute_us_total,
            gpu_wait_us_total=int(ex.gpu_wait_us_total), tokens_total=ex.tokens_total,
            layer_start=a.layer_start, layer_end=a.layer_end, epoch=a.epoch,
        )

    # -- assignment ----------------------------------------------------------------------------
    async def apply_assignment(self, a: pb.Assignment) -> None:
        """Load (or keep) the layers of an assignment; runs on the compute thread."""
        current = self.loaded
        loop = asyncio.get_running_loop()
        same_layers = current and (current.assignment.layer_start, current.assignment.layer_end) == (
            a.layer_start, a.layer_end)
        if same_layers and (current.assignment.replica, current.assignment.next_address) == (
                a.replica, a.next_address):
            # Same place in the same chain (another replica changed): keep the KV, new epoch only.
            current.assignment.epoch = a.epoch
            self.log.info("assignment_epoch", epoch=a.epoch)
            return
        if same_layers:
            executor = current.executor
            await loop.run_in_executor(self._compute, executor.reset)
        else:
            executor = await loop.run_in_executor(self._compute, self._load, a)
        if current and current.next_channel is not None:
            await current.next_channel.close()
        channel = secure_channel(a.next_address, self.config.tls, options=GRPC_OPTIONS) if a.next_address else None
        stub = pb_grpc.StageStub(channel) if channel else None
        forward = channel.unary_unary("/stagemesh.v1.Stage/Forward",  # takes wire.forward_bytes
                                      response_deserializer=pb.ForwardResponse.FromString) if channel else None
        assignment = pb.Assignment()
        assignment.CopyFrom(a)
        self.loaded = Loaded(assignment, executor, stub, channel, forward)
        self.log.info("assignment_loaded", epoch=a.epoch, layers=f"[{a.layer_start},{a.layer_end})",
                      num_blocks=executor.num_blocks, next=a.next_address or "-",
                      weight_bytes=weight_bytes(executor.model))  # as held: FP8 weights 1 byte each

    def _load(self, a: pb.Assignment) -> StageExecutor:
        cfg = self.config
        model, mcfg = load_stage(cfg.model_dir, a.layer_start, a.layer_end, device=cfg.device,
                                 quantization=cfg.quantization, load_format=cfg.load_format)
        # The model's own pool type knows its size (PagedKVCache: 2*L*bs*Hkv*D; MLA: L*bs*(R+Dr)).
        kv_dtype = model.kv_cache_dtype(cfg.kv_cache_dtype)
        per_block = model.kv_block_bytes(cfg.block_size, kv_dtype)
        num_blocks = cfg.kv_blocks or max(1, self._kv_budget(model) // per_block)
        kv = model.make_kv_cache(num_blocks, cfg.block_size, dtype=kv_dtype)
        executor = StageExecutor(model, kv, cfg.block_size)
        executor.slowdown = self.slowdown
        grammar.attach(executor, cfg.model_dir)  # structured output, on the last stage
        return executor

    def _kv_budget(self, model) -> int:
        if self.config.kv_cache_bytes:
            return self.config.kv_cache_bytes
        device = torch.device(self.config.device)
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            return int(free * self.config.gpu_memory_fraction)
        return 128 * 1024 * 1024


def _load_failure(task: asyncio.Task | None, epoch: int, service: StageService, log, failed_epoch: int) -> int:
    """After a finished load: the epoch not to retry. A first load that failed stops the worker
    (nothing to serve: the error names the cause); a move that failed (out of memory, a file gone)
    leaves the worker serving its old layers until the coordinator undoes the move."""
    if task is None or task.cancelled() or task.exception() is None:
        return failed_epoch
    exc = task.exception()
    if service.loaded is None or not service.survives_failed_load:
        raise exc
    log.error("assignment_load_failed", epoch=epoch, error=str(exc),
              serving_epoch=service.loaded.assignment.epoch)
    return epoch


async def lease_expiry_loop(service: StageService, ttl_s: float) -> None:
    """KV belongs to a gateway lease: a gateway that stops sending Forwards loses its blocks."""
    while True:
        await asyncio.sleep(min(5.0, ttl_s / 3))
        loaded = service.loaded
        if loaded is not None:
            dropped = await asyncio.get_running_loop().run_in_executor(
                service._compute, loaded.executor.expire_leases, ttl_s)
            if dropped:
                service.log.warning("lease_expired", sequences=dropped)


async def heartbeat_loop(service: StageService, config: WorkerConfig, address: str, log) -> None:
    """Register, then heartbeat forever; apply assignments as they change. Survives restarts."""
    channel = secure_channel(config.coordinator, None if config.coordinator_plaintext else config.tls,
                             options=GRPC_OPTIONS)
    coord = pb_grpc.CoordinatorStub(channel)
    worker_id, interval = "", 0.5
    memory = free_memory_bytes(config.device)
    model_cfg = with_quantization(ModelConfig.from_dir(config.model_dir), config.quantization)
    profile = await asyncio.get_running_loop().run_in_executor(
        service._compute, profile_layer, model_cfg, config.device, config.block_size, service.slowdown, None,
        config.kv_cache_dtype)
    log.info("layer_profiled", decode_ms=round(profile.decode_ms_per_layer, 3),
             prefill_ms=round(profile.prefill_ms_per_layer, 3))
    loading: asyncio.Task | None = None  # weights load in the background; heartbeats go on
    loading_epoch = failed_epoch = 0  # the load's epoch; one that failed while serving an older one
    wake = asyncio.Event()
    while True:
        try:
            if not worker_id:
                reg = await coord.Register(pb.RegisterRequest(address=address, device=config.device, memory_bytes=memory,
                                                               profile=profile, instance_id=INSTANCE_ID), timeout=5)
                worker_id, interval = reg.worker_id, reg.heartbeat_interval_ms / 1000
                log.info("registered", worker_id=worker_id)
            loaded = service.loaded
            ex = loaded.executor if loaded else None
            hb = await coord.Heartbeat(pb.HeartbeatRequest(
                worker_id=worker_id, loaded_epoch=loaded.assignment.epoch if loaded else 0,
                num_blocks=ex.num_blocks if ex else 0, mean_step_us=ex.mean_step_us() if ex else 0.0,
            ), timeout=5)
            if hb.reregister:
                worker_id = ""
                continue
            if hb.spare and ex is not None and len(ex.leases):  # out of the plan: nobody owns these any more
                await asyncio.get_running_loop().run_in_executor(service._compute, ex.reset)
                log.warning("spare_dropped_sequences", epoch=loaded.assignment.epoch)
            if hb.HasField("assignment") and (loaded is None or hb.assignment.epoch != loaded.assignment.epoch):
                if loading is None or loading.done():
                    failed_epoch = _load_failure(loading, loading_epoch, service, log, failed_epoch)
                    loading = None
                    if hb.assignment.epoch != failed_epoch:  # never retry a load that failed
                        loading_epoch = hb.assignment.epoch
                        loading = asyncio.create_task(service.apply_assignment(hb.assignment))
                        loading.add_done_callback(lambda _t: wake.set())
        except grpc.aio.AioRpcError as exc:
            log.warning("coordinator_unreachable", code=exc.code().name)
        except StagemeshError as exc:
            log.error("assignment_failed", error=str(exc))
            raise
        if loading is not None and loading.done():
            failed_epoch = _load_failure(loading, loading_epoch, service, log, failed_epoch)
            loading = None
        wake.clear()
        try:
            await asyncio.wait_for(wake.wait(), interval)  # report a finished load at once
        except asyncio.TimeoutError:
            pass
