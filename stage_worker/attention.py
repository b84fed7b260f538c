"""Paged attention over a stage's KV pool, for mixed micro-batches.

A micro-batch is a flat token axis `[T]` that concatenates, per sequence, a run of new tokens: a
prefill chunk (possibly starting mid-prompt, chunked prefill) or a single decode token.
`AttnMetadata.build` turns (start_pos, num_tokens, block_table) per sequence into the index
tensors every layer reuses; the layer writes the new K/V at `slot_mapping` (fused_ops.rotary_and_cache),
then `attend` attends each query to its sequence's whole context read back from the pool. Decode sequences share one
padded SDPA call (their cost is dominated by call overhead); prefill chunks run one call each.

On a GPU the metadata is *paged* (`build(..., paged=True)`, the default there): index arrays are
computed with numpy in one pass and cross to the device in one pinned copy; decode tokens read
their context straight from the pool through block tables (`paged_decode`: a Triton
flash-decoding kernel, no gather, no padding to the longest context, no host sync, so a decode
step can be captured in a CUDA graph); prefill chunks use SDPA's fused kernels on the gathered
context. The CPU path is unchanged (exactly equal to transformers in float32).

The metadata is the same for every layer; what differs per layer is passed to `attend`: a
sliding window (a query sees its last `window` keys, itself included, as transformers'
`kv > q - window`; local layers of Gemma 2, Mistral-v0.1, Phi-3) and Gemma 2's attention-logit
soft cap. Both hold on every path: the CPU masks, paged decode and unified attention (Triton and
their references). The pool keeps every token's K/V; a window only narrows what is read.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from stage_worker.kernels import mla_expand
from stage_worker.kernels.mla_expand import ExpandPlan
from stage_worker.kernels.paged_decode import choose_splits, decode_config, paged_decode
from stage_worker.kernels.softmax import attention_torch
from stage_worker.kernels.unified_attention import tile_plan, unified_attention
from stage_worker.kv_cache import read_slots
from stagemesh.errors import InvalidArgument


@dataclass
class AttnMetadata:
    """Index tensors of one micro-batch; built once per step, shared by every layer."""

    positions: torch.Tensor  # [T] long: absolute position of each new token
    slot_mapping: torch.Tensor  # [T] long: KV slot where each new token's k/v is written
    query_start_loc: list[int]  # [S+1]: sequence i owns rows query_start_loc[i]:query_start_loc[i+1]
    start_pos: list[int]  # [S]: absolute position of each sequence's first new token
    context_lens: list[int]  # [S]: start_pos + num_tokens (tokens visible to the last query)
    context_slots: list[torch.Tensor]  # S x [context_len] long: slots of positions 0..ctx-1
    prefill_ids: list[int]  # sequences with num_tokens > 1 (looped)
    prefill_masks: dict[int, torch.Tensor | None]  # [1, 1, n, ctx] bool; None = plain causal
    decode_ids: list[int]  # sequences with num_tokens == 1 (batched)
    decode_rows: torch.Tensor | None  # [B] long: row in [T] of each decode token
    decode_slots: torch.Tensor | None  # [B, Lmax] long: context slots, padded with slot 0
    decode_mask: torch.Tensor | None  # [B, 1, 1, Lmax] bool: True where a key is real
    # Paged layout (GPU): decode rows read K/V through block tables instead of decode_slots.
    paged: bool = False
    block_tables: torch.Tensor | None = None  # [B, W] long: blocks of each decode sequence
    decode_ctx: torch.Tensor | None = None  # [B] long: context length of each decode sequence
    decode_max_ctx: int | None = None  # max of decode_ctx (host copy), None inside CUDA graphs
    num_splits: int = 0  # flash-decoding splits; 0 = choose from the batch shape
    decode_all: bool = False  # every row is a decode row, in order (skip gather/scatter)
    block_size: int = 0  # tokens per KV block (paged layout only)
    # Unified layout (GPU, mixed micro-batches): every row in one launch (unified_attention.py).
    tile_seq: torch.Tensor | None = None  # [G] long: sequence of each query tile, -1 = unused
    tile_row: torch.Tensor | None = None  # [G] long: first row of each tile
    seq_tables: torch.Tensor | None = None  # [S, W] long: block table of every sequence
    seq_lens: torch.Tensor | None = None  # [S] long: context length after this step
    qsl: torch.Tensor | None = None  # [S+1] long: query_start_loc on the device
    # Long prefill chunks of a unified micro-batch that take MLA's expanded form (kernels/mla_expand.py);
    # the unified tiles then leave out their rows.
    expand: ExpandPlan | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def last_rows(self) -> list[int]:
        """Row of each sequence's last new token: where its next-token logits come from."""
        return [end - 1 for end in self.query_start_loc[1:]]

    @property
    def unified(self) -> bool:
        """All rows go through one unified_attention launch (mixed micro-batch, GPU layout)."""
        return self.tile_seq is not None

    @classmethod
    def build(cls, chunks: list[tuple[int, int, list[int]]], block_size: int,
              device: torch.device | str = "cpu", paged: bool | None = None,
              tile_q: int | None = None, expand_min_tokens: int = 0) -> "AttnMetadata":
        """chunks[i] = (start_pos, num_tokens, block_table) of sequence i, in [T] order.

        The block table must cover positions 0..start_pos+num_tokens-1; InvalidArgument if not,
        since reading an unallocated block would silently attend to another sequence's KV.
        paged: the GPU layout (default on CUDA); False keeps the CPU reference layout.
        tile_q: with the paged layout, a micro-batch that is not all decode tokens gets the
        unified layout, tiles of `tile_q` query tokens (the model's `attention_tile_q`).
        expand_min_tokens: with the unified layout, chunks of at least this many tokens get an
        ExpandPlan (the model's `attention_expand_min_tokens`; 0: none).
        """
        if paged is None:
            paged = torch.device(device).type == "cuda"
        if paged:
            return cls._build_paged(chunks, block_size, torch.device(device), tile_q, expand_min_tokens)
        positions, slots, ctx_slots, starts, ctx_lens, qsl = [], [], [], [], [], [0]
        for i, (start, n, table) in enumerate(chunks):
            if start < 0 or n <= 0:
                raise InvalidArgument(f"sequence {i}: bad chunk start_pos={start} num_tokens={n}")
            ctx = start + n
            if len(table) * block_size < ctx:
                raise InvalidArgument(f"sequence {i}: block table of {len(table)} blocks cannot hold "
                                      f"{ctx} tokens (block_size={block_size})")
            pos = torch.arange(ctx, dtype=torch.long)
            table_t = torch.as_tensor(table, dtype=torch.long)
            seq_slots = table_t[pos // block_size] * block_size + pos % block_size  # [ctx]
            positions.append(pos[start:])
            slots.append(seq_slots[start:])
            ctx_slots.append(seq_slots)
            starts.append(start)
            ctx_lens.append(ctx)
            qsl.append(qsl[-1] + n)
        decode_ids = [i for i, (_, n, _) in enumerate(chunks) if n == 1]
        prefill_ids = [i for i, (_, n, _) in enumerate(chunks) if n > 1]
        masks = {i: _chunk_mask(starts[i], ctx_lens[i], device) for i in prefill_ids}
        rows = slots_pad = mask = None
        if decode_ids:
            lmax = max(ctx_lens[i] for i in decode_ids)
            slots_pad = torch.zeros(len(decode_ids), lmax, dtype=torch.long)
            mask = torch.zeros(len(decode_ids), 1, 1, lmax, dtype=torch.bool)
            for b, i in enumerate(decode_ids):
                slots_pad[b, : ctx_lens[i]] = ctx_slots[i]
                mask[b, ..., : ctx_lens[i]] = True
            rows = torch.tensor([qsl[i] for i in decode_ids], dtype=torch.long, device=device)
            slots_pad, mask = slots_pad.to(device), mask.to(device)
        empty = torch.zeros(0, dtype=torch.long)
        # One host-to-device copy for all sequences' context slots, then split into views.
        ctx_dev = torch.cat(ctx_slots or [empty]).to(device).split(ctx_lens) if ctx_slots else []
        return cls(
            positions=torch.cat(positions or [empty]).to(device),
            slot_mapping=torch.cat(slots or [empty]).to(device),
            query_start_loc=qsl, start_pos=starts, context_lens=ctx_lens,
            context_slots=list(ctx_dev), prefill_ids=prefill_ids, prefill_masks=masks,
            decode_ids=decode_ids,
            decode_rows=rows, decode_slots=slots_pad, decode_mask=mask,
        )


    @staticmethod
    def expands(chunks, expand_min_tokens: int, graph_min_tokens: int = 0) -> bool:
        """Whether `build` would give these chunks an ExpandPlan (with the unified layout) holding
        at least graph_min_tokens queries (the executor: leave a CUDA graph for it?)."""
        if expand_min_tokens <= 0 or all(n < expand_min_tokens for _, n, _ in chunks):
            return False
        ns = np.fromiter((n for _, n, _ in chunks), dtype=np.int64, count=len(chunks))
        starts = np.fromiter((s for s, _, _ in chunks), dtype=np.int64, count=len(chunks))
        picked = mla_expand.choose(ns, starts + ns, expand_min_tokens)
        return picked.size > 0 and int(ns[picked].sum()) >= graph_min_tokens

    @classmethod
    def _build_paged(cls, chunks, block_size: int, device: torch.device, tile_q: int | None,
                     expand_min_tokens: int = 0) -> "AttnMetadata":
        """Vectorised build; all index tensors cross to the device in one (pinned) copy."""
        s = len(chunks)
        starts = np.fromiter((c[0] for c in chunks), dtype=np.int64, count=s)
        ns = np.fromiter((c[1] for c in chunks), dtype=np.int64, count=s)
        ctx = starts + ns
        bad = np.nonzero((starts < 0) | (ns <= 0))[0]
        if bad.size:
            i = int(bad[0])
            raise InvalidArgument(f"sequence {i}: bad chunk start_pos={starts[i]} num_tokens={ns[i]}")
        need = -(-ctx // block_size)  # blocks each sequence must have
        for i, (_, _, table) in enumerate(chunks):
            if len(table) < need[i]:
                raise InvalidArgument(f"sequence {i}: block table of {len(table)} blocks cannot hold "
                                      f"{ctx[i]} tokens (block_size={block_size})")
        width = int(need.max()) if s else 1
        tables = np.zeros((s, width), dtype=np.int64)
        qsl, _, pos, slots = token_slots(chunks, tables, block_size, starts, ns)
        t = int(qsl[-1])
        decode_ids = np.nonzero(ns == 1)[0]
        prefill_ids = np.nonzero(ns > 1)[0]
        unified = tile_q is not None and len(decode_ids) < s
        expanded = mla_expand.choose(ns, ctx, expand_min_tokens) if unified else np.zeros(0, dtype=np.int64)
        expand_parts = mla_expand.plan_arrays(expanded, qsl, ctx, tables, block_size) if expanded.size else []
        if unified:  # one launch for every row: no per-sequence context slots needed
            tile_seq, tile_row = tile_plan(qsl, tile_q)
            if expanded.size:  # their rows are the expanded form's
                keep = ~np.isin(tile_seq, expanded)
                tile_seq, tile_row = tile_seq[keep], tile_row[keep]
            pre_slots = []
            extra = [ctx, qsl, tables.reshape(-1), tile_seq, tile_row, *expand_parts]
        else:
            pre_slots = []
            for i in prefill_ids:
                p = np.arange(ctx[i])
                pre_slots.append(tables[i, p // block_size] * block_size + p % block_size)
            extra = []
        parts = [pos, slots, qsl[decode_ids], ctx[decode_ids], tables[decode_ids].reshape(-1), *extra, *pre_slots]
        views = _pack(parts, device)
        pos_d, slots_d, rows_d, ctx_d, tables_d = views[:5]
        nd = len(decode_ids)
        unified_views = {}
        if unified:
            lens_d, qsl_d, all_tables_d, ts_d, tr_d = views[5:10]
            unified_views = dict(seq_lens=lens_d, qsl=qsl_d, seq_tables=all_tables_d.view(s, width),
                                 tile_seq=ts_d, tile_row=tr_d)
            if expand_parts:
                unified_views["expand"] = ExpandPlan(*views[10:16], all_rows=len(expand_parts[0]) == t)
        ctx_slots: list = [None] * s
        for i, v in zip(prefill_ids, views[5 + len(extra):]):
            ctx_slots[int(i)] = v
        starts_l, ctx_l = starts.tolist(), ctx.tolist()
        prefill_l = prefill_ids.tolist()
        return cls(
            positions=pos_d, slot_mapping=slots_d, query_start_loc=qsl.tolist(), start_pos=starts_l,
            context_lens=ctx_l, context_slots=ctx_slots, prefill_ids=prefill_l,
            prefill_masks={} if unified else {i: _chunk_mask(starts_l[i], ctx_l[i], device) for i in prefill_l},
            decode_ids=decode_ids.tolist(), decode_rows=rows_d if nd else None,
            decode_slots=None, decode_mask=None, paged=True,
            block_tables=tables_d.view(nd, width) if nd else None, decode_ctx=ctx_d if nd else None,
            decode_max_ctx=int(ctx[decode_ids].max()) if nd else None, decode_all=nd == s,
            block_size=block_size, **unified_views,
        )


def token_slots(chunks, tables: np.ndarray, block_size: int, starts: np.ndarray | None = None,
                ns: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The index arrays of a micro-batch, shared by the paged metadata and the graph buffers.

    chunks as AttnMetadata.build; starts, ns: their start positions and token counts when the
    caller has them already. Writes each sequence's blocks (as many as its context needs) into
    row i of `tables`, and returns (query_start_loc [S+1], context lengths [S], absolute position
    [T] and KV slot [T] of every new token).
    """
    s = len(chunks)
    if starts is None:
        starts = np.fromiter((c[0] for c in chunks), dtype=np.int64, count=s)
        ns = np.fromiter((c[1] for c in chunks), dtype=np.int64, count=s)
    ctx = starts + ns
    need = -(-ctx // block_size)
    for i, (_, _, table) in enumerate(chunks):
        tables[i, : need[i]] = table[: need[i]]
    qsl = np.zeros(s + 1, dtype=np.int64)
    np.cumsum(ns, out=qsl[1:])
    seq_of = np.repeat(np.arange(s), ns)  # [T]
    pos = starts[seq_of] + np.arange(int(qsl[-1])) - qsl[:-1][seq_of]  # [T]
    slots = tables[seq_of, pos // block_size] * block_size + pos % block_size  # [T]
    return qsl, ctx, pos, slots


def _pack(parts: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """The int64 arrays as views of one device tensor, filled by one (pinned) host-to-device copy.

    Each part starts on a 16-byte boundary: Triton specialises a kernel on its pointers'
    alignment, so views at odd offsets would compile a new variant mid-serving.
    """
    padded = [np.pad(p, (0, len(p) % 2)) for p in parts]
    packed = torch.from_numpy(np.concatenate(padded))
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    views = packed.split([len(p) for p in padded])
    return [v[: len(p)] for v, p in zip(views, parts)]


def attend(q: torch.Tensor, layer_kv: tuple[torch.Tensor, torch.Tensor], meta: AttnMetadata,
           scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q: [T, Hq, D] over each sequence's cached context (the new K/V already in the pool) -> [T, Hq, D].

    window: this layer's sliding window (None: full causal); softcap: its attention-logit cap.
    """
    k_cache, v_cache = layer_kv
    if meta.unified:
        return unified_attention(q, k_cache, v_cache, meta.seq_tables, meta.seq_lens, meta.qsl,
                                 meta.tile_seq, meta.tile_row, scale, meta.block_size,
                                 window=window, softcap=softcap)
    out = torch.empty_like(q)
    for i in meta.prefill_ids:
        a, b = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        ctx_slots = meta.context_slots[i]
        qi = q[a:b].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        ki = read_slots(k_cache, ctx_slots, q.dtype).transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
        vi = read_slots(v_cache, ctx_slots, q.dtype).transpose(0, 1).unsqueeze(0)
        mask = meta.prefill_masks[i]
        if window and window < meta.context_lens[i]:
            mask = _chunk_mask(meta.start_pos[i], meta.context_lens[i], q.device, window)
        oi = _sdpa(qi, ki, vi, mask, scale, softcap)  # [1, Hq, n, D]
        out[a:b] = oi[0].transpose(0, 1)
    if meta.paged and meta.decode_ids:
        qd = q if meta.decode_all else q[meta.decode_rows]  # [B, Hq, D]
        span = meta.decode_max_ctx  # keys a query reads: a window caps it (fewer, fuller splits)
        if window and span is not None:
            span = min(span, window)
        splits = meta.num_splits or choose_splits(qd.shape[0], k_cache.shape[1], span, num_sms(q.device),
                                                  decode_config(k_cache.dtype)[0])
        od = paged_decode(qd, k_cache, v_cache, meta.block_tables, meta.decode_ctx, scale,
                          meta.block_size, splits, meta.decode_max_ctx, window=window, softcap=softcap)
        if meta.decode_all:
            return od
        out[meta.decode_rows] = od
    elif meta.decode_ids:
        rows = meta.decode_rows
        qd = q[rows].unsqueeze(2)  # [B, Hq, 1, D]
        kd = read_slots(k_cache, meta.decode_slots, q.dtype).transpose(1, 2)  # [B, Hkv, Lmax, D]
        vd = read_slots(v_cache, meta.decode_slots, q.dtype).transpose(1, 2)
        mask = meta.decode_mask
        if window:  # the padded layout's key j is position j: keep the last `window` of each row
            ctx = torch.tensor([meta.context_lens[i] for i in meta.decode_ids], device=q.device)
            pos = torch.arange(mask.shape[-1], device=q.device)
            mask = mask & (pos[None, :] >= ctx[:, None] - window).view(mask.shape)
        od = _sdpa(qd, kd, vd, mask, scale, softcap)  # [B, Hq, 1, D]
        out[rows] = od.squeeze(2)
    return out


def _chunk_mask(start: int, ctx: int, device, window: int | None = None) -> torch.Tensor | None:
    """[1, 1, n, ctx] bool: query j (absolute position p = start+j) sees keys 0..p, or with a
    sliding window keys p-window+1..p.

    None for a full-causal chunk starting at 0, where plain `is_causal` lets SDPA pick a fused kernel.
    """
    if start == 0 and not window:
        return None
    qpos = torch.arange(start, ctx, device=device)  # [n]
    kpos = torch.arange(ctx, device=device)  # [ctx]
    mask = kpos[None, :] <= qpos[:, None]
    if window:
        mask &= kpos[None, :] > qpos[:, None] - window
    return mask[None, None]


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (split-count heuristics; an H100's 132 off CUDA)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _sdpa(q, k, v, mask, scale, softcap=None):
    """SDPA with grouped KV heads; enable_gqa avoids materialising repeated K/V.

    mask None means causal with queries and keys aligned (a chunk from position 0).
    On CUDA the KV heads are repeated instead, so that the flash / memory-efficient kernels
    apply (prefill is compute-bound; the repeat costs a few MB). SDPA has no soft cap: with one,
    the eager formula (kernels/softmax.attention_torch).
    """
    if softcap:
        return attention_torch(q, k, v, mask, scale, softcap)
    if q.is_cuda and q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          scale=scale, enable_gqa=q.shape[1] != k.shape[1])
