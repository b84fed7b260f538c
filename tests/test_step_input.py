"""The stage's step, without a server: `decode` (the wire checked once) and the LeaseTable
(sequences per lease, owners and their order, expiry), and the SampleBook entries that go with
a sequence."""

from __future__ import annotations

import pickle

import pytest
import torch

from stagemesh import wire
from stagemesh.errors import Aborted, FailedPrecondition, InvalidArgument
from stagemesh.v1 import stagemesh_pb2 as pb
from stage_worker.lease_table import LeaseTable
from stage_worker.samples import Sample, SampleNotReady
from stage_worker.step_input import MAX_BATCH_TOKENS, StageShape, decode

FIRST = StageShape(is_first=True, is_last=True, vocab_size=50, hidden_size=4, num_blocks=8, block_size=4,
                   device_type="cpu")
LATER = StageShape(is_first=False, is_last=True, vocab_size=50, hidden_size=4, num_blocks=8, block_size=4,
                   device_type="cpu")


def req(lease="a", owner="", order=0, new=(), chunks=(), finished=(), token_ids=None):
    """chunks: (seq_id, start_pos, num_tokens, kw); token ids default to 1 per scheduled token."""
    r = pb.ForwardRequest(lease_id=lease, lease_owner=owner, lease_order=order, finished_seq_ids=list(finished))
    for sid, blocks in new:
        r.new_sequences.add(seq_id=sid, block_ids=blocks)
    for sid, pos, n, kw in chunks:
        r.chunks.add(seq_id=sid, start_pos=pos, num_tokens=n, **kw)
    r.token_ids.extend(token_ids if token_ids is not None else [1] * sum(c[2] for c in chunks))
    return r


def test_decode_lays_out_rows_and_resolves_follow_rows():
    step = decode(req(new=[(1, [0, 1]), (2, [2])], token_ids=[3, 4, 5, 0, 6],
                      chunks=[(1, 0, 3, {}), (3, 9, 1, dict(sample=True, output_index=2, follows_sample=True)),
                              (2, 0, 1, dict(sample=True, new_block_ids=[5]))]), FIRST)
    assert [(c.seq_id, c.row) for c in step.chunks] == [(1, 0), (3, 3), (2, 4)]
    assert [c.seq_id for c in step.follows] == [3] and step.num_tokens == 5
    assert step.token_ids == [3, 4, 5, 0, 6] and step.hidden is None
    assert step.new[1].block_ids == [0, 1] and step.new[2].sampling.greedy
    assert step.outputs == [(3, 2), (2, 0)] and step.chunks[2].new_block_ids == [5]
    assert pickle.loads(pickle.dumps(step)) == step  # a TP stage hands it to its followers


def test_decode_takes_hidden_states_on_later_stages_and_ignores_follow_flags():
    hidden = torch.arange(8, dtype=torch.float32).view(2, 4)
    r = req(chunks=[(1, 4, 1, dict(follows_sample=True)), (2, 0, 1, {})], token_ids=[])
    r.hidden.CopyFrom(wire.encode(hidden))
    step = decode(r, LATER)
    assert torch.equal(step.hidden, hidden) and step.token_ids is None
    assert not step.follows and not step.chunks[0].follows_sample
    received = wire.parse_forward(wire.forward_bytes(req(chunks=[(1, 4, 2, {})], token_ids=[]), hidden))
    assert torch.equal(decode(received.request, LATER, received.hidden).hidden, hidden)
    three_rows = wire.parse_forward(wire.forward_bytes(req(chunks=[(1, 0, 3, {})], token_ids=[]), hidden))
    with pytest.raises(InvalidArgument, match="shape \\(2, 4\\), expected \\(3, 4\\)"):
        decode(three_rows.request, LATER, three_rows.hidden)
    with pytest.raises(InvalidArgument, match="must carry hidden states"):
        decode(req(chunks=[(1, 0, 1, {})], token_ids=[]), LATER)


@pytest.mark.parametrize("bad,match", [
    (dict(chunks=[(1, 0, 0, {})]), "num_tokens must be >= 1"),
    (dict(chunks=[(1, -1, 1, {})]), "start_pos >= 0"),
    (dict(chunks=[(1, 0, 1, {}), (1, 1, 1, {})]), "appears twice in one micro-batch"),
    (dict(new=[(1, [0, 8])], chunks=[(1, 0, 1, {})]), "block id 8 outside"),
    (dict(chunks=[(1, 0, 1, dict(new_block_ids=[-1]))]), "block id -1 outside"),
    (dict(new=[(1, [3, 3])], chunks=[(1, 0, 1, {})]), "appears twice in its table"),
    (dict(chunks=[(1, 0, 2, {})], token_ids=[1]), "1 token ids for 2 scheduled tokens"),
    (dict(chunks=[(1, 0, 1, {})], token_ids=[50]), "token ids must be in \\[0, 50\\)"),
    (dict(chunks=[(1, 3, 2, dict(follows_sample=True, output_index=1))]), "follows a sample is one token"),
    (dict(chunks=[(1, 3, 1, dict(follows_sample=True, output_index=0))]), "output_index >= 1"),
    (dict(chunks=[(1, 0, MAX_BATCH_TOKENS, {}), (2, 0, 1, {})]), "exceeds the limit"),
])
def test_decode_refuses_what_is_wrong_with_the_request_alone(bad, match):
    with pytest.raises(InvalidArgument, match=match):
        decode(req(**bad), FIRST)


def test_decode_refuses_bad_sampling_parameters():
    r = req(chunks=[(1, 0, 1, {})])
    r.new_sequences.add(seq_id=1, block_ids=[0], sampling=pb.SamplingParams(temperature=-1))
    with pytest.raises(InvalidArgument, match="invalid sampling"):
        decode(r, FIRST)


def apply(table, r, shape=FIRST):
    step = decode(r, shape)
    table.check_lease(step)
    table.commit(step, table.plan(step))
    return step


def test_lease_table_applies_deltas_and_refuses_what_its_state_cannot_hold():
    t = LeaseTable(block_size=4)
    apply(t, req(new=[(1, [0]), (2, [1, 2])], chunks=[(1, 0, 4, {}), (2, 0, 5, {})]))
    apply(t, req(chunks=[(1, 4, 1, dict(new_block_ids=[3]))]))
    assert t.get("a", 1).block_table == [0, 3] and len(t) == 2 and t.blocks_in_use() == 4
    for bad, match in [(req(chunks=[(9, 0, 1, {})]), "unknown sequence 9"),
                       (req(chunks=[(1, 5, 4, {})]), "2 blocks cannot hold 9 tokens"),
                       (req(chunks=[(2, 5, 1, dict(new_block_ids=[1]))]), "appears twice in its table"),
                       (req(lease="b", chunks=[(1, 0, 1, {})]), "unknown sequence 1 for lease 'b'"),
                       (req(finished=[2], chunks=[(2, 5, 1, {})]), "unknown sequence 2")]:
        with pytest.raises(InvalidArgument, match=match):
            t.plan(decode(bad, FIRST))
    assert t.get("a", 1).block_table == [0, 3] and t.get("a", 2).block_table == [1, 2]  # nothing changed
    apply(t, req(finished=[1], new=[(1, [5])], chunks=[(1, 0, 2, {})]))  # a finished id comes back anew
    assert t.get("a", 1).block_table == [5]
    t.release("a", [1])
    assert ("a", 1) not in t and ("a", 2) in t
    t.release("a")
    assert len(t) == 0 and t.blocks_in_use() == 0


def test_a_newer_lease_of_an_owner_frees_the_older_ones_and_refuses_their_steps():
    t = LeaseTable(block_size=4)
    apply(t, req(lease="g1", owner="gw/0", order=1, new=[(1, [0])], chunks=[(1, 0, 1, {})]))
    apply(t, req(lease="x", owner="other", order=1, new=[(1, [1])], chunks=[(1, 0, 1, {})]))
    t.samples.record("g1", 1, Sample(0, token=7))
    apply(t, req(lease="g2", owner="gw/0", order=2, new=[(1, [2])], chunks=[(1, 0, 1, {})]))
    assert ("g1", 1) not in t and ("g2", 1) in t and ("x", 1) in t
    assert t.samples._by_seq.get(("g1", 1)) is None
    with pytest.raises(FailedPrecondition, match="superseded by lease g2"):
        t.check_lease(decode(req(lease="g1", owner="gw/0", order=1, chunks=[(1, 1, 1, {})]), FIRST))
    assert t.claim("g1", "gw/0", 1, strict=False) == 0  # a Release of it: nothing left to free
    with pytest.raises(FailedPrecondition):
        t.claim("g1", "gw/0", 1)
    assert t.claim("g2", "gw/0", 2) == 0  # the newest again: nothing to do
    # supersede_only: a Release of a newer lease frees the older one before its first step lands
    assert t.claim("g3", "gw/0", 3) == 1 and ("g2", 1) not in t
    assert t.claim("y", "", 0) == 0  # no owner: the lease only expires


def test_leases_not_heard_from_for_their_ttl_expire_and_reset_keeps_the_order():
    t = LeaseTable(block_size=4)
    apply(t, req(lease="old", owner="gw/0", order=1, new=[(1, [0])], chunks=[(1, 0, 1, {})]))
    apply(t, req(lease="live", new=[(1, [1])], chunks=[(1, 0, 1, {})]))
    t._seen["old"] -= 100
    assert t.stale(60) == {"old"}
    assert t.drop_leases(t.stale(60)) == 1 and ("live", 1) in t and t.stale(60) == set()
    apply(t, req(lease="g5", owner="gw/1", order=5, new=[(2, [2])], chunks=[(2, 0, 1, {})]))
    t.reset()  # out of the plan (a spare): sequences go, the owner's order stays
    assert len(t) == 0
    with pytest.raises(FailedPrecondition):
        t.check_lease(decode(req(lease="g4", owner="gw/1", order=4), FIRST))


def test_sample_book_follows_records_and_refusals():
    t = LeaseTable(block_size=4)
    apply(t, req(new=[(1, [0, 1])], chunks=[(1, 0, 3, dict(sample=True))]))
    follow = decode(req(chunks=[(1, 3, 1, dict(sample=True, output_index=1, follows_sample=True))],
                        token_ids=[0]), FIRST)
    c = follow.chunks[0]
    with pytest.raises(SampleNotReady):  # output 0 not sampled yet
        t.samples.followed(follow, c, t.get("a", 1), device=False)
    t.samples.note(decode(req(chunks=[(1, 0, 3, dict(sample=True))]), FIRST), [(1, 42), (5, 9)], t)
    assert t.samples.followed(follow, c, t.get("a", 1), device=False).token == 42
    assert t.samples._by_seq.get(("a", 5)) is None  # not a sequence of the lease
    t.samples.refused("a", follow.outputs, t)  # the step drawing output 1 failed
    later = decode(req(chunks=[(1, 4, 1, dict(sample=True, output_index=2, follows_sample=True))],
                       token_ids=[0]), FIRST)
    with pytest.raises(Aborted, match="refused or replaced"):
        t.samples.followed(later, later.chunks[0], t.get("a", 1), device=False)
    t.release("a", [1])
    assert t.samples._by_seq.get(("a", 1)) is None
