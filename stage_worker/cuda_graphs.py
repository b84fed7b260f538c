"""CUDA graphs of a stage's forward: decode-only micro-batches one graph per batch bucket
(`DecodeGraphs`), mixed ones one graph per token bucket (`MixedGraphs`, its own docstring).

A decode step of an 8B model launches ~700 small kernels; on their own they cost more host time
than the GPU needs to read the weights. A graph replays them in one launch. Graphs need fixed
shapes and addresses, so:

- batch sizes are rounded up to a bucket (1, 2, 4, 8, 16, 24, 32, 48, ...); padded rows decode a
  dummy token whose K/V go to the pool's scratch block (kv_cache.py), whose context is that one
  slot, and whose output is dropped;
- every index input (token ids, positions, slots, context lengths, block tables of width
  `max_context / block_size`) lives in one device int64 buffer, filled per step from one pinned
  host buffer with one async copy; non-first stages also copy the hidden states into a static
  buffer;
- attention reads K/V through the block tables (Triton paged decode, `kernels/paged_decode.py`), so the
  context length varies without changing the graph.

Both model families run here: Llama's K/V pool (kv_cache.PagedKVCache) and DeepSeek's latent pool
(mla_cache.MLAKVCache, `num_kv_heads` 1), whose attention is kernels/mla_decode (decode graphs:
its split count is a function of the bucket's batch and heads) and kernels/mla_prefill (mixed
graphs: the model's `attention_tile_q` sizes the tile plan). Padding rows write their latent to
the scratch block, as Llama's write their K/V.

Off CUDA the same padding and buffers run eagerly (`capture=False`), which is how the CPU tests
check that padding changes no real row. Not thread-safe: the stage's compute thread only.
"""

from __future__ import annotations

import numpy as np
import torch

from stage_worker.attention import AttnMetadata, num_sms, token_slots
from stage_worker.kernels.paged_decode import choose_splits
from stage_worker.kernels.unified_attention import max_tiles, tile_plan

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)
# Token counts of mixed micro-batches (prefill chunks + decode tokens), at most ~1/4 padding. Larger
# micro-batches run eagerly: on an H100 an 8B model's step of >= 2k tokens is compute-bound, so
# launching its kernels from Python costs nothing a graph would save (measured: 4k tokens, graph
# 102.1 ms, eager 101.9 ms), while a bucket would cost memory and padding.
MIXED_BUCKETS = (16, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280,
                 1536, 1792, 2048)


class _StagedGraphs:
    """What both kinds of graphs share: buckets, the per-step int64 inputs (named parts of one
    device buffer, filled through HostStaging by one async copy), the static hidden-state input
    of a non-first stage, and replay (or, off CUDA, the same forward run eagerly)."""

    def _setup(self, model, kv, block_size: int, buckets, capture, what: str) -> None:
        if kv.scratch_block is None:
            raise ValueError(f"{what} need a KV pool with a scratch block")
        self.model, self.kv, self.block_size = model, kv, block_size
        self.device = next(model.parameters()).device
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.buckets = sorted(buckets)
        self._graphs: dict = {}

    def _buffers(self, sizes: list[int], hidden_rows: int) -> None:
        """Parts of `sizes` int64 each, every one 16-byte aligned (Triton specialises on alignment)."""
        sizes = [n + n % 2 for n in sizes]
        self._offs = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        self._staging = HostStaging(self._offs[-1], self.device.type == "cuda")
        self._use(0)
        self._dev = torch.zeros(self._offs[-1], dtype=torch.long, device=self.device)
        h = self.model.cfg.hidden_size
        self._hidden = (None if self.model.is_first
                        else torch.zeros(hidden_rows, h, dtype=self.model.dtype, device=self.device))

    def bucket(self, n: int) -> int | None:
        for b in self.buckets:
            if b >= n:
                return b
        return None

    def _use(self, k: int) -> None:
        self._host, self._h = self._staging.bufs[k], self._staging.arrays[k]

    def _part(self, i: int, dev: bool = False):
        buf = self._dev if dev else self._h
        return buf[self._offs[i]:self._offs[i + 1]]

    def _step(self, bp: int, rows: int, copy_len: int, hidden: torch.Tensor | None, fill, patch=None):
        """Fill a free staging buffer (`fill()`), copy its first copy_len entries to the device,
        let `patch` change the device token ids (samples of an earlier step, executor.py), then
        replay bucket bp -> (the first `rows` output rows, what fill returned)."""
        k = self._staging.take()
        self._use(k)
        filled = fill()
        self._dev[:copy_len].copy_(self._host[:copy_len], non_blocking=True)
        self._staging.copied(k)
        if patch is not None:
            patch(self._part(0, dev=True))
        if hidden is not None:
            self._hidden[:rows].copy_(hidden, non_blocking=True)
        if self.capture:
            graph, out = self._graphs[bp]
            graph.replay()
        else:
            out = self._forward(bp)
        return out[:rows], filled

    def _capture_all(self) -> None:
        """The buffers hold padding (no real row) now: capture every bucket."""
        self._dev.copy_(self._host)
        self._graphs = capture_buckets(self.buckets, self._forward, self.device)


class DecodeGraphs(_StagedGraphs):
    """Replays the captured forward of `model` for decode-only micro-batches of <= max_batch."""

    def __init__(self, model, kv, block_size: int, buckets=DEFAULT_BUCKETS, max_context: int = 16384,
                 capture: bool | None = None):
        self._setup(model, kv, block_size, buckets, capture, "decode graphs")
        self.max_batch = self.buckets[-1]
        self.max_context = max_context
        self.width = -(-max_context // block_size)  # block-table columns
        m = self.max_batch
        # Parts: ids | positions | slots | ctx_lens | tables [m, width].
        self._buffers([m, m, m, m, m * self.width], m)
        for k in (0, 1):
            self._use(k)
            self._fill_padding(0, m)
        if self.capture:
            self._capture_all()

    # -- public --------------------------------------------------------------------------------
    def accepts(self, chunks: list[tuple[int, int, list[int]]]) -> bool:
        """True when every chunk is one decode token and the batch and contexts fit the graphs."""
        return (0 < len(chunks) <= self.max_batch
                and all(n == 1 and s + 1 <= self.max_context for s, n, _ in chunks))

    def run(self, chunks, token_ids: list[int] | None, hidden: torch.Tensor | None, patch=None) -> torch.Tensor:
        """chunks as AttnMetadata.build; returns hidden [B, H] (a view, valid until the next run)."""
        b = len(chunks)
        bp = self.bucket(b)
        # Only the first bp rows of tables are read by bucket bp.
        out, _ = self._step(bp, b, self._offs[4] + bp * self.width, hidden,
                            lambda: self._fill(chunks, token_ids, bp), patch)
        return out

    # -- internals -----------------------------------------------------------------------------
    def _tables(self, dev: bool = False):
        return self._part(4, dev)[: self.max_batch * self.width].reshape(self.max_batch, self.width)

    def _meta(self, bp: int) -> AttnMetadata:
        pos, slots, ctx = (self._part(i, dev=True)[:bp] for i in (1, 2, 3))
        splits = choose_splits(bp, self.kv.num_kv_heads, None, num_sms(self.device))
        return AttnMetadata(
            positions=pos, slot_mapping=slots, query_start_loc=list(range(bp + 1)), start_pos=[],
            context_lens=[], context_slots=[], prefill_ids=[], prefill_masks={},
            decode_ids=list(range(bp)), decode_rows=None, decode_slots=None, decode_mask=None,
            paged=True, block_tables=self._tables(dev=True)[:bp], decode_ctx=ctx, decode_max_ctx=None,
            num_splits=splits, decode_all=True, block_size=self.block_size,
        )

    def _forward(self, bp: int) -> torch.Tensor:
        ids = self._part(0, dev=True)[:bp]
        hidden = None if self._hidden is None else self._hidden[:bp]
        return self.model(ids if self.model.is_first else None, hidden, self._meta(bp), self.kv)

    def _fill_padding(self, lo: int, hi: int) -> None:
        """Rows [lo, hi): token 0 at position 0, K/V in the scratch block, context of one slot."""
        sb = self.kv.scratch_block
        self._part(0)[lo:hi] = 0
        self._part(1)[lo:hi] = 0
        self._part(2)[lo:hi] = sb * self.block_size
        self._part(3)[lo:hi] = 1
        self._tables()[lo:hi, 0] = sb

    def _fill(self, chunks, token_ids, bp: int) -> None:
        b = len(chunks)
        _, ctx, pos, slots = token_slots(chunks, self._tables(), self.block_size)
        self._part(0)[:b] = token_ids if token_ids is not None else 0
        self._part(1)[:b] = pos
        self._part(2)[:b] = slots
        self._part(3)[:b] = ctx
        self._fill_padding(b, bp)


class HostStaging:
    """Two pinned int64 buffers used in turn for a graph's per-step inputs.

    A step's host-to-device copy is queued, not done, when `run` returns (the worker launches the
    next micro-batch while this one runs), so the next step fills the *other* buffer, and waits
    for the copy that last read a buffer before filling it again.
    """

    def __init__(self, size: int, pin: bool):
        self.pin = pin  # pinned buffers only on CUDA, where copies are asynchronous
        self.bufs = [torch.zeros(size, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self.arrays = [b.numpy() for b in self.bufs]
        self._events: list = [None, None]
        self._turn = 0

    def take(self) -> int:
        """Index of the buffer to fill now (its previous copy finished)."""
        k = self._turn
        self._turn ^= 1
        if self._events[k] is not None:
            self._events[k].synchronize()
            self._events[k] = None
        return k

    def copied(self, k: int) -> None:
        """Mark buffer k as read by the copy just queued on the current stream."""
        if self.pin:
            self._events[k] = torch.cuda.Event()
            self._events[k].record()


def capture_buckets(buckets, forward, device) -> dict:
    """{bucket: (graph, output)}: `forward(bucket)` captured once per bucket, largest first so
    that the smaller graphs reuse the memory of the larger in one shared pool."""
    pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream(device)
    graphs = {}
    for bp in sorted(buckets, reverse=True):
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            forward(bp)  # warm-up: Triton compilation, cuBLAS handles, allocator
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = forward(bp)
        graphs[bp] = (graph, out)
    torch.cuda.synchronize(device)
    return graphs


class MixedGraphs(_StagedGraphs):
    """Replays the captured forward of `model` for mixed micro-batches, one graph per token bucket.

    A mixed micro-batch (prefill chunks and decode tokens) used to run eagerly: 17-32 ms of
    kernel launches per step on an 8B model, whatever its size. With the unified attention
    kernel (unified_attention.py) nothing in the forward depends on the host, so it is
    captured like a decode step:

    - the token count is rounded up to a bucket (MIXED_BUCKETS); padded rows embed token 0 at
      position 0, write their K/V to the pool's scratch block, and no tile covers them;
    - the attention grid is sized for the bucket's most tiles (`max_tiles(tokens, max_seqs)`);
      the host lists the real tiles and marks the rest -1 (they return at once);
    - all index inputs live in one device int64 buffer filled by one async copy from pinned memory:
      ids | positions | slots | seq_lens | query_start_loc | tile_seq | tile_row | tables [S, W];
      only the rows of tables that the step's sequences use are copied.

    Off CUDA the same buffers run eagerly (`capture=False`), so the CPU tests check the padding.
    Not thread-safe: the stage's compute thread only.
    """

    def __init__(self, model, kv, block_size: int, buckets=MIXED_BUCKETS, max_seqs: int = 256,
                 max_context: int = 16384, capture: bool | None = None):
        self._setup(model, kv, block_size, buckets, capture, "mixed graphs")
        if model.attention_tile_q is None:
            raise ValueError("mixed graphs need a model with unified attention (attention_tile_q)")
        self.max_tokens, self.max_seqs, self.max_context = self.buckets[-1], max_seqs, max_context
        self.tile_q = model.attention_tile_q
        self.width = -(-max_context // block_size)
        tm, sm = self.max_tokens, max_seqs
        gm = max_tiles(tm, sm, self.tile_q)
        self._buffers([tm, tm, tm, sm, sm + 1, gm, gm, sm * self.width], tm)
        if self.capture:
            self._pad_rows(0, tm)
            self._part(5)[:] = -1  # no tiles: attention does nothing during capture
            self._capture_all()

    def accepts(self, chunks: list[tuple[int, int, list[int]]]) -> bool:
        """True for a micro-batch with a prefill chunk that fits the buckets, seqs and context."""
        return (0 < len(chunks) <= self.max_seqs
                and sum(n for _, n, _ in chunks) <= self.max_tokens
                and any(n > 1 for _, n, _ in chunks)
                and all(s + n <= self.max_context for s, n, _ in chunks))

    def run(self, chunks, token_ids: list[int] | None, hidden: torch.Tensor | None,
            patch=None) -> tuple[torch.Tensor, list[int]]:
        """chunks as AttnMetadata.build -> (hidden [T, H] (a view, valid until the next run),
        the row of each sequence's last new token)."""
        t = sum(n for _, n, _ in chunks)
        bp = self.bucket(t)
        out, qsl = self._step(bp, t, self._offs[7] + len(chunks) * self.width, hidden,
                              lambda: self._fill(chunks, token_ids, t, bp), patch)
        return out, (qsl[1:] - 1).tolist()

    def _tables(self, dev: bool = False):
        return self._part(7, dev)[: self.max_seqs * self.width].reshape(self.max_seqs, self.width)

    def _forward(self, bp: int) -> torch.Tensor:
        g = max_tiles(bp, self.max_seqs, self.tile_q)
        ids, pos, slots, lens, qsl, ts, tr = (self._part(i, dev=True) for i in range(7))
        meta = AttnMetadata(
            positions=pos[:bp], slot_mapping=slots[:bp], query_start_loc=[], start_pos=[], context_lens=[],
            context_slots=[], prefill_ids=[], prefill_masks={}, decode_ids=[], decode_rows=None,
            decode_slots=None, decode_mask=None, paged=True, block_size=self.block_size,
            tile_seq=ts[:g], tile_row=tr[:g], seq_tables=self._tables(dev=True), seq_lens=lens, qsl=qsl,
        )
        hidden = None if self._hidden is None else self._hidden[:bp]
        return self.model(ids[:bp] if self.model.is_first else None, hidden, meta, self.kv)

    def _pad_rows(self, lo: int, hi: int) -> None:
        """Token rows [lo, hi): token 0 at position 0, K/V written to the scratch block."""
        self._part(0)[lo:hi] = 0
        self._part(1)[lo:hi] = 0
        self._part(2)[lo:hi] = self.kv.scratch_block * self.block_size

    def _fill(self, chunks, token_ids, t: int, bp: int) -> np.ndarray:
        s = len(chunks)
        qsl, ctx, pos, slots = token_slots(chunks, self._tables(), self.block_size)
        self._part(0)[:t] = token_ids if token_ids is not None else 0
        self._part(1)[:t] = pos
        self._part(2)[:t] = slots
        self._pad_rows(t, bp)
        self._part(3)[:s] = ctx
        self._part(4)[:s + 1] = qsl
        self._part(4)[s + 1:] = t
        g = max_tiles(bp, self.max_seqs, self.tile_q)
        tile_seq, tile_row = tile_plan(qsl, self.tile_q, size=g)
        self._part(5)[:g] = tile_seq
        self._part(6)[:g] = tile_row
        return qsl
