"""Block manager: allocation, refcounts, chained hashes and LRU prefix reuse (pure, milliseconds)."""

import pytest

from gateway.block_manager import BlockManager, chain_hashes, hash_block, root_hash
from gateway.sequence import Sequence
from stagemesh.errors import NoFreeBlocks


def make_seq(ids, seq_id=1, max_tokens=4):
    return Sequence(seq_id=seq_id, prompt_ids=list(ids), max_tokens=max_tokens)


def compute_all(bm, seq, table):
    bm.seal_computed_blocks(seq, table, seq.num_tokens)


def test_hashes_are_deterministic_and_chained():
    a = chain_hashes("m", list(range(40)), 16)
    assert len(a) == 2  # only full blocks
    assert a == chain_hashes("m", list(range(40)), 16)
    assert a[0] == hash_block(root_hash("m"), list(range(16)))
    assert a[1] == hash_block(a[0], list(range(16, 32)))
    assert chain_hashes("other-model", list(range(40)), 16)[0] != a[0]
    # Same block content after a different prefix hashes differently.
    assert chain_hashes("m", [9] + list(range(1, 40)), 16)[1] != a[1]


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=8, block_size=4, model_id="m")
    seq = make_seq(range(10))
    table, cached = bm.allocate(seq)
    assert cached == 0 and len(table) == 3 and bm.num_free == 5
    bm.free(seq, table)
    assert bm.num_free == 8 and bm.num_tracked == 0


def test_prefix_reuse_skips_full_cached_blocks_and_keeps_last_token():
    bm = BlockManager(num_blocks=16, block_size=4, model_id="m")
    first = make_seq(range(12))
    table, _ = bm.allocate(first)
    compute_all(bm, first, table)
    assert len(bm.drain_events().stored) == 3
    bm.free(first, table)
    # Same 12 tokens: at most (12-1)//4 = 2 blocks reused so one token is computed for logits.
    again = make_seq(range(12), seq_id=2)
    again_table, cached = bm.allocate(again)
    assert cached == 8
    assert again_table[:2] == first_table_prefix(bm, range(12), 2)
    # A prefix that ends mid-block reuses only whole blocks.
    partial = make_seq(list(range(6)) + [99, 98, 97], seq_id=3)
    assert bm.allocate(partial)[1] == 4


def first_table_prefix(bm, ids, n):
    return [bm._by_hash[h] for h in chain_hashes("m", list(ids), 4)[:n]]


def test_shared_blocks_are_refcounted():
    bm = BlockManager(num_blocks=16, block_size=4, model_id="m")
    a = make_seq(range(9))
    a_table, _ = bm.allocate(a)
    compute_all(bm, a, a_table)
    b = make_seq(list(range(8)) + [50, 51], seq_id=2)
    b_table, cached = bm.allocate(b)
    assert cached == 8
    shared = a_table[:2]
    assert b_table[:2] == shared
    assert all(bm.blocks[i].ref_count == 2 for i in shared)
    bm.free(a, a_table)
    assert all(bm.blocks[i].ref_count == 1 for i in shared)
    bm.free(b, b_table)
    assert bm.num_free == 16


def test_lru_eviction_and_typed_failure():
    bm = BlockManager(num_blocks=4, block_size=4, model_id="m")
    a = make_seq(range(8))
    a_table, _ = bm.allocate(a)
    compute_all(bm, a, a_table)
    bm.free(a, a_table)
    bm.drain_events()
    # A different 16-token request needs all four blocks: the cached ones are evicted.
    b = make_seq(range(100, 116), seq_id=2)
    bm.allocate(b)
    assert len(bm.drain_events().removed) == 2
    c = make_seq(range(8), seq_id=3)
    assert bm.cached_prefix(c) == []
    free_before = bm.num_free
    with pytest.raises(NoFreeBlocks):
        bm.allocate(c)
    assert bm.num_free == free_before  # nothing changed on failure


def test_evicted_block_wanted_by_a_waiting_request_is_recomputed():
    bm = BlockManager(num_blocks=6, block_size=4, model_id="m")
    a = make_seq(range(9))
    a_table, _ = bm.allocate(a)
    compute_all(bm, a, a_table)
    bm.free(a, a_table)
    filler = make_seq(range(200, 220), seq_id=2)  # 5 blocks: evicts the LRU cached ones
    bm.allocate(filler)
    again = make_seq(range(9), seq_id=3)
    hits = bm.cached_prefix(again)
    assert len(hits) < 2


def test_prefix_being_computed_is_reported_so_admission_can_wait():
    bm = BlockManager(num_blocks=32, block_size=4, model_id="m")
    a = make_seq(range(20))
    a_table, _ = bm.allocate(a)
    b = make_seq(list(range(16)) + [77, 78], seq_id=2)
    assert bm.prefix_in_progress(b)  # a computes those blocks right now
    bm.seal_computed_blocks(a, a_table, 20)
    assert not bm.prefix_in_progress(b)
    b_table, cached = bm.allocate(b)
    assert cached == 16
    c = make_seq(list(range(16)) + [1, 2, 3, 4, 5], seq_id=3)
    bm.free(b, b_table)  # b never computed its own tail: nothing of it stays "in progress"
    assert not bm.prefix_in_progress(c)
    assert not bm._computing or all(v > 0 for v in bm._computing.values())


def test_a_freed_sequence_is_forgotten_and_one_that_stops_mid_prefill_unmarks_its_blocks():
    """Hashing state lives in the block manager per sequence, from the first look-up until free:
    a sequence freed (preempted, finished, or cancelled while waiting) leaves nothing behind."""
    bm = BlockManager(num_blocks=32, block_size=4, model_id="m")
    waiting = make_seq(range(50, 70), seq_id=9)
    assert not bm.prefix_in_progress(waiting) and bm.num_tracked == 1  # hashed while it waits
    bm.free(waiting)  # cancelled before admission
    a = make_seq(range(20))
    table, _ = bm.allocate(a)
    bm.seal_computed_blocks(a, table, 8)  # two of five blocks computed, then preempted
    bm.free(a, table)
    assert bm.num_tracked == 0 and not bm._computing
    again_table, cached = bm.allocate(a)  # readmitted: its two computed blocks are reused
    assert cached == 8 and again_table[:2] == table[:2]
