"""Executes one micro-batch on this stage's layers: block-table deltas in, hidden/samples out.

The executor keeps, per (lease, sequence), the block table and sampling spec the gateway sent
once (deltas afterwards). It validates a request completely before changing any state, so a bad
request is refused with INVALID_ARGUMENT and leaves every other sequence untouched. A lease names
its owner (a gateway's replica) and its order: a newer lease of an owner frees the older ones'
sequences here at once (a re-planned chain, a restarted gateway), also on a stage whose own
assignment did not change, so no block is kept that nobody owns.

On CUDA, micro-batches replay a captured CUDA graph (cuda_graphs.py): decode-only ones a graph
per batch bucket, mixed ones (with prefill chunks) a graph per token bucket; what fits neither
runs eagerly with the same paged GPU attention. The only host synchronisation in a step is the copy of its
result out of the GPU: the sampled ids (last stage) or the hidden states into pinned memory. A chunk
may follow a sample the gateway has not seen yet (async scheduling): samples.py keeps where each is.

Runs on the worker's single compute thread (one micro-batch at a time); only note_samples and
refused, on a chain's first stage, are called from the event loop (samples.py says why that is safe).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from stagemesh import wire
from stagemesh.errors import FailedPrecondition, InvalidArgument
from stagemesh.v1 import stagemesh_pb2 as pb

from stage_worker.attention import AttnMetadata
from stage_worker.cuda_graphs import DecodeGraphs, MixedGraphs
from stage_worker.kv_cache import PagedKVCache
from stage_worker.step_profiler import StepProfiler
from stage_worker.sampler import SamplingSpec, sample
from stage_worker.samples import Sample, SampleBook, SampleNotReady, follow_rows, put_samples

MAX_BATCH_TOKENS = 1 << 16


@dataclass
class SeqState:
    block_table: list[int]
    sampling: SamplingSpec


@dataclass
class StepOutput:
    hidden: torch.Tensor | None  # [T, H] for the next stage; None on the last stage
    samples: list[tuple[int, int]]  # (seq_id, token) on the last stage
    compute_us: int


class StageExecutor:
    def __init__(self, model, kv: PagedKVCache, block_size: int, cuda_graphs: bool | None = None):
        """cuda_graphs: capture decode graphs (default: on CUDA when the pool has a scratch block)."""
        self.model = model
        self.kv = kv
        self.block_size = block_size
        self.num_blocks = kv.num_blocks
        self.device = next(model.parameters()).device
        if self.device.type == "cuda" and hasattr(model, "fuse_projections"):
            model.fuse_projections()  # before capture: graphs bake in the fused weights
            torch.cuda.empty_cache()
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and kv.scratch_block is not None
        self.graphs = DecodeGraphs(model, kv, block_size) if cuda_graphs else None
        self.tile_q = model.attention_tile_q if self.device.type == "cuda" else None
        self.mixed_graphs = (MixedGraphs(model, kv, block_size)
                             if cuda_graphs and model.attention_tile_q is not None else None)
        self.seqs: dict[tuple[str, int], SeqState] = {}
        self.samples = SampleBook()  # where each greedy sequence's newest sample is (async scheduling)
        self.slowdown = 1.0
        self._lease_seen: dict[str, float] = {}  # lease id -> last Forward (monotonic s)
        self._newest: dict[str, tuple[int, str]] = {}  # lease owner -> (order, lease id) of its newest lease
        self._owner_of: dict[str, str] = {}  # lease id -> its owner
        self.steps = 0
        self._launches = 0  # launches run ahead of `steps` (counted when finished)
        self.compute_us_total = 0
        self.gpu_wait_us_total = 0.0  # CUDA: the device idle between steps (gaps < 1 s)
        self._last_end: torch.cuda.Event | None = None  # the end of the last finished step
        self._recent_us: deque[int] = deque(maxlen=64)
        self._profiler = StepProfiler.from_env(self.device)
        self._side_stream = None  # finish(): sampling off the compute stream (CUDA)

    # -- state ---------------------------------------------------------------------------------
    def release(self, lease_id: str, seq_ids=()) -> None:
        if seq_ids:
            for sid in seq_ids:
                self.seqs.pop((lease_id, sid), None)
        else:
            for key in [k for k in self.seqs if k[0] == lease_id]:
                del self.seqs[key]
        self.samples.forget(lease_id, seq_ids)

    def reset(self) -> None:
        self.seqs.clear()
        self.samples.clear()

    def claim(self, lease_id: str, owner: str, order: int, strict: bool = True) -> int:
        """A lease of `owner` with `order` is in use: drop every sequence of the owner's older
        leases. Returns the sequences dropped. A lease older than the owner's newest is refused
        (FAILED_PRECONDITION: a step of a superseded chain generation, still on its way) when
        strict, else ignored (a Release of it has nothing left to free)."""
        if not owner:
            return 0
        newest = self._newest.get(owner)
        if newest is not None and (order, lease_id) < newest:
            if strict:
                raise FailedPrecondition(f"lease {lease_id} of {owner} is superseded by lease {newest[1]}")
            return 0
        if newest is not None and newest[1] == lease_id:
            return 0
        self._newest[owner] = (order, lease_id)
        self._owner_of[lease_id] = owner
        old = {lease for lease, o in self._owner_of.items() if o == owner and lease != lease_id}
        return self._drop_leases(old)

    def _drop_leases(self, leases: set[str]) -> int:
        keys = [k for k in self.seqs if k[0] in leases]
        for key in keys:
            del self.seqs[key]
        self.samples.drop_leases(leases)
        for lease in leases:
            self._lease_seen.pop(lease, None)
            self._owner_of.pop(lease, None)
        return len(keys)

    def expire_leases(self, ttl_s: float) -> int:
        """Drop sequences of leases not heard from for ttl_s (their gateway died); returns count."""
        now = time.monotonic()
        dead = {lease for lease, seen in self._lease_seen.items() if now - seen > ttl_s}
        return self._drop_leases(dead)

    def blocks_in_use(self) -> int:
        return len({b for s in self.seqs.values() for b in s.block_table})

    def mean_step_us(self) -> float:
        return sum(self._recent_us) / len(self._recent_us) if self._recent_us else 0.0

    # -- execution -----------------------------------------------------------------------------
    def run(self, req: pb.ForwardRequest, hidden=None) -> StepOutput:
        """One micro-batch start to finish (launch, then finish)."""
        return self.finish(self.launch(req, hidden))

    def launch(self, req: pb.ForwardRequest, hidden=None) -> "Launched":
        """Validate, apply the deltas, and queue the step's GPU work (forward, logits, argmax or the
        copy of the hidden states to pinned memory); returns before the GPU is done, so the server
        can launch the next micro-batch while this one runs. On the CPU the work is done here.
        hidden: the hidden states as received (wire.parse_forward); None: `req.hidden`."""
        self._launches += 1
        if self._profiler is not None:
            self._profiler.step_begin(self._launches - 1)
        t0 = time.perf_counter()
        try:
            self._check_lease(req)
            # A chain's first stage; nothing is left when a TP stage's launch ran it before broadcasting.
            self.resolve_host_follows(req)
            done = self._launch(req, t0, hidden)
        except SampleNotReady:
            self._launches -= 1  # not a step: it is launched again after the next one
            raise
        except Exception:
            self.refused(req)
            raise
        done.launch_s = time.perf_counter() - t0
        if self.slowdown > 1.0:  # test/demo knob: a device `slowdown` times slower holds this thread longer
            time.sleep(done.launch_s * (self.slowdown - 1.0))
        return done

    def _launch(self, req: pb.ForwardRequest, t0: float, hidden) -> "Launched":
        if any(c.num_tokens <= 0 for c in req.chunks):
            raise InvalidArgument("every chunk needs num_tokens >= 1")
        # Check the payload before the deltas are committed: a refused request changes nothing.
        num_tokens = sum(c.num_tokens for c in req.chunks)
        input_ids, hidden = self._inputs(req, num_tokens, hidden)
        follows = self._follows(req)
        tables = self._apply_deltas(req)
        done = Launched(t0, "none", num_tokens)
        if not req.chunks:
            done.hidden = None if self.model.is_last else torch.empty(0, self.model.cfg.hidden_size)
            return done
        chunks = [(c.start_pos, c.num_tokens, tables[c.seq_id]) for c in req.chunks]
        if self.device.type == "cuda":  # the stream reaches it once the step before is done
            done.start = torch.cuda.Event(enable_timing=True)
            done.start.record(torch.cuda.current_stream(self.device))
        patch = (lambda ids: put_samples(follows, ids)) if follows else None
        if self.graphs is not None and self.graphs.accepts(chunks):
            ids = list(req.token_ids) if self.model.is_first else None
            out = self.graphs.run(chunks, ids, hidden, patch)  # [B, H]; row i = chunk i
            last_rows, done.route = list(range(len(chunks))), "decode_graph"
        elif self.mixed_graphs is not None and self.mixed_graphs.accepts(chunks):
            ids = list(req.token_ids) if self.model.is_first else None
            out, last_rows = self.mixed_graphs.run(chunks, ids, hidden, patch)  # [T, H]
            done.route = "mixed_graph"
        else:
            done.route = "eager"
            if input_ids is not None:
                input_ids = input_ids.to(self.device, non_blocking=True)
                if patch is not None:
                    patch(input_ids)
            if hidden is not None:
                hidden = hidden.to(self.device, non_blocking=True)
            meta = AttnMetadata.build(chunks, self.block_size, self.device, tile_q=self.tile_q)
            out = self.model(input_ids, hidden, meta, self.kv)  # [T, H]
            last_rows = meta.last_rows
        if self.model.is_last:
            self._launch_sample(req, last_rows, out, done)
        else:
            done.hidden = _to_host_async(out)
        if self.device.type == "cuda":
            done.event = torch.cuda.Event(enable_timing=True)
            done.event.record(torch.cuda.current_stream(self.device))
        return done

    def finish(self, done: "Launched") -> StepOutput:
        """Wait for a launched step's GPU work and collect its result (runs in launch order)."""
        t1 = time.perf_counter()
        if done.event is not None:
            done.event.synchronize()
        result = StepOutput(done.hidden, [], 0)
        if done.picks:
            if done.logits is None:  # every row greedy: the argmax ran on the device, copied at launch
                tokens = done.greedy_host.tolist()
            else:
                tokens = self._sample_after(done)
            result.samples = [(c.seq_id, t) for (_, c), t in zip(done.picks, tokens)]
        if done.route == "none":
            return result
        if done.start is not None:  # finish runs in launch order, which is the stream's order
            if self._last_end is not None:
                gap_ms = self._last_end.elapsed_time(done.start)
                if gap_ms < 1000.0:  # longer: nothing to do, not a stage kept waiting
                    self.gpu_wait_us_total += max(0.0, gap_ms) * 1e3
            self._last_end = done.event
        # Launch (stretched by the slowdown knob) and the wait, not the queueing in between.
        busy_s = done.launch_s * max(1.0, self.slowdown) + time.perf_counter() - t1
        result.compute_us = int(busy_s * 1e6)
        self.steps += 1
        self.compute_us_total += result.compute_us
        self._recent_us.append(result.compute_us)
        if self._profiler is not None:
            self._profiler.step_end(done.route, result.compute_us, done.tokens)
        return result

    def _sample_after(self, done: "Launched") -> list[int]:
        """Draw the tokens of a step with sampled rows. On CUDA this runs on a side stream that
        waits for this step only: on the compute stream its copies would queue behind the step
        launched after it, and its answer would come back a step late."""
        outputs = [c.output_index for _, c in done.picks]
        if done.event is None:
            return sample(done.logits, done.specs, outputs)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        self._side_stream.wait_event(done.event)
        with torch.cuda.stream(self._side_stream):
            return sample(done.logits, done.specs, outputs)

    def _apply_deltas(self, req: pb.ForwardRequest) -> dict[int, list[int]]:
        """Validate everything first, then commit: new sequences, appended blocks, drops."""
        lease = req.lease_id
        self._lease_seen[lease] = time.monotonic()
        finished = set(req.finished_seq_ids)
        new = {}
        for ns in req.new_sequences:
            self._check_blocks(ns.block_ids, f"sequence {ns.seq_id}")
            if len(set(ns.block_ids)) != len(ns.block_ids):
                raise InvalidArgument(f"sequence {ns.seq_id}: a block id appears twice in its table")
            new[ns.seq_id] = SeqState(list(ns.block_ids), _spec(ns.sampling))
        tables: dict[int, list[int]] = {}
        seen = set()
        total = 0
        for c in req.chunks:
            if c.seq_id in seen:
                raise InvalidArgument(f"sequence {c.seq_id} appears twice in one micro-batch")
            seen.add(c.seq_id)
            state = new.get(c.seq_id) or (None if c.seq_id in finished else self.seqs.get((lease, c.seq_id)))
            if state is None:
                raise InvalidArgument(f"unknown sequence {c.seq_id} for lease {lease!r}: send it in new_sequences first")
            if c.num_tokens <= 0 or c.start_pos < 0:
                raise InvalidArgument(f"sequence {c.seq_id}: num_tokens must be >= 1 and start_pos >= 0")
            self._check_blocks(c.new_block_ids, f"sequence {c.seq_id}")
            table = state.block_table + list(c.new_block_ids)
            if c.new_block_ids and len(set(table)) != len(table):  # a sequence's blocks are its own
                raise InvalidArgument(f"sequence {c.seq_id}: a block id appears twice in its table")
            if len(table) * self.block_size < c.start_pos + c.num_tokens:
                raise InvalidArgument(
                    f"sequence {c.seq_id}: {len(table)} blocks cannot hold {c.start_pos + c.num_tokens} tokens"
                )
            tables[c.seq_id] = table
            total += c.num_tokens
        if total > MAX_BATCH_TOKENS:
            raise InvalidArgument(f"micro-batch of {total} tokens exceeds the limit of {MAX_BATCH_TOKENS}")
        # Commit.
        self.claim(lease, req.lease_owner, req.lease_order)
        for sid in finished:
            self.seqs.pop((lease, sid), None)
            self.samples.forget(lease, [sid])
        for sid, state in new.items():
            self.seqs[(lease, sid)] = state
        for sid, table in tables.items():
            self.seqs[(lease, sid)].block_table = table
        return tables

    def _check_lease(self, req: pb.ForwardRequest) -> None:
        """Refuse a step of a superseded lease before it changes anything (claim commits later)."""
        newest = self._newest.get(req.lease_owner) if req.lease_owner else None
        if newest is not None and (req.lease_order, req.lease_id) < newest:
            raise FailedPrecondition(f"lease {req.lease_id} of {req.lease_owner} is superseded by lease {newest[1]}")

    def _check_blocks(self, block_ids, what: str) -> None:
        for b in block_ids:
            if not 0 <= b < self.num_blocks:
                raise InvalidArgument(f"{what}: block id {b} outside this stage's pool [0, {self.num_blocks})")

    def _inputs(self, req: pb.ForwardRequest, num_tokens: int, hidden):
        if self.model.is_first:
            if len(req.token_ids) != num_tokens:
                raise InvalidArgument(f"{len(req.token_ids)} token ids for {num_tokens} scheduled tokens")
            ids = torch.tensor(req.token_ids, dtype=torch.long)
            vocab = self.model.cfg.vocab_size
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                raise InvalidArgument(f"token ids must be in [0, {vocab})")
            return ids, None  # on the host: run() moves it (or the graph path copies it)
        if num_tokens == 0:
            return None, None
        if hidden is None:
            if not req.HasField("hidden"):
                raise InvalidArgument("this stage is not the first: the request must carry hidden states")
            hidden = req.hidden
        hidden = wire.decode(hidden, aligned=self.device.type == "cpu")
        expect = (num_tokens, self.model.cfg.hidden_size)
        if tuple(hidden.shape) != expect:
            raise InvalidArgument(f"hidden states of shape {tuple(hidden.shape)}, expected {expect}")
        if self.device.type == "cuda":
            # A copy from pageable memory waits for the GPU work queued before it (the driver
            # stages it through a small pinned buffer): from pinned memory the step launches ahead.
            hidden = hidden.pin_memory()
        return None, hidden  # on the host: run() moves it (or the graph path copies it)

    def _launch_sample(self, req: pb.ForwardRequest, last_rows: list[int], out: torch.Tensor,
                       done: "Launched") -> None:
        """Queue the logits of the rows to sample and, when some row is greedy, their argmax (which
        later chunks that follow a sample read on the device); record where each sample is."""
        done.picks = [(i, c) for i, c in enumerate(req.chunks) if c.sample]
        if not done.picks:
            return
        rows = [last_rows[i] for i, _ in done.picks]
        if rows != list(range(out.shape[0])):  # else: every row, in order (a decode step)
            index = torch.tensor(rows, pin_memory=out.is_cuda).to(out.device, non_blocking=True)
            out = out.index_select(0, index)
        logits = self.model.compute_logits(out)  # [S, V] float32
        done.specs = [self.seqs[(req.lease_id, c.seq_id)].sampling for _, c in done.picks]
        greedy = [spec.greedy for spec in done.specs]
        if any(greedy):
            done.greedy = torch.argmax(logits, dim=-1)  # ties -> first, as HF (sampler.sample)
            done.greedy_host = _to_host_async(done.greedy)
        if not all(greedy):
            done.logits = logits  # drawn on the host in finish()
        if not self.model.is_first:
            return  # a chain's last stage: the first one notes the samples from its answer
        for row, ((_, c), is_greedy) in enumerate(zip(done.picks, greedy)):
            self.samples.record(req.lease_id, c.seq_id,
                                Sample(c.output_index, done.greedy, row) if is_greedy else None)

    def _follows(self, req: pb.ForwardRequest) -> list[tuple[int, Sample]]:
        """(token row, sample on the device) of each chunk that follows a sample of this stage (a
        single stage embeds what it sampled; samples.py). Later stages of a chain take hidden
        states and ignore the flag; a chain's first stage resolved it already (resolve_host_follows)."""
        if not (self.model.is_first and self.model.is_last):
            return []
        return [(row, self.samples.followed(req, c, self.seqs, device=True)) for row, c in follow_rows(req)]

    def resolve_host_follows(self, req: pb.ForwardRequest) -> None:
        """The first stage of a chain: put each followed sample, noted from the answer of the step
        that drew it (note_samples), in its place in req.token_ids and clear the flag. Runs before
        a TP stage broadcasts the request, so every rank runs the same ids. Chunks resolved before
        a raise (SampleBook.followed) stay resolved, correctly."""
        if not self.model.is_first or self.model.is_last:
            return
        for row, c in follow_rows(req):
            rec = self.samples.followed(req, c, self.seqs, device=False)
            if row >= len(req.token_ids):
                raise InvalidArgument(f"{len(req.token_ids)} token ids for more scheduled tokens")
            req.token_ids[row] = rec.token
            c.follows_sample = False

    def note_samples(self, req: pb.ForwardRequest, samples) -> None:
        """The first stage of a chain: the answer to `req` came back through it with `samples`."""
        self.samples.note(req, samples, self.seqs)

    def refused(self, req: pb.ForwardRequest) -> None:
        """A micro-batch failed here or further down the chain: steps that follow it fail at once."""
        self.samples.refused(req, self.seqs)


@dataclass
class Launched:
    """A step whose GPU work is queued: what `finish` needs to wait for and collect."""

    t0: float
    route: str  # decode_graph | mixed_graph | eager | none (no chunks)
    tokens: int
    hidden: torch.Tensor | None = None  # non-last stage: pinned host copy, valid after the event
    picks: list = field(default_factory=list)  # (chunk index, chunk) of the rows to sample
    specs: list = field(default_factory=list)
    greedy: torch.Tensor | None = None  # [S] argmax ids on the device (some row greedy)
    greedy_host: torch.Tensor | None = None  # their pinned host copy, valid after the event
    logits: torch.Tensor | None = None  # [S, V] when some row samples (drawn on the host)
    event: torch.cuda.Event | None = None  # the end of the step's GPU work
    start: torch.cuda.Event | None = None  # its start (what came before it on the stream is done)
    launch_s: float = 0.0


def _to_host_async(t: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor, queued into pinned memory (complete once the step's event
    is). A fresh pinned tensor from torch's caching host allocator, not a reused buffer: the
    server serialises it while this worker already runs the next micro-batch."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _spec(sp: pb.SamplingParams) -> SamplingSpec:
    top_p = sp.top_p if sp.HasField("top_p") else 1.0
    try:
        return SamplingSpec(temperature=sp.temperature, top_p=top_p, top_k=sp.top_k,
                            seed=sp.seed if sp.HasField("seed") else None)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc
