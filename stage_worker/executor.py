"""Executes one micro-batch on this stage's layers: a decoded step in, hidden/samples out.

A step arrives as a StepInput (step_input.py: the wire decoded and checked once, at the edge);
the executor checks it against the sequences it holds (lease_table.py) before changing any
state, so a refused step leaves every other sequence untouched, then routes it, launches it and
finishes it. It never sees a protobuf.

On CUDA, micro-batches replay a captured CUDA graph (cuda_graphs.py): decode-only ones a graph
per batch bucket, mixed ones (with prefill chunks) a graph per token bucket; what fits neither
runs eagerly with the same paged GPU attention. The only host synchronisation in a step is the copy of its
result out of the GPU: the sampled ids (last stage) or the hidden states into pinned memory. A chunk
may follow a sample the gateway has not seen yet (async scheduling): samples.py keeps where each is.

Runs on the worker's single compute thread (one micro-batch at a time), `finish` on the finish
thread; only note_samples and refused, on a chain's first stage, are called from the event loop
(samples.py says why that is safe).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from stage_worker.attention import AttnMetadata
from stage_worker.cuda_graphs import DecodeGraphs, MixedGraphs
from stage_worker.kv_cache import PagedKVCache
from stage_worker.step_profiler import StepProfiler
from stage_worker.lease_table import LeaseTable
from stage_worker import logprobs
from stage_worker.sampler import Row, sample_rows
from stage_worker.samples import Sample, SampleNotReady, put_samples
from stage_worker.step_input import StageShape, StepInput

@dataclass
class StepOutput:
    hidden: torch.Tensor | None  # [T, H] for the next stage; None on the last stage
    samples: list[tuple[int, int]]  # (seq_id, token) on the last stage
    compute_us: int
    logprobs: list = field(default_factory=list)  # per sample: sampler.TokenLogprobs or None
    prompt_logprobs: list = field(default_factory=list)  # (seq_id, start_pos, [TokenLogprobs]) (logprobs.py)


class StageExecutor:
    def __init__(self, model, kv: PagedKVCache, block_size: int, cuda_graphs: bool | None = None):
        """cuda_graphs: capture decode graphs (default: on CUDA when the pool has a scratch block)."""
        self.model = model
        self.kv = kv
        self.block_size = block_size
        self.num_blocks = kv.num_blocks
        self.device = next(model.parameters()).device
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and kv.scratch_block is not None
        self.graphs = DecodeGraphs(model, kv, block_size) if cuda_graphs else None
        self.tile_q = model.attention_tile_q if self.device.type == "cuda" else None
        self.expand_min = model.attention_expand_min_tokens if self.tile_q is not None else 0
        self.expand_graph_min = model.attention_expand_graph_min_tokens
        self.mixed_graphs = (MixedGraphs(model, kv, block_size)
                             if cuda_graphs and model.attention_tile_q is not None else None)
        self.shape = StageShape(model.is_first, model.is_last, model.cfg.vocab_size, model.cfg.hidden_size,
                                self.num_blocks, block_size, self.device.type)
        self.leases = LeaseTable(block_size)
        self.on_accept = None  # called with a step that passed every check, before it changes anything (TP)
        self.slowdown = 1.0
        self.steps = 0
        self._launches = 0  # launches run ahead of `steps` (counted when finished)
        self.compute_us_total = 0
        self.tokens_total = 0  # token rows computed (Stats.tokens_total)
        self.gpu_wait_us_total = 0.0  # CUDA: the device idle between steps (gaps < 1 s)
        self._last_end: torch.cuda.Event | None = None  # the end of the last finished step
        self._recent_us: deque[int] = deque(maxlen=64)
        self._profiler = StepProfiler.from_env(self.device)
        self._side_stream = None  # finish(): sampling off the compute stream (CUDA)
        # Last stage: a per-row additive bias on the logits before sampling (structured output's
        # token masks: -inf where a token is not allowed), called at launch while the forward runs:
        # fn(step, picks, specs) -> [S, V] tensor or None; plain_greedy rows take the arg-max of the
        # biased logits on the device, the others are processed and drawn with it (sampler.py).
        self.logits_bias = None
        self.grammar = None  # last stage: grammar.GrammarBook (structured output), set by grammar.attach

    # -- the lease table's writes (a TP stage's rank 0 mirrors these to its followers) ----------
    def release(self, lease_id: str, seq_ids=()) -> None:
        self.leases.release(lease_id, seq_ids)

    def reset(self) -> None:
        self.leases.reset()

    def claim(self, lease_id: str, owner: str, order: int, strict: bool = True) -> int:
        return self.leases.claim(lease_id, owner, order, strict)

    def expire_leases(self, ttl_s: float) -> int:
        """Drop sequences of leases not heard from for ttl_s (their gateway died); returns count."""
        return self.leases.drop_leases(self.leases.stale(ttl_s))

    def mean_step_us(self) -> float:
        return sum(self._recent_us) / len(self._recent_us) if self._recent_us else 0.0

    # -- execution -----------------------------------------------------------------------------
    def run(self, step: StepInput) -> StepOutput:
        """One micro-batch start to finish (launch, then finish)."""
        return self.finish(self.launch(step))

    def launch(self, step: StepInput) -> "Launched":
        """Check the step against the lease table, commit it, and queue its GPU work (forward,
        logits, argmax or the copy of the hidden states to pinned memory); returns before the GPU
        is done, so the server can launch the next micro-batch while this one runs. On the CPU the
        work is done here."""
        self._launches += 1
        if self._profiler is not None:
            self._profiler.step_begin(self._launches - 1)
        t0 = time.perf_counter()
        try:
            done = self._launch(step, t0)
        except SampleNotReady:
            self._launches -= 1  # not a step: it is launched again after the next one
            raise
        except Exception:
            self.refused(step.lease_id, step.outputs)
            raise
        done.launch_s = time.perf_counter() - t0
        if self.slowdown > 1.0:  # test/demo knob: a device `slowdown` times slower holds this thread longer
            time.sleep(done.launch_s * (self.slowdown - 1.0))
        return done

    def _accept(self, step: StepInput) -> tuple[dict[int, list[int]], list[tuple[int, Sample]]]:
        """Every check that needs this stage's state, then the commit: (block table of each
        chunk's sequence, (token row, device sample) of each chunk that follows one)."""
        self.leases.check_lease(step)
        self.resolve_host_follows(step)  # a chain's first stage (a TP stage's ran before broadcasting)
        follows = self._follows(step)
        tables = self.leases.plan(step)
        if self.on_accept is not None:
            self.on_accept(step)
        self.leases.commit(step, tables)
        return tables, follows

    def _launch(self, step: StepInput, t0: float) -> "Launched":
        tables, follows = self._accept(step)
        if self.grammar is not None:  # new constrained sequences: matchers built beside the forward
            self.grammar.prepare(step)
        input_ids, hidden = self._inputs(step)
        self.kv.copy_blocks(step.block_copies)  # copy-on-write of shared blocks, before anyone writes
        done = Launched(t0, "none", step.num_tokens)
        if not step.chunks:
            done.hidden = None if self.model.is_last else torch.empty(0, self.model.cfg.hidden_size)
            return done
        chunks = [(c.start_pos, c.num_tokens, tables[c.seq_id]) for c in step.chunks]
        if self.device.type == "cuda":  # the stream reaches it once the step before is done
            done.start = torch.cuda.Event(enable_timing=True)
            done.start.record(torch.cuda.current_stream(self.device))
        patch = (lambda ids: put_samples(follows, ids)) if follows else None
        if self.graphs is not None and self.graphs.accepts(chunks):
            ids = step.token_ids if self.model.is_first else None
            out = self.graphs.run(chunks, ids, hidden, patch)  # [B, H]; row i = chunk i
            last_rows, done.route = list(range(len(chunks))), "decode_graph"
        elif self.mixed_graphs is not None and self.mixed_graphs.accepts(chunks) and not self._expands(chunks):
            ids = step.token_ids if self.model.is_first else None
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
            meta = AttnMetadata.build(chunks, self.block_size, self.device, tile_q=self.tile_q,
                                      expand_min_tokens=self.expand_min)
            out = self.model(input_ids, hidden, meta, self.kv)  # [T, H]
            last_rows = meta.last_rows
        if self.model.is_last:
            states = {c.seq_id: self.leases.get(step.lease_id, c.seq_id) for c in step.chunks}
            done.prompt = logprobs.plan(self.model, out, step, states, done.route == "decode_graph")
            self._launch_sample(step, last_rows, out, done)
        else:
            done.hidden = _to_host_async(out)
        if self.device.type == "cuda":
            done.event = torch.cuda.Event(enable_timing=True)
            done.event.record(torch.cuda.current_stream(self.device))
        return done

    def _expands(self, chunks) -> bool:
        """Enough long chunks for the model's other attention form (it runs eagerly) to pay for
        leaving the mixed graphs (the model's attention_expand_graph_min_tokens); past the graphs'
        buckets every long chunk takes it."""
        return AttnMetadata.expands(chunks, self.expand_min, self.expand_graph_min)

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
                drawn = self._sample_after(done)
                tokens, result.logprobs = drawn.tokens, drawn.logprobs
                _note_history(done, tokens)
            if self.grammar is not None:  # constrained rows: advance, start their next masks now
                self.grammar.advance(done.picks, tokens)
            result.samples = [(c.seq_id, t) for (_, c), t in zip(done.picks, tokens)]
        if done.prompt:
            result.prompt_logprobs = logprobs.collect(done.prompt)
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
        self.tokens_total += done.tokens
        self.compute_us_total += result.compute_us
        self._recent_us.append(result.compute_us)
        if self._profiler is not None:
            self._profiler.step_end(done.route, result.compute_us, done.tokens)
        return result

    def _sample_after(self, done: "Launched"):
        """Draw the tokens of a step with sampled rows (sampler.Drawn). On CUDA this runs on a side
        stream that waits for this step only: on the compute stream its copies would queue behind
        the step launched after it, and its answer would come back a step late."""
        rows = [Row(spec, c.output_index, st.history if spec.needs_history else None, st.num_prompt)
                for spec, st, (_, c) in zip(done.specs, done.states, done.picks)]
        if done.event is None:
            return sample_rows(done.logits, rows, done.bias)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        self._side_stream.wait_event(done.event)
        with torch.cuda.stream(self._side_stream):
            return sample_rows(done.logits, rows, done.bias)

    def _inputs(self, step: StepInput):
        """The step's token ids (first stage) or hidden states, on the host: the eager route moves
        them to the device, the graph routes copy them into their buffers."""
        if self.model.is_first:
            return torch.tensor(step.token_ids, dtype=torch.long), None
        hidden = step.hidden
        if hidden is not None and self.device.type == "cuda":
            # A copy from pageable memory waits for the GPU work queued before it (the driver
            # stages it through a small pinned buffer): from pinned memory the step launches ahead.
            hidden = hidden.pin_memory()
        return None, hidden

    def _launch_sample(self, step: StepInput, last_rows: list[int], out: torch.Tensor,
                       done: "Launched") -> None:
        """Queue the logits of the rows to sample and, when some row is greedy, their argmax (which
        later chunks that follow a sample read on the device); record where each sample is."""
        done.picks = [(i, c) for i, c in enumerate(step.chunks) if c.sample]
        if not done.picks:
            return
        rows = [last_rows[i] for i, _ in done.picks]
        if rows != list(range(out.shape[0])):  # else: every row, in order (a decode step)
            index = torch.tensor(rows, pin_memory=out.is_cuda).to(out.device, non_blocking=True)
            out = out.index_select(0, index)
        logits = self.model.compute_logits(out)  # [S, V] float32
        done.states = [self.leases.get(step.lease_id, c.seq_id) for _, c in done.picks]
        done.specs = [st.sampling for st in done.states]
        greedy = [spec.plain_greedy for spec in done.specs]
        # Structured output's masks (-inf where a grammar forbids a token), waited for here: on a GPU
        # the forward queued above runs meanwhile. Greedy rows take the masked arg-max on the device.
        bias = self.logits_bias(step, done.picks, done.specs) if self.logits_bias is not None else None
        if any(greedy):
            scores = logits if bias is None else logits + bias
            done.greedy = torch.argmax(scores, dim=-1)  # ties -> first, as HF (sampler.sample)
            done.greedy_host = _to_host_async(done.greedy)
        if not all(greedy):
            done.logits = logits  # processed and drawn in finish()
            done.bias = bias
        if not self.model.is_first:
            return  # a chain's last stage: the first one notes the samples from its answer
        for row, ((_, c), is_greedy) in enumerate(zip(done.picks, greedy)):
            self.leases.samples.record(step.lease_id, c.seq_id,
                                       Sample(c.output_index, done.greedy, row) if is_greedy else None)

    def _follows(self, step: StepInput) -> list[tuple[int, Sample]]:
        """(token row, sample on the device) of each chunk that follows a sample of this stage (a
        single stage embeds what it sampled; samples.py). Later stages of a chain take hidden
        states (decode drops the flag); a chain's first stage resolved it already (resolve_host_follows)."""
        if not (self.model.is_first and self.model.is_last):
            return []
        book, leases = self.leases.samples, self.leases
        return [(c.row, book.followed(step, c, leases.get(step.lease_id, c.seq_id), device=True))
                for c in step.follows]

    def resolve_host_follows(self, step: StepInput) -> None:
        """The first stage of a chain: put each followed sample, noted from the answer of the step
        that drew it (note_samples), in its place in step.token_ids. Runs before a TP stage
        broadcasts the step, so every rank runs the same ids. Chunks resolved before a raise
        (SampleBook.followed) stay resolved, correctly."""
        if not self.model.is_first or self.model.is_last:
            return
        while step.follows:
            c = step.follows[0]
            rec = self.leases.samples.followed(step, c, self.leases.get(step.lease_id, c.seq_id), device=False)
            step.token_ids[c.row] = rec.token
            c.follows_sample = False
            step.follows.pop(0)

    def note_samples(self, step: StepInput, samples) -> None:
        """The first stage of a chain: the answer to `step` came back through it with `samples`
        ((seq_id, token_id) each)."""
        self.leases.samples.note(step, samples, self.leases)

    def refused(self, lease_id: str, outputs) -> None:
        """A micro-batch failed here or further down the chain: steps that follow its samples
        ((seq_id, output_index) each) fail at once."""
        self.leases.samples.refused(lease_id, outputs, self.leases)


@dataclass
class Launched:
    """A step whose GPU work is queued: what `finish` needs to wait for and collect."""

    t0: float
    route: str  # decode_graph | mixed_graph | eager | none (no chunks)
    tokens: int
    hidden: torch.Tensor | None = None  # non-last stage: pinned host copy, valid after the event
    picks: list = field(default_factory=list)  # (chunk index, chunk) of the rows to sample
    specs: list = field(default_factory=list)
    states: list = field(default_factory=list)  # their sequences' SeqState (penalties' history)
    bias: torch.Tensor | None = None  # [S, V] added to the logits before sampling (StageExecutor.logits_bias)
    prompt: list = field(default_factory=list)  # logprobs.PromptScores of the step's prompt rows
    greedy: torch.Tensor | None = None  # [S] argmax ids on the device (some row greedy)
    greedy_host: torch.Tensor | None = None  # their pinned host copy, valid after the event
    logits: torch.Tensor | None = None  # [S, V] when some row samples (drawn on the host)
    event: torch.cuda.Event | None = None  # the end of the step's GPU work
    start: torch.cuda.Event | None = None  # its start (what came before it on the stream is done)
    launch_s: float = 0.0


def _note_history(done: Launched, tokens: list[int]) -> None:
    """Penalties: each sequence's history gets the token it drew, in its place (a step run again
    after a lost answer overwrites, never appends twice)."""
    for spec, st, (_, c), tok in zip(done.specs, done.states, done.picks, tokens):
        if spec.needs_history and st is not None:
            del st.history[st.num_prompt + c.output_index:]
            st.history.append(tok)


def _to_host_async(t: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor, queued into pinned memory (complete once the step's event
    is). A fresh pinned tensor from torch's caching host allocator, not a reused buffer: the
    server serialises it while this worker already runs the next micro-batch."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host

