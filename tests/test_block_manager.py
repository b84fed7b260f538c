"""Block manager: allocation, refcounts, chained hashes and LRU prefix reuse (pure, milliseconds)."""

import pytest

from gateway.block_manager import BlockManager, chain_hashes, hash_block, root_hash
from gateway.sequence import Sequence
from stagemesh.errors import NoFreeBlocks


def make_seq(ids, seq_id=1, max_tokens=4):
    return Sequence(seq_id=seq_id, prompt_ids=list(ids), max_tokens=max_tokens)


def compute_all(bm, seq):
    seq.num_computed = seq.num_tokens
    bm.seal_computed_blocks(seq)


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
    assert bm.allocate(seq) == 0
    assert len(seq.block_table) == 3 and bm.num_free == 5
    bm.free(seq)
    assert bm.num_free == 8


def test_prefix_reuse_skips_full_cached_blocks_and_keeps_last_token():
    bm = BlockManager(num_blocks=16, block_size=4, model_id="m")
    first = make_seq(range(12))
    bm.allocate(first)
    compute_all(bm, first)
    assert len(bm.drain_events().stored) == 3
    bm.free(first)
    # Same 12 tokens: at most (12-1)//4 = 2 blocks reused so one token is computed for logits.
    again = make_seq(range(12), seq_id=2)
    assert bm.allocate(again) == 8
    assert again.block_table[:2] == first_table_prefix(bm, range(12), 2)
    # A prefix that ends mid-block reuses only whole blocks.
    partial = make_seq(list(range(6)) + [99, 98, 97], seq_id=3)
    assert bm.allocate(partial) == 4


def first_table_prefix(bm, ids, n):
    return [bm._by_hash[h] for h in chain_hashes("m", list(ids), 4)[:n]]


def test_shared_blocks_are_refcounted():
    bm = BlockManager(num_blocks=16, block_size=4, model_id="m")
    a = make_seq(range(9))
    bm.allocate(a)
    compute_all(bm, a)
    b = make_seq(list(range(8)) + [50, 51], seq_id=2)
    assert bm.allocate(b) == 8
    shared = a.block_table[:2]
    assert b.block_table[:2] == shared
    assert all(bm.blocks[i].ref_count == 2 for i in shared)
    bm.free(a)
    assert all(bm.blocks[i].ref_count == 1 for i in shared)
    bm.free(b)
    assert bm.num_free == 16


def test_lru_eviction_and_typed_failure():
    bm = BlockManager(num_blocks=4, block_size=4, model_id="m")
    a = make_seq(range(8))
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)
    bm.drain_events()
    # A different 16-token request needs all four blocks: the cached ones are evicted.
    b = make_seq(range(100, 116), seq_id=2)
    bm.allocate(b)
    assert len(bm.drain_events().removed) == 2
    c = make_seq(range(8), seq_id=3)
    assert bm.cached_prefix(c) == []
    with pytest.raises(NoFreeBlocks):
        bm.allocate(c)
    assert c.block_table == []  # nothing changed on failure


def test_evicted_block_wanted_by_a_waiting_request_is_recomputed():
    bm = BlockManager(num_blocks=6, block_size=4, model_id="m")
    a = make_seq(range(9))
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)
    filler = make_seq(range(200, 220), seq_id=2)  # 5 blocks: evicts the LRU cached ones
    bm.allocate(filler)
    again = make_seq(range(9), seq_id=3)
    hits = bm.cached_prefix(again)
    assert len(hits) < 2


def test_prefix_being_computed_is_reported_so_admission_can_wait():
    bm = BlockManager(num_blocks=32, block_size=4, model_id="m")
    a = make_seq(range(20))
    bm.allocate(a)
    b = make_seq(list(range(16)) + [77, 78], seq_id=2)
    assert bm.prefix_in_progress(b)  # a computes those blocks right now
    a.num_computed = 20
    bm.seal_computed_blocks(a)
    assert not bm.prefix_in_progress(b)
    assert bm.allocate(b) == 16
    c = make_seq(list(range(16)) + [1, 2, 3, 4, 5], seq_id=3)
    bm.free(b)  # b never computed its own tail: nothing of it stays "in progress"
    assert not bm.prefix_in_progress(c)
    assert not bm._computing or all(v > 0 for v in bm._computing.values())
