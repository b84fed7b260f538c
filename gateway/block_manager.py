"""Logical KV blocks of one pipeline replica: allocation, refcounts, and the prefix cache.

The tensors live on the stage workers; this class only decides which block ids hold what
(nano-vllm's BlockManager, vLLM's BlockPool). Block ids are the same on every stage of a replica.

Prefix cache: a full block is identified by a chained hash h_i = H(h_{i-1}, tokens of block i),
with h_{-1} derived from the model id and a fixed seed, so every gateway computes the same hashes
in every process and after restarts. Freed blocks keep their hash and stay reusable, in LRU order,
until they are reallocated (evicted). Stored/removed hashes are queued as events for the global
index (cache_service). Pure Python: no torch, no grpc.

Block tables belong to the scheduler (its `Admission`): this class hands out block ids and takes
them back. What it keeps per sequence is hashing state (`_SeqHashes`, keyed by seq_id), from the
first question about a sequence until `free(seq)`.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

from stagemesh.errors import NoFreeBlocks

from gateway.sequence import Sequence

HASH_SEED = b"stagemesh-prefix-v1"


def root_hash(model_id: str) -> bytes:
    """h_{-1}: depends only on the model id, never on the process."""
    return hashlib.blake2b(HASH_SEED + model_id.encode(), digest_size=16).digest()


def hash_block(parent: bytes, tokens: list[int], extra: bytes = b"") -> bytes:
    """h_i = H(h_{i-1}, tokens of block i, extra keys)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(struct.pack(f"<{len(tokens)}i", *tokens))
    if extra:
        h.update(extra)
    return h.digest()


def chain_hashes(model_id: str, token_ids: list[int], block_size: int) -> list[bytes]:
    """Hashes of every full block of `token_ids`."""
    hashes, parent = [], root_hash(model_id)
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


@dataclass
class _SeqHashes:
    """Prefix-cache state of one sequence on this replica."""

    # Chained hashes of the full blocks of the sequence's history, extended as tokens arrive.
    hashes: list[bytes] = field(default_factory=list)
    # Leading blocks of its table whose hashes are registered (sealed), this admission.
    sealed: int = 0
    # Leading blocks whose hashes this admission announced as being computed (in `_computing`).
    computing_upto: int = 0


@dataclass
class CacheEvents:
    """Index changes since the last drain, for cache_service."""

    stored: list[bytes] = field(default_factory=list)
    removed: list[bytes] = field(default_factory=list)


class BlockManager:
    """Allocator for one replica. Called from the gateway's event loop only."""

    def __init__(self, num_blocks: int, block_size: int, model_id: str, enable_prefix_cache: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be positive")
        self.block_size = block_size
        self.model_id = model_id
        self.enable_prefix_cache = enable_prefix_cache
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, least recently freed first (evicted first).
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._by_hash: dict[bytes, int] = {}
        # Hashes of full blocks that running sequences are computing now (hash -> how many).
        self._computing: dict[bytes, int] = {}
        self._seqs: dict[int, _SeqHashes] = {}  # seq_id -> hashing state, until free(seq)
        self.events = CacheEvents()
        self._root = root_hash(model_id)

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def cached_hashes(self) -> dict[bytes, int]:
        """Read-only view: hash -> block id of every cached full block."""
        return self._by_hash

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def hashes_of(self, seq: Sequence) -> list[bytes]:
        """seq's full-block chain hashes, memoised per sequence and extended as it grows."""
        hashes = self._state(seq).hashes
        bs = self.block_size
        full = seq.num_tokens // bs
        if len(hashes) >= full:  # every step of every sequence asks: no copy of its history then
            return hashes
        ids = seq.all_ids
        parent = hashes[-1] if hashes else self._root
        for i in range(len(hashes), full):
            parent = hash_block(parent, ids[i * bs : (i + 1) * bs])
            hashes.append(parent)
        return hashes

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix, leaving at least one token to compute."""
        if not self.enable_prefix_cache or seq.sampling.prompt_logprobs is not None:
            return []  # prompt log-probabilities need every prompt position computed
        usable = (seq.num_tokens - 1) // self.block_size
        hits = []
        for h in self.hashes_of(seq)[:usable]:
            block_id = self._by_hash.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def prefix_in_progress(self, seq: Sequence) -> bool:
        """Whether the block after seq's cached prefix is being computed by a running sequence.

        Admitting seq now would compute the same blocks twice; waiting a step lets it reuse them.
        """
        if not self.enable_prefix_cache or seq.sampling.prompt_logprobs is not None:
            return False
        usable = (seq.num_tokens - 1) // self.block_size
        for h in self.hashes_of(seq)[:usable]:
            if h not in self._by_hash:
                return h in self._computing
        return False

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self.cached_prefix(seq)
        reclaimable = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        need = self.blocks_needed(seq.num_tokens) - len(hits)
        return need <= self.num_free - reclaimable

    # -- allocation ----------------------------------------------------------------------------
    def allocate(self, seq: Sequence) -> tuple[list[int], int]:
        """Blocks for `seq`'s whole token history, reusing the cached prefix: (block table,
        number of tokens reused). Raises NoFreeBlocks (and changes nothing) when the blocks are
        not there. The caller owns the table and gives it back with `free`.
        """
        if not self.can_allocate(seq):
            raise NoFreeBlocks(f"need {self.blocks_needed(seq.num_tokens)} KV blocks, {self.num_free} free")
        hits = self.cached_prefix(seq)
        for block_id in hits:
            self._take(block_id)
        fresh = [self._pop_free() for _ in range(self.blocks_needed(seq.num_tokens) - len(hits))]
        state = self._state(seq)
        assert state.computing_upto == 0, f"sequence {seq.seq_id} allocated twice without free"
        state.sealed = state.computing_upto = len(hits)
        if self.enable_prefix_cache:
            pending = self.hashes_of(seq)[len(hits) :]
            for h in pending:
                self._computing[h] = self._computing.get(h, 0) + 1
            state.computing_upto += len(pending)
        return hits + fresh, len(hits) * self.block_size

    def fork(self, seq: Sequence, source_table: list[int], start: int) -> tuple[list[int], tuple[int, int] | None]:
        """Blocks for `seq`, a sample forked from another of the same prompt whose KV
        `source_table` holds, that computes from position `start` on (vLLM V0's fork with
        copy-on-write): the full blocks before `start` are shared (a reference each), the block
        `start` falls in is a fresh one, and when `start` is inside it, the KV before `start` is
        copied there from the source's block: (table, (src, dst) or None). The caller holds a
        reference on src until the copy ran on the stages, and gives it back with `drop`.
        Raises NoFreeBlocks (and changes nothing) when no block is free."""
        if not self.num_free:
            raise NoFreeBlocks("need 1 KV block to fork a sample, 0 free")
        shared = source_table[: start // self.block_size]
        for block_id in shared:
            self._take(block_id)
        fresh = self._pop_free()
        copy = None
        if start % self.block_size:
            src = source_table[len(shared)]
            self._take(src)
            copy = (src, fresh)
        state = self._state(seq)
        assert state.computing_upto == 0, f"sequence {seq.seq_id} allocated twice without free"
        state.sealed = state.computing_upto = len(shared)
        return shared + [fresh], copy

    def drop(self, block_ids) -> None:
        """Give back references taken outside a sequence's table (a fork's copy source)."""
        for block_id in block_ids:
            self._unref(block_id)

    def append_slots(self, block_table: list[int], num_tokens: int) -> list[int]:
        """Block ids to append to `block_table` so that it holds `num_tokens` tokens (none when
        it does already). Raises NoFreeBlocks (and changes nothing) when they are not there."""
        need = self.blocks_needed(num_tokens) - len(block_table)
        if need > self.num_free:
            raise NoFreeBlocks(f"need {need} more KV blocks, {self.num_free} free")
        return [self._pop_free() for _ in range(max(0, need))]

    def seal_computed_blocks(self, seq: Sequence, block_table: list[int], num_computed: int) -> None:
        """Register hashes of blocks that became full and computed (call after a step returns)."""
        if not self.enable_prefix_cache:
            return
        full = num_computed // self.block_size
        hashes = self.hashes_of(seq)
        state = self._seqs[seq.seq_id]
        for i in range(state.sealed, full):
            block = self.blocks[block_table[i]]
            h = hashes[i]
            if i < state.computing_upto:
                self._done_computing(h)
            if block.block_hash is None and h not in self._by_hash:
                block.block_hash = h
                self._by_hash[h] = block.block_id
                self.events.stored.append(h)
        state.sealed = max(state.sealed, full)

    def free(self, seq: Sequence, block_table: list[int] | None = None) -> None:
        """Forget `seq` (its hashing state) and drop its references to `block_table`; blocks that
        reach zero stay cached, newest freed last. Call it whenever a sequence leaves the replica,
        admitted or not (a waiting one may have been hashed)."""
        state = self._seqs.pop(seq.seq_id, None)
        if state is not None and self.enable_prefix_cache:
            for h in state.hashes[state.sealed : state.computing_upto]:
                self._done_computing(h)
        # Free in reverse so a sequence's tail blocks are evicted before its shared head.
        for block_id in reversed(block_table or ()):
            self._unref(block_id)

    def drain_events(self) -> CacheEvents:
        events, self.events = self.events, CacheEvents()
        return events

    @property
    def num_tracked(self) -> int:
        """Sequences this manager holds hashing state for (0 once every one was freed)."""
        return len(self._seqs)

    # -- internals -----------------------------------------------------------------------------
    def _state(self, seq: Sequence) -> _SeqHashes:
        state = self._seqs.get(seq.seq_id)
        if state is None:
            state = self._seqs[seq.seq_id] = _SeqHashes()
        return state

    def _done_computing(self, h: bytes) -> None:
        n = self._computing.get(h, 0)
        if n > 1:
            self._computing[h] = n - 1
        else:
            self._computing.pop(h, None)

    def _unref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} freed twice"
        if block.ref_count == 0:
            self._free[block_id] = None

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict: its content is about to be overwritten
            del self._by_hash[block.block_hash]
            self.events.removed.append(block.block_hash)
            block.block_hash = None
        block.ref_count = 1
        return block_id
