"""Sort the (token, slot) pairs of a routed batch by expert, padded per expert to BLOCK_M rows.

The fused MoE GEMM (fused_moe.py) runs one program per BLOCK_M rows of one expert, so it needs the
flat indices `i = token * top_k + slot` grouped by expert, each expert's group padded to a
multiple of BLOCK_M:

  topk_ids [M, top_k] --> sorted_ids  [bound]          flat indices by expert; padding = numel
                          expert_ids  [bound/BLOCK_M]  the expert of each block (-1 past the end)
                          num_tokens_post_padded [1]   rows in use (the GEMM reads it on device)

`bound = numel + min(E, numel) * (BLOCK_M - 1)` is a static upper bound (each expert that has
tokens pads at most BLOCK_M - 1 rows), so every shape depends only on M: no host sync, CUDA-graph
capturable. Within an expert the flat indices keep their order (a stable sort), so the Triton
kernels and the torch reference return the same arrays.

Triton, four launches (vLLM/sglang's moe_align_block_size in spirit, laid out for sort stability):
  1. count   grid (P,): each program takes BLOCK_T flat indices; per expert its count (a row of
             `partial` [P + 1, E]) and each index's rank among its program's indices of that expert.
  2. prefix  grid (E,): per expert, the exclusive prefix of its column over programs (in place),
             its total in row P.
  3. blocks  one program: padded per-expert starts (`starts` [E]), num_tokens_post_padded,
             expert_ids for every block, and sorted_ids filled with the padding sentinel.
  4. scatter grid (P,): sorted_ids[starts[e] + prefix[p, e] + rank] = flat index.
When every index fits one program (P == 1: small batches, decode), one launch does all four in
registers (`_align_one_kernel`; a barrier orders the sentinel fill before the scatter).
"""

from __future__ import annotations

import torch

try:  # Triton is optional: CPU-only installs never import it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def align_bound(numel: int, num_experts: int, block_m: int) -> int:
    """Static size of sorted_ids for `numel` routed pairs."""
    return numel + min(num_experts, numel) * (block_m - 1)


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int,
                         use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [M, top_k] (ids in [0, E)) -> (sorted_ids [bound] int32, expert_ids [bound/BM] int32,
    num_tokens_post_padded [1] int32). See the module docstring."""
    use = (triton is not None and topk_ids.is_cuda) if use_triton is None else use_triton
    if not use:
        return moe_align_block_size_torch(topk_ids, block_m, num_experts)
    flat = topk_ids.reshape(-1)
    numel, dev = flat.numel(), flat.device
    bound = align_bound(numel, num_experts, block_m)
    n_blocks = triton.cdiv(bound, block_m)
    sorted_ids = torch.empty(bound, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(n_blocks, dtype=torch.int32, device=dev)
    post = torch.empty(1, dtype=torch.int32, device=dev)
    e_pad = triton.next_power_of_2(num_experts)
    block_t = max(16, min(256, 8192 // e_pad))
    progs = triton.cdiv(numel, block_t) if numel else 0
    layout = dict(BLOCK_M=block_m, E_PAD=e_pad, BLOCK_B=max(16, 4096 // e_pad), BLOCK_S=1024)
    if progs == 1:
        _align_one_kernel[(1,)](flat, numel, post, expert_ids, sorted_ids, n_blocks, bound, BLOCK_T=block_t, **layout)
        return sorted_ids, expert_ids, post
    alloc = torch.empty if progs else torch.zeros  # row `progs`: per-expert totals
    partial = alloc(progs + 1, num_experts, dtype=torch.int32, device=dev)
    rank = torch.empty(max(numel, 1), dtype=torch.int32, device=dev)
    starts = torch.empty(num_experts, dtype=torch.int32, device=dev)
    if progs:
        _count_kernel[(progs,)](flat, numel, rank, partial, num_experts, BLOCK_T=block_t, E_PAD=e_pad)
        _prefix_kernel[(num_experts,)](partial, progs, num_experts, BLOCK_P=256)
    _blocks_kernel[(1,)](partial, progs, starts, post, expert_ids, sorted_ids, n_blocks, bound, num_experts, numel,
                         **layout)
    if progs:
        _scatter_kernel[(progs,)](flat, numel, rank, partial, starts, sorted_ids, num_experts, BLOCK_T=block_t)
    return sorted_ids, expert_ids, post


def moe_align_block_size_torch(topk_ids: torch.Tensor, block_m: int, num_experts: int):
    """Reference (and the CPU path): the same three arrays from torch ops, no host sync."""
    flat = topk_ids.reshape(-1).long()
    numel, dev = flat.numel(), flat.device
    bound = align_bound(numel, num_experts, block_m)
    n_blocks = -(-bound // block_m)
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    ends = padded.cumsum(0)
    starts = ends - padded
    order = torch.sort(flat, stable=True).indices  # flat indices grouped by expert, in order
    by_expert = flat[order]
    rank = torch.arange(numel, device=dev) - (counts.cumsum(0) - counts)[by_expert]
    sorted_ids = torch.full((bound,), numel, dtype=torch.long, device=dev)
    sorted_ids.scatter_(0, starts[by_expert] + rank, order)
    total = ends[-1:] if num_experts else torch.zeros(1, dtype=torch.long, device=dev)
    block_start = torch.arange(n_blocks, device=dev) * block_m
    expert_ids = torch.searchsorted(ends, block_start, right=True)
    expert_ids = torch.where(block_start < total, expert_ids, torch.full_like(expert_ids, -1))
    return sorted_ids.int(), expert_ids.int(), total.int()


if triton is not None:
    @triton.jit
    def _count(ids, experts):
        """ids [BLOCK_T] (-1: none) -> (per-expert counts [E_PAD], each index's rank among the
        earlier indices of its expert [BLOCK_T])."""
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [BLOCK_T, E_PAD]
        before = tl.cumsum(onehot, axis=0) - onehot  # same-expert indices earlier in the block
        return tl.sum(onehot, axis=0), tl.sum(before * onehot, axis=1)

    @triton.jit
    def _layout(counts, post_ptr, expert_ids_ptr, sorted_ids_ptr, n_blocks, bound, numel,
                BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr):
        """Per-expert counts [E_PAD] (0 past E) -> padded starts [E_PAD]; writes
        num_tokens_post_padded, expert_ids of every block, sorted_ids all padding sentinels."""
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        ends = tl.cumsum(padded, axis=0)  # padding experts add 0
        total = tl.sum(padded, axis=0)
        tl.store(post_ptr, total)
        for b0 in range(0, n_blocks, BLOCK_B):
            blocks = b0 + tl.arange(0, BLOCK_B)
            first = blocks * BLOCK_M
            owner = tl.sum((ends[None, :] <= first[:, None]).to(tl.int32), axis=1)  # experts ending before
            owner = tl.where(first < total, owner, -1)
            tl.store(expert_ids_ptr + blocks, owner, mask=blocks < n_blocks)
        for s0 in range(0, bound, BLOCK_S):
            offs = s0 + tl.arange(0, BLOCK_S)
            tl.store(sorted_ids_ptr + offs, tl.full((BLOCK_S,), 0, tl.int32) + numel, mask=offs < bound)
        return ends - padded

    @triton.jit
    def _align_one_kernel(ids_ptr, numel, post_ptr, expert_ids_ptr, sorted_ids_ptr, n_blocks, bound,
                          BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr):
        """count, layout and scatter for numel <= BLOCK_T (one program)."""
        offs = tl.arange(0, BLOCK_T)
        mask = offs < numel
        experts = tl.arange(0, E_PAD)
        ids = tl.load(ids_ptr + offs, mask=mask, other=-1).to(tl.int32)
        counts, rank = _count(ids, experts)
        starts = _layout(counts, post_ptr, expert_ids_ptr, sorted_ids_ptr, n_blocks, bound, numel,
                         BLOCK_M, BLOCK_B, BLOCK_S)
        tl.debug_barrier()  # every thread's sentinel stores land before the scatter overwrites them
        dest = tl.sum(tl.where(ids[:, None] == experts[None, :], starts[None, :], 0), axis=1) + rank  # starts[id]
        tl.store(sorted_ids_ptr + dest, offs.to(tl.int32), mask=mask)

    @triton.jit
    def _count_kernel(ids_ptr, numel, rank_ptr, partial_ptr, E, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr):
        p = tl.program_id(0)
        offs = p * BLOCK_T + tl.arange(0, BLOCK_T)
        mask = offs < numel
        experts = tl.arange(0, E_PAD)
        counts, rank = _count(tl.load(ids_ptr + offs, mask=mask, other=-1).to(tl.int32), experts)
        tl.store(partial_ptr + p * E + experts, counts, mask=experts < E)
        tl.store(rank_ptr + offs, rank, mask=mask)

    @triton.jit
    def _prefix_kernel(partial_ptr, P, E, BLOCK_P: tl.constexpr):
        """Column e of partial [P + 1, E]: counts -> exclusive prefix over programs; row P: total."""
        e = tl.program_id(0)
        carry = tl.zeros((), dtype=tl.int32)
        for p0 in range(0, P, BLOCK_P):
            rows = p0 + tl.arange(0, BLOCK_P)
            c = tl.load(partial_ptr + rows * E + e, mask=rows < P, other=0)
            tl.store(partial_ptr + rows * E + e, carry + tl.cumsum(c, axis=0) - c, mask=rows < P)
            carry += tl.sum(c, axis=0)
        tl.store(partial_ptr + P * E + e, carry)

    @triton.jit
    def _blocks_kernel(partial_ptr, P, starts_ptr, post_ptr, expert_ids_ptr, sorted_ids_ptr, n_blocks, bound,
                       E, numel, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, BLOCK_B: tl.constexpr,
                       BLOCK_S: tl.constexpr):
        experts = tl.arange(0, E_PAD)
        counts = tl.load(partial_ptr + P * E + experts, mask=experts < E, other=0)
        starts = _layout(counts, post_ptr, expert_ids_ptr, sorted_ids_ptr, n_blocks, bound, numel,
                         BLOCK_M, BLOCK_B, BLOCK_S)
        tl.store(starts_ptr + experts, starts, mask=experts < E)

    @triton.jit
    def _scatter_kernel(ids_ptr, numel, rank_ptr, partial_ptr, starts_ptr, sorted_ids_ptr, E,
                        BLOCK_T: tl.constexpr):
        p = tl.program_id(0)
        offs = p * BLOCK_T + tl.arange(0, BLOCK_T)
        mask = offs < numel
        ids = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.int32)
        dest = (tl.load(starts_ptr + ids, mask=mask, other=0) + tl.load(partial_ptr + p * E + ids, mask=mask, other=0)
                + tl.load(rank_ptr + offs, mask=mask, other=0))
        tl.store(sorted_ids_ptr + dest, offs.to(tl.int32), mask=mask)
