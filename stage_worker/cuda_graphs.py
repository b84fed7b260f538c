"""CUDA graphs of a stage's forward for pure-decode micro-batches, one graph per batch bucket.

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
- attention reads K/V through the block tables (Triton paged decode, `paged_decode.py`), so the
  context length varies without changing the graph.

Off CUDA the same padding and buffers run eagerly (`capture=False`), which is how the CPU tests
check that padding changes no real row. Not thread-safe: the stage's compute thread only.
"""

from __future__ import annotations

import numpy as np
import torch

from stage_worker.attention import AttnMetadata, _num_sms
from stage_worker.paged_decode import choose_splits

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class DecodeGraphs:
    """Replays the captured forward of `model` for decode-only micro-batches of <= max_batch."""

    def __init__(self, model, kv, block_size: int, buckets=DEFAULT_BUCKETS, max_context: int = 16384,
                 capture: bool | None = None):
        if kv.scratch_block is None:
            raise ValueError("decode graphs need a KV pool with a scratch block")
        self.model, self.kv, self.block_size = model, kv, block_size
        self.device = next(model.parameters()).device
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.buckets = sorted(buckets)
        self.max_batch = self.buckets[-1]
        self.max_context = max_context
        self.width = -(-max_context // block_size)  # block-table columns
        m, w = self.max_batch, self.width
        # Layout of the int64 buffers: ids | positions | slots | ctx_lens | tables [m, w].
        self._offs = [0, m, 2 * m, 3 * m, 4 * m, 4 * m + m * w]
        pin = self.device.type == "cuda"
        self._host = torch.zeros(self._offs[-1], dtype=torch.long, pin_memory=pin)
        self._host_np = self._host.numpy()
        self._dev = torch.zeros(self._offs[-1], dtype=torch.long, device=self.device)
        self._fill_padding(0, m)
        self._dev.copy_(self._host)
        h = model.cfg.hidden_size
        self._hidden = None if model.is_first else torch.zeros(m, h, dtype=model.dtype, device=self.device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        if self.capture:
            self._capture_all()

    # -- public --------------------------------------------------------------------------------
    def bucket(self, batch: int) -> int | None:
        for b in self.buckets:
            if b >= batch:
                return b
        return None

    def accepts(self, chunks: list[tuple[int, int, list[int]]]) -> bool:
        """True when every chunk is one decode token and the batch and contexts fit the graphs."""
        return (0 < len(chunks) <= self.max_batch
                and all(n == 1 and s + 1 <= self.max_context for s, n, _ in chunks))

    def run(self, chunks, token_ids: list[int] | None, hidden: torch.Tensor | None) -> torch.Tensor:
        """chunks as AttnMetadata.build; returns hidden [B, H] (a view, valid until the next run)."""
        b = len(chunks)
        bp = self.bucket(b)
        self._fill(chunks, token_ids, bp)
        n = self._offs[4] + bp * self.width
        # Only the first 4 * max_batch + bp rows of tables are read by bucket bp.
        self._dev[:n].copy_(self._host[:n], non_blocking=True)
        if hidden is not None:
            self._hidden[:b].copy_(hidden, non_blocking=True)
        if self.capture:
            graph, out = self._graphs[bp]
            graph.replay()
            return out[:b]
        return self._forward(bp)[:b]

    # -- internals -----------------------------------------------------------------------------
    def _views(self, bp: int):
        o, d = self._offs, self._dev
        ids, pos, slots, ctx = d[o[0]:o[0] + bp], d[o[1]:o[1] + bp], d[o[2]:o[2] + bp], d[o[3]:o[3] + bp]
        tables = d[o[4]:o[5]].view(self.max_batch, self.width)[:bp]
        return ids, pos, slots, ctx, tables

    def _meta(self, bp: int) -> AttnMetadata:
        _, pos, slots, ctx, tables = self._views(bp)
        splits = choose_splits(bp, self.kv.num_kv_heads, None, _num_sms(self.device))
        return AttnMetadata(
            positions=pos, slot_mapping=slots, query_start_loc=list(range(bp + 1)), start_pos=[],
            context_lens=[], context_slots=[], prefill_ids=[], prefill_masks={},
            decode_ids=list(range(bp)), decode_rows=None, decode_slots=None, decode_mask=None,
            paged=True, block_tables=tables, decode_ctx=ctx, decode_max_ctx=None,
            num_splits=splits, decode_all=True, block_size=self.block_size,
        )

    def _forward(self, bp: int) -> torch.Tensor:
        ids = self._views(bp)[0]
        hidden = None if self._hidden is None else self._hidden[:bp]
        return self.model(ids if self.model.is_first else None, hidden, self._meta(bp), self.kv)

    def _fill_padding(self, lo: int, hi: int) -> None:
        """Rows [lo, hi): token 0 at position 0, K/V in the scratch block, context of one slot."""
        o, h, sb = self._offs, self._host_np, self.kv.scratch_block
        h[o[0] + lo:o[0] + hi] = 0
        h[o[1] + lo:o[1] + hi] = 0
        h[o[2] + lo:o[2] + hi] = sb * self.block_size
        h[o[3] + lo:o[3] + hi] = 1
        h[o[4]:o[5]].reshape(self.max_batch, self.width)[lo:hi, 0] = sb

    def _fill(self, chunks, token_ids, bp: int) -> None:
        o, h, bs = self._offs, self._host_np, self.block_size
        b = len(chunks)
        pos = np.fromiter((s for s, _, _ in chunks), dtype=np.int64, count=b)
        tables = h[o[4]:o[5]].reshape(self.max_batch, self.width)
        for i, (s, _, table) in enumerate(chunks):
            nb = s // bs + 1
            tables[i, :nb] = table[:nb]
        rows = np.arange(b)
        h[o[0]:o[0] + b] = token_ids if token_ids is not None else 0
        h[o[1]:o[1] + b] = pos
        h[o[2]:o[2] + b] = tables[rows, pos // bs] * bs + pos % bs
        h[o[3]:o[3] + b] = pos + 1
        self._fill_padding(b, bp)

    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for bp in reversed(self.buckets):  # largest first: smaller graphs reuse its pool memory
            self._fill_padding(0, bp)
            self._dev.copy_(self._host)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._forward(bp)  # warm-up: Triton compilation, cuBLAS handles, allocator
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(bp)
            self._graphs[bp] = (graph, out)
        torch.cuda.synchronize(self.device)
