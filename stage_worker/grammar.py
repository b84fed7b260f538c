"""Structured output on the last stage: a grammar matcher per constrained sequence, and its masks.

A sequence whose sampling has a grammar (SamplingParams.grammar; stagemesh/grammar.py) gets an
llguidance matcher here. Before each of its samples the stage adds -inf to the logit of every token
the grammar does not allow next (the executor's `logits_bias` hook, applied by sampler.sample_rows
before anything else), so whatever the model prefers, the completion stays inside the grammar; once
the grammar is complete only end-of-sequence is allowed.

The mask is computed off the step's critical path:

    finish(step t):   tokens known -> `advance`: matcher.consume_token, mask(t+1) submitted to the
                      mask threads at once
    launch(step t+1): forward queued -> `bias`: waits for mask(t+1) (done by then: it had the
                      gateway round trip and the forward to run in) and expands it on the device

A sequence new here has its matcher built and first mask computed in a thread too, started by
`prepare` when its step launches, before the forward (the prefill hides it). llguidance drops
the GIL while it computes a mask, so the threads run beside the forward also on the CPU. The
matcher follows `output_index`: a step sent again (its answer lost) rolls it back; a replayed
sequence (new on this stage with outputs already) is advanced over the outputs in its history_ids.
`bias` runs on the compute thread, `advance` on the finish thread; one sequence is in one
micro-batch at a time, so its matcher is never used by two steps at once.
"""

from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from stagemesh.errors import Aborted, InvalidArgument
from stagemesh.gguf_file import is_gguf
from stagemesh.gguf_tokenizer import gguf_tokenizer
from stagemesh.grammar import GrammarSpec, llguidance_grammar


FOLLOW_TIMEOUT_S = 30.0  # a follower waits this long for the sample it follows to be finished
MAX_ROLLBACK = 16  # tokens a matcher may undo (a step sent again after its answer was lost: one)


class SeqGrammar:
    """One sequence's matcher, the number of tokens it has accepted, and the pending mask."""

    def __init__(self, matcher, words: int, eos_ids: tuple[int, ...]):
        self.m = matcher
        self.words = words
        self.eos_ids = eos_ids
        self.accepted = 0
        self.future: Future | None = None
        self.future_at = -1  # the output index the pending mask is for

    def fill(self) -> torch.Tensor:
        """The mask for the next token: [words] int32, bit j of word i = token 32 i + j allowed."""
        mask = torch.zeros(self.words, dtype=torch.int32)
        self.m.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        if not bool(mask.any()):  # stopped or in error: only end-of-sequence, never an empty row
            for t in self.eos_ids:
                mask[t // 32] |= _bit(t % 32)
        return mask

    def consume(self, token: int) -> None:
        if not self.m.is_stopped():  # past the end (ignore_eos) there is nothing more to match
            self.m.consume_token(token)
        self.accepted += 1


def _bit(j: int) -> int:
    return (1 << j) - (1 << 32) if j == 31 else 1 << j  # as int32


def mask_threads() -> int:
    """Mask threads: half the cores, 2 to 8. A step's masks are computed at once (one per
    constrained row, ~15 us median and ~100 us mean each for a JSON schema over a 128k vocabulary,
    benchmarks/bench_grammar.py), and they must be done before the forward beside them is."""
    return max(2, min(8, (os.cpu_count() or 2) // 2))


class GrammarBook:
    """Every constrained sequence of this (last) stage, keyed by (lease, seq_id); the llguidance
    tokenizer, built from the checkpoint's tokenizer.json on first use; the mask threads."""

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_ids, leases, device: torch.device,
                 threads: int | None = None):
        self.model_dir = Path(model_dir)
        self.leases = leases  # the executor's LeaseTable: each sequence's sampling (and grammar)
        self.device = device
        self._launched: dict[int, list[tuple[int, SeqGrammar]]] = {}  # id(picks) -> constrained rows
        self._lock = threading.Lock()  # _launched: written at launch, read at finish
        self._prepared = None  # the step prepare() last ran for
        self._cond = threading.Condition()  # a matcher advanced (finish) -> a follower waiting (launch)
        self.vocab_size = vocab_size
        self.eos_ids = tuple(int(t) for t in eos_ids)
        self._pool = ThreadPoolExecutor(threads or mask_threads(), thread_name_prefix="grammar")
        weakref.finalize(self, self._pool.shutdown, wait=False)  # an executor replaced (re-plan): its threads go
        self._tokenizer = None
        self._tok_lock = threading.Lock()
        self.seqs: dict[tuple[str, int], SeqGrammar] = {}

    # -- launch (compute thread) -------------------------------------------------------------------
    def bias(self, step, picks, specs) -> torch.Tensor | None:
        """StageExecutor.logits_bias: [S, V] on the device, -inf where a constrained row's grammar
        forbids a token, 0 elsewhere (None: no row is constrained). Called at launch, after the
        forward was queued (on a GPU it overlaps the forward; masks made in advance() are ready).
        A row that follows a sample not finished yet (async scheduling) waits for it here."""
        self.prepare(step)  # done already at launch (executor), unless called alone
        if not self.seqs:
            return None
        rows, masks, owners = [], [], []
        for i, (_, c) in enumerate(picks):
            g = self.seqs.get((step.lease_id, c.seq_id))
            if g is not None and c.sample:
                self._mask_on_its_way(g, c.output_index)
                rows.append(i)
                masks.append(g.future.result())
                owners.append((i, g))
        if not rows:
            return None
        with self._lock:
            while len(self._launched) >= 64:  # steps that failed before finish(): forget the oldest
                self._launched.pop(next(iter(self._launched)))
            self._launched[id(picks)] = owners
        return bitmask_bias(masks, rows, len(picks), self.vocab_size, self.device)

    def prepare(self, step) -> None:
        """At launch, before the forward: a matcher for each constrained sequence new here
        (advanced over the outputs in its history), built in a mask thread; drops the matchers of
        sequences gone. Once per step; it never waits (a follower's wait is bias()'s)."""
        if self._prepared is step:
            return
        self._prepared = step
        if not self.seqs and not any(getattr(ns.sampling, "grammar", None) is not None for ns in step.new.values()):
            return  # no constrained sequence here: nothing per chunk (every step of the stage comes here)
        leases = self.leases
        self._prune(leases)
        for c in step.chunks:
            key = (step.lease_id, c.seq_id)
            if c.seq_id in step.new:  # (re)admitted: whatever was kept under its id is stale
                self.seqs.pop(key, None)
            state = leases.get(step.lease_id, c.seq_id)
            grammar = getattr(state.sampling, "grammar", None) if state is not None else None
            if grammar is not None and key not in self.seqs:
                self._new(key, grammar, step.new.get(c.seq_id))

    # -- finish (finish thread) ------------------------------------------------------------------
    def advance(self, picks, tokens: list[int]) -> None:
        """The step's tokens are known: each constrained sequence consumes its own, and the mask for
        its next token starts at once, in a thread (overlapping the next steps' forwards)."""
        with self._lock:
            owners = self._launched.pop(id(picks), ())
        for i, g in owners:
            g.future.result()  # the mask of this token (it was applied)
            with self._cond:
                g.consume(tokens[i])
                g.future, g.future_at = self._pool.submit(g.fill), g.accepted
                self._cond.notify_all()

    # -- internals -------------------------------------------------------------------------------
    def _new(self, key, spec: GrammarSpec, new_seq) -> None:
        """A matcher for a sequence new on this stage, advanced over the outputs it already has (a
        replay: history_ids after its prompt); built in a mask thread, beside the forward."""
        history = list(getattr(new_seq, "history", None) or ())
        outputs = history[getattr(new_seq, "num_prompt", len(history)):]
        g = SeqGrammar(None, 0, self.eos_ids)
        g.accepted = g.future_at = len(outputs)
        g.future = self._pool.submit(self._build, g, spec, outputs)
        self.seqs[key] = g

    def _build(self, g: SeqGrammar, spec: GrammarSpec, outputs: list[int]) -> torch.Tensor:
        """In a mask thread: compile, advance over earlier outputs, first mask."""
        import llguidance

        tok = self.tokenizer()
        g.m = llguidance.LLMatcher(tok, llguidance_grammar(spec, llguidance.LLMatcher),
                                   limits=None, log_level=0)
        g.words = (tok.vocab_size + 31) // 32
        if g.m.is_error():
            raise InvalidArgument(f"grammar does not compile: {g.m.get_error()}")
        for t in outputs:
            g.m.consume_token(t)
        return g.fill()

    def _mask_on_its_way(self, g: SeqGrammar, output_index: int) -> None:
        if g.accepted < output_index:  # it follows a sample whose step is not finished (async scheduling)
            self._wait_for_sample(g, output_index)
        if g.future_at == output_index:
            return
        g.future.result()  # nothing may run on the matcher while it moves
        back = g.accepted - output_index
        if back < 0:
            raise InvalidArgument(f"a constrained sequence samples output {output_index} with "
                                  f"{g.accepted} outputs known: a replayed one needs them in history_ids")
        if back > MAX_ROLLBACK or not g.m.rollback(back):
            raise InvalidArgument(f"constrained sequence at output {g.accepted}, step samples output "
                                  f"{output_index}: cannot move its grammar back there")
        g.accepted = output_index
        g.future, g.future_at = self._pool.submit(g.fill), output_index

    def _wait_for_sample(self, g: SeqGrammar, output_index: int) -> None:
        """A step that follows its sequence's previous sample (async scheduling) launched before
        that sample's step finished: wait for finish() to advance the matcher over it. On a GPU
        this runs after the forward was queued, so the device keeps working."""
        with self._cond:
            if not self._cond.wait_for(lambda: g.accepted >= output_index, timeout=FOLLOW_TIMEOUT_S):
                raise Aborted(f"constrained sequence: output {output_index - 1} was not sampled within "
                              f"{FOLLOW_TIMEOUT_S} s (its step failed?); schedule it again")

    def _prune(self, leases) -> None:
        for key in [k for k in self.seqs if k not in leases]:
            del self.seqs[key]

    def tokenizer(self):
        """The llguidance tokenizer of this checkpoint (about 0.5 s for a 128k vocabulary, once)."""
        with self._tok_lock:
            if self._tokenizer is None:
                import llguidance

                text = _tokenizer_json(self.model_dir)
                vocab = max(self.vocab_size, _tokenizer_size(text))
                self._tokenizer = llguidance.LLTokenizer(text, n_vocab=vocab, eos_token=list(self.eos_ids))
            return self._tokenizer

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _tokenizer_json(model_dir: Path) -> str:
    """The checkpoint's tokenizer as tokenizers JSON: tokenizer.json, or built from a .gguf file's
    metadata (as the gateway builds it)."""
    if is_gguf(model_dir):
        tok = gguf_tokenizer(str(model_dir))
        if tok is not None:
            return tok.to_str()
    elif (model_dir / "tokenizer.json").is_file():
        return (model_dir / "tokenizer.json").read_text()
    raise InvalidArgument(f"structured output needs the checkpoint's tokenizer ({model_dir} has none)")


def _tokenizer_size(text: str) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(text).get_vocab_size(with_added_tokens=True)


def bitmask_bias(masks: list[torch.Tensor], rows: list[int], num_rows: int, vocab: int, device) -> torch.Tensor:
    """masks: R [W] int32 bitmasks of `rows` -> [num_rows, vocab] float32 on `device`: -inf where
    a row's bit is 0 (and past the mask's width), 0 elsewhere and in every other row.

    On CUDA the packed masks and the row index go up from pinned memory: a copy from pageable
    memory waits for the work queued before it, i.e. the forward this bias is computed beside,
    and the launch of the next step would wait with it (async scheduling lost)."""
    packed, index = torch.stack(masks), torch.tensor(rows)
    if torch.device(device).type == "cuda":
        packed, index = packed.pin_memory(), index.pin_memory()
    packed, index = packed.to(device, non_blocking=True), index.to(device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    allowed = ((packed.unsqueeze(-1) >> shifts) & 1).view(len(rows), -1).bool()  # [R, 32 W]
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    row_bias = torch.zeros(len(rows), vocab, device=device).masked_fill_(~allowed[:, :vocab], float("-inf"))
    return torch.zeros(num_rows, vocab, dtype=torch.float32, device=device).index_copy_(0, index, row_bias)


def attach(executor, model_dir: str | Path) -> None:
    """Give a last stage's executor structured output: its grammar book, as its logits bias."""
    if not executor.model.is_last:
        return
    cfg = executor.model.cfg
    book = GrammarBook(model_dir, cfg.vocab_size, getattr(cfg, "eos_token_ids", ()), executor.leases,
                       executor.device)
    executor.grammar = book
    executor.logits_bias = book.bias
