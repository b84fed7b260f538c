"""Scheduler: decodes first, chunked prefill under the token budget, queue bound, preemption."""

import pytest

from gateway.block_manager import BlockManager
from gateway.scheduler import Scheduler, SchedulerConfig, StepShape
from gateway.sequence import Sequence, Status
from stagemesh.errors import ResourceExhausted


def create_scheduler(num_blocks=64, block_size=4, **kw):
    shape = {k: kw.pop(k) for k in ("inflight_target", "lookahead", "lookahead_depth", "separate_decodes") if k in kw}
    cfg = SchedulerConfig(**{"max_batched_tokens": 8, **kw})
    return Scheduler(cfg, BlockManager(num_blocks, block_size, "m", enable_prefix_cache=True),
                     StepShape(**{"inflight_target": 1, **shape}))


def seq(i, n, max_tokens=4, priority=0):
    return Sequence(seq_id=i, prompt_ids=list(range(1, n + 1)), max_tokens=max_tokens, priority=priority)


def run_step(s, plan, token=7):
    return s.update(plan, {c.wire_id: token for c in plan.chunks if c.sample})


def test_chunked_prefill_respects_budget_and_samples_only_at_the_end():
    s = create_scheduler()
    a = seq(1, 20)
    s.add(a)
    sizes = []
    while not a.output_ids:
        plan = s.schedule()
        sizes.append(plan.num_tokens)
        assert plan.num_tokens <= 8
        assert [c.sample for c in plan.chunks] == [s.admission(a).num_computed + plan.num_tokens == 20]
        run_step(s, plan)
    assert sizes == [8, 8, 4]
    assert a.output_ids == [7]


def test_decodes_are_scheduled_before_prefill():
    s = create_scheduler()
    a = seq(1, 4)
    s.add(a)
    run_step(s, s.schedule())  # a is now decoding
    s.add(seq(2, 30))
    plan = s.schedule()
    assert plan.chunks[0].seq is a and plan.chunks[0].num_tokens == 1
    assert plan.num_tokens == 8


def test_sequence_in_at_most_one_micro_batch():
    s = create_scheduler(inflight_target=2)
    for i in range(4):
        s.add(seq(i, 2))
    first = s.schedule()
    second = s.schedule()
    ids1 = {c.seq.seq_id for c in first.chunks}
    ids2 = {c.seq.seq_id for c in (second.chunks if second else [])}
    assert not ids1 & ids2


def test_decodes_spread_over_inflight_micro_batches():
    s = create_scheduler(inflight_target=2, max_batched_tokens=64)
    seqs = [seq(i, 2) for i in range(6)]
    for q in seqs:
        s.add(q)
    run_step(s, s.schedule())
    p1, p2 = s.schedule(), s.schedule()
    assert len(p1.chunks) == 3 and len(p2.chunks) == 3


def test_queue_bound_is_resource_exhausted():
    s = create_scheduler(max_waiting=2)
    s.add(seq(1, 2))
    s.add(seq(2, 2))
    with pytest.raises(ResourceExhausted):
        s.add(seq(3, 2))


def test_interactive_before_batch():
    s = create_scheduler(max_batched_tokens=2)
    s.add(seq(1, 2, priority=1))
    s.add(seq(2, 2, priority=0))
    plan = s.schedule()
    assert plan.chunks[0].seq.seq_id == 2


def test_finish_frees_blocks_and_tells_stages():
    s = create_scheduler(num_blocks=8)
    a = seq(1, 6)
    s.add(a)
    run_step(s, s.schedule())
    wire_id = s.admission(a).wire_id
    s.finish(a, "stop")
    assert s.bm.num_free == 8 and s.admission(a) is None and s.bm.num_tracked == 0
    assert s.schedule().finished_wire_ids == [wire_id]


def test_finish_while_in_flight_defers_the_free():
    s = create_scheduler(num_blocks=8)
    a = seq(1, 6)
    s.add(a)
    plan = s.schedule()
    s.finish(a, "cancelled")
    assert s.bm.num_free < 8  # stages still write those blocks
    run_step(s, plan)
    assert s.bm.num_free == 8 and a.status == Status.FINISHED


def test_failed_step_re_announces_its_sequences_and_still_releases_cancelled_ones():
    """A micro-batch a later stage refused may have reached earlier stages: its live sequences
    go out again with full block tables; one cancelled meanwhile is freed and dropped on the stages."""
    s = create_scheduler(num_blocks=16)
    a, b = seq(1, 5), seq(2, 6)
    s.add(a)
    s.add(b)
    run_step(s, s.schedule())  # both announced, a finished its prompt
    plan = s.schedule()
    assert any(not c.is_new for c in plan.chunks)
    b_wire_id = s.admission(b).wire_id
    s.finish(b, "cancelled")  # while the step is in flight
    assert s.update(plan, None) == []  # the step failed
    nxt = s.schedule()
    assert b_wire_id in nxt.finished_wire_ids and s.bm.num_free == 16 - len(s.admission(a).block_table)
    assert [c.seq for c in nxt.chunks] == [a] and nxt.chunks[0].is_new  # full table again


def test_preemption_requeues_and_recomputes_from_history():
    s = create_scheduler(num_blocks=3, block_size=4, max_batched_tokens=16)
    a, b = seq(1, 4, max_tokens=8), seq(2, 4, max_tokens=8)
    s.add(a)
    s.add(b)
    run_step(s, s.schedule())  # both prefilled: 1 block each, 1 free
    for _ in range(6):  # decode until blocks run out
        plan = s.schedule()
        if plan is None:
            break
        run_step(s, plan)
    assert s.num_preemptions >= 1
    victim = b if b.status == Status.WAITING else a
    assert s.admission(victim) is None and victim.output_ids  # keeps its history, not its admission


def test_readmission_after_preemption_starts_a_fresh_admission():
    """A preempted sequence comes back with a new wire id, announced again with its full block
    table and recomputed from position 0; the stages drop the old wire id."""
    s = create_scheduler(num_blocks=2, block_size=4, max_batched_tokens=16)
    a, b = seq(1, 3, max_tokens=8), Sequence(seq_id=2, prompt_ids=[11, 12, 13], max_tokens=8)
    s.add(a)
    s.add(b)
    run_step(s, s.schedule())  # one block each, none free
    old = {q.seq_id: s.admission(q).wire_id for q in (a, b)}
    run_step(s, s.schedule())  # both decode: token 4 still fits their blocks
    plan = s.schedule()  # a needs a second block: b, the newest, is preempted
    assert s.num_preemptions == 1 and b.status == Status.WAITING and s.admission(b) is None
    assert plan.finished_wire_ids == [old[2]] and [c.seq for c in plan.chunks] == [a]
    run_step(s, plan)
    s.finish(a, "stop")
    again = s.schedule()
    [chunk] = [c for c in again.chunks if c.seq is b]
    assert chunk.is_new and chunk.start_pos == 0 and chunk.num_tokens == b.num_tokens
    assert chunk.wire_id not in old.values() and s.admission(b).wire_id == chunk.wire_id


def test_request_sharing_a_prefix_in_progress_waits_and_then_reuses_it():
    s = create_scheduler(num_blocks=64, block_size=4, max_batched_tokens=8, inflight_target=2)
    a = Sequence(seq_id=1, prompt_ids=list(range(1, 17)) + [90], max_tokens=2)
    b = Sequence(seq_id=2, prompt_ids=list(range(1, 17)) + [91, 92], max_tokens=2)
    s.add(a)
    s.add(b)
    p1 = s.schedule()
    assert [c.seq for c in p1.chunks] == [a]  # b waits for a's blocks
    p2 = s.schedule()
    assert p2 is None or all(c.seq is not b for c in p2.chunks)
    run_step(s, p1)
    p3 = s.schedule()
    assert all(c.seq is not b for c in p3.chunks)  # a's prefix still in progress
    run_step(s, p3)
    plan = s.schedule()
    while plan and b.status != Status.RUNNING:
        run_step(s, plan)
        plan = s.schedule()
    assert b.num_cached_tokens == 16 and s.admission(b).num_computed >= 16


def test_random_workload_keeps_invariants():
    """Tight memory, two micro-batches in flight, cancellations: every plan is well-formed and
    every block comes back."""
    import random

    rng = random.Random(0)
    s = create_scheduler(num_blocks=12, block_size=4, max_batched_tokens=12, inflight_target=2)
    seqs = [seq(i, rng.randint(1, 14), max_tokens=rng.randint(1, 9)) for i in range(30)]
    for q in seqs:
        s.add(q)
    inflight = []
    for _ in range(2000):
        plan = s.schedule()
        if plan is not None:
            ids = [c.seq.seq_id for c in plan.chunks]
            assert len(ids) == len(set(ids)), "a sequence twice in one micro-batch"
            assert not set(ids) & {c.seq.seq_id for p in inflight for c in p.chunks}
            assert plan.num_tokens <= 12
            inflight.append(plan)
        if inflight and (plan is None or len(inflight) >= 2):
            done = inflight.pop(0)
            for q in run_step(s, done, token=rng.randint(3, 9)):
                if len(q.output_ids) >= q.max_tokens:
                    s.finish(q, "length")
        if rng.random() < 0.02:
            live = [q for q in seqs if q.status != Status.FINISHED]
            if live:
                s.finish(rng.choice(live), "cancelled")
        if not s.has_work() and not inflight:
            break
    assert all(q.status == Status.FINISHED for q in seqs)
    assert s.bm.num_free == 12 and s.bm.num_tracked == 0  # no blocks, no hashing state left


def test_token_slice_equals_slicing_the_history():
    q = seq(1, 5)
    q.output_ids = [50, 51, 52]
    for a in range(9):
        for b in range(a, 9):
            assert q.token_slice(a, b) == q.all_ids[a:b]


def test_lookahead_decodes_a_sequence_again_while_its_sample_is_in_flight():
    """Async scheduling: the next micro-batch decodes the token the one in flight is sampling;
    its chunk follows that sample (a 0 in its place), and no step goes past max_tokens."""
    s = create_scheduler(lookahead=True, inflight_target=2)
    a = seq(1, 5, max_tokens=3)
    s.add(a)
    first = s.schedule()  # the prompt; samples output 0
    second = s.schedule()
    assert [(c.start_pos, c.num_tokens, c.output_index, c.follows) for c in second.chunks] == [(5, 1, 1, True)]
    assert second.token_ids() == [0] and len(s.admission(a).block_table) * 4 >= 6
    assert s.schedule() is None  # one follow at a time
    run_step(s, first, token=7)
    third = s.schedule()
    assert [(c.start_pos, c.output_index, c.follows) for c in third.chunks] == [(6, 2, True)]
    run_step(s, second, token=8)
    assert s.schedule() is None  # output 2 is the last one max_tokens allows
    run_step(s, third, token=9)
    assert a.output_ids == [7, 8, 9] and s.admission(a).num_computed == 7


def test_lookahead_two_deep_follows_the_newest_sample_in_flight():
    """lookahead_depth 2 (a single stage with three micro-batches in flight): two steps follow
    the prompt's sample one after the other; answers fold back in send order; max_tokens holds."""
    s = create_scheduler(lookahead=True, lookahead_depth=2, inflight_target=3)
    a = seq(1, 5, max_tokens=4)
    s.add(a)
    first, second, third = s.schedule(), s.schedule(), s.schedule()
    assert [(c.start_pos, c.output_index, c.follows) for c in second.chunks] == [(5, 1, True)]
    assert [(c.start_pos, c.output_index, c.follows) for c in third.chunks] == [(6, 2, True)]
    assert len(s.admission(a).block_table) * 4 >= 7
    assert s.schedule() is None  # two deep at most
    run_step(s, first, token=7)
    fourth = s.schedule()
    assert [(c.start_pos, c.output_index) for c in fourth.chunks] == [(7, 3)]
    assert s.schedule() is None  # output 3 is the last one max_tokens allows
    for plan, token in ((second, 8), (third, 9), (fourth, 10)):
        run_step(s, plan, token=token)
    assert a.output_ids == [7, 8, 9, 10] and s.admission(a).num_computed == 8


def test_two_deep_followers_of_a_failed_step_are_dropped():
    s = create_scheduler(lookahead=True, lookahead_depth=2, inflight_target=3)
    a = seq(1, 5, max_tokens=8)
    s.add(a)
    first, second, third = s.schedule(), s.schedule(), s.schedule()
    s.update(first, None)
    assert s.schedule() is None
    run_step(s, second, token=8)
    run_step(s, third, token=9)
    assert a.output_ids == [] and s.admission(a).num_computed == 0
    assert [(c.start_pos, c.num_tokens, c.is_new) for c in s.schedule().chunks] == [(0, 5, True)]


def test_a_chunk_that_followed_a_failed_step_is_dropped_and_the_sequence_runs_again():
    s = create_scheduler(lookahead=True, inflight_target=2)
    a = seq(1, 5, max_tokens=8)
    s.add(a)
    first, second = s.schedule(), s.schedule()
    s.update(first, None)
    assert s.schedule() is None  # the follow is still out: nothing may follow a lost sample
    run_step(s, second, token=8)  # the stage ran it anyway: its answer is not used
    assert a.output_ids == [] and s.admission(a).num_computed == 0
    again = s.schedule()
    assert [(c.start_pos, c.num_tokens, c.is_new, c.follows) for c in again.chunks] == [(0, 5, True, False)]


def test_lookahead_leaves_sampled_sequences_to_wait_for_their_token():
    from stagemesh.sampling import SamplingSpec

    s = create_scheduler(lookahead=True, inflight_target=2)
    a = Sequence(seq_id=1, prompt_ids=[1, 2, 3], max_tokens=4, sampling=SamplingSpec(temperature=0.8, seed=1))
    s.add(a)
    first = s.schedule()
    assert s.schedule() is None  # drawn on the host: the stage cannot put it in place
    run_step(s, first)
    assert [c.follows for c in s.schedule().chunks] == [False]


def test_separate_decodes_keep_prefill_chunks_out_of_decode_micro_batches():
    s = create_scheduler(lookahead=True, separate_decodes=True, inflight_target=4)
    a, b = seq(1, 3, max_tokens=8), seq(2, 6, max_tokens=8)
    s.add(a)
    run_step(s, s.schedule())  # a's prompt
    s.add(b)
    decode, follow, prefill = s.schedule(), s.schedule(), s.schedule()
    assert [(c.seq, c.num_tokens, c.follows) for c in decode.chunks] == [(a, 1, False)]
    assert [(c.seq, c.num_tokens, c.follows) for c in follow.chunks] == [(a, 1, True)]
    assert [(c.seq, c.num_tokens) for c in prefill.chunks] == [(b, 6)]


def test_inflight_as_configured_or_enough_for_every_stage():
    from gateway.engine import inflight_for

    assert [inflight_for(0, n, False, False) for n in (1, 2, 4)] == [2, 2, 4]
    assert inflight_for(0, 1, True, False) == 3  # async scheduling on one stage: two steps ahead
    assert inflight_for(0, 3, True, True) == 5  # the decodes' own chain holds two slots
    assert inflight_for(2, 4, False, False) == 2 and inflight_for(5, 1, True, False) == 5  # as configured
    assert inflight_for(2, 4, True, True) == 3  # the decodes' chain needs a slot left for prefills


def test_lookahead_depth_follows_the_slots_on_a_single_stage_only():
    from gateway.engine import lookahead_depth_for

    assert [lookahead_depth_for(n, 1) for n in (1, 2, 3, 4, 8)] == [1, 1, 2, 2, 2]
    assert lookahead_depth_for(6, 3) == 1
    with pytest.raises(ValueError):
        create_scheduler(inflight_target=0)  # 0 (auto) is the engine's to resolve
