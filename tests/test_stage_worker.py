"""A stage worker over real gRPC (coordinator + one worker process holding the whole model).

Forward is driven by hand here, as the gateway would: block-table deltas, chunked prefill,
decode, sampling on the last stage, and every kind of refusal with its status code.
"""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from stagemesh import wire
from stagemesh.v1 import stagemesh_pb2 as pb
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc
from stagemesh.cli.harness import coordinator_cmd, new_port, processes, worker_cmd
from tests.reference import hf_greedy, random_prompts


@pytest.fixture(scope="module")
def stage(ckpt_dir):
    model_dir = ckpt_dir("llama", num_layers=2)
    cport, wport = new_port(), new_port()
    coord = f"127.0.0.1:{cport}"
    with processes(coordinator_cmd(model_dir, cport), worker_cmd(model_dir, coord, wport, kv_blocks=32)):
        channel = grpc.insecure_channel(f"127.0.0.1:{wport}")
        coord_stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(coord))
        deadline = time.monotonic() + 60
        while not coord_stub.GetPlan(pb.GetPlanRequest()).ready:
            assert time.monotonic() < deadline, "worker never loaded its layers"
            time.sleep(0.1)
        plan = coord_stub.GetPlan(pb.GetPlanRequest())
        stub = pb_grpc.StageStub(channel)
        stub.target = f"127.0.0.1:{wport}"
        yield stub, plan.epoch, model_dir
        channel.close()


def _forward(stub, epoch, **kw):
    return stub.Forward(pb.ForwardRequest(epoch=epoch, lease_id="t", **kw), timeout=30)


def test_greedy_decode_over_grpc_matches_transformers(stage):
    stub, epoch, model_dir = stage
    prompt = random_prompts(0, [11], 320)[0]
    expected = hf_greedy(model_dir, prompt, 5)
    blocks = [0, 1, 2, 3, 4]  # 20 slots of 4 tokens: prompt + 5 new tokens fit
    out = []
    # Prefill in two chunks (6 + 5 tokens); sample after the second.
    _forward(stub, epoch, new_sequences=[pb.NewSequence(seq_id=1, block_ids=blocks)],
             chunks=[pb.SequenceChunk(seq_id=1, start_pos=0, num_tokens=6)], token_ids=prompt[:6])
    resp = _forward(stub, epoch, chunks=[pb.SequenceChunk(seq_id=1, start_pos=6, num_tokens=5, sample=True)],
                    token_ids=prompt[6:])
    out.append(resp.samples[0].token_id)
    for i in range(1, 5):
        resp = _forward(stub, epoch, chunks=[pb.SequenceChunk(seq_id=1, start_pos=len(prompt) + i - 1,
                                                                num_tokens=1, sample=True, output_index=i)],
                        token_ids=[out[-1]])
        out.append(resp.samples[0].token_id)
    assert out == expected
    stats = stub.Stats(pb.StatsRequest())
    assert stats.live_sequences == 1 and stats.blocks_in_use == 5
    _forward(stub, epoch, finished_seq_ids=[1])
    stats = stub.Stats(pb.StatsRequest())
    assert stats.live_sequences == 0 and stats.blocks_in_use == 0


def test_decodes_that_follow_samples_in_flight_match_transformers_even_sent_out_of_order(stage):
    """Async scheduling on the wire: each decode names the sample of the step before it
    (follows_sample, a 0 in its token's place), all sent before any answer is back; the first
    follower is sent before the prompt it follows and waits for it."""
    stub, epoch, model_dir = stage
    prompt = random_prompts(3, [9], 320)[0]
    expected = hf_greedy(model_dir, prompt, 5)

    def follow(i):
        chunk = pb.SequenceChunk(seq_id=7, start_pos=len(prompt) + i - 1, num_tokens=1, sample=True,
                                 output_index=i, follows_sample=True)
        return stub.Forward.future(pb.ForwardRequest(epoch=epoch, lease_id="t", chunks=[chunk], token_ids=[0]),
                                   timeout=30)

    early = follow(1)
    # A step of another sequence, sent after it on the same channel: once it is answered, the
    # worker's one compute thread has tried the early follower (handlers and launches run in
    # arrival order), and that follower is still held, waiting for the prompt's step.
    _forward(stub, epoch, new_sequences=[pb.NewSequence(seq_id=17, block_ids=[8])],
             chunks=[pb.SequenceChunk(seq_id=17, start_pos=0, num_tokens=2)], token_ids=[5, 6])
    assert not early.done(), "the follower was answered before the step it follows was sent"
    head = stub.Forward.future(pb.ForwardRequest(
        epoch=epoch, lease_id="t", new_sequences=[pb.NewSequence(seq_id=7, block_ids=[0, 1, 2, 3])],
        chunks=[pb.SequenceChunk(seq_id=7, start_pos=0, num_tokens=len(prompt), sample=True)], token_ids=prompt),
        timeout=30)
    calls = [head, early]
    calls[-1].result()
    for i in range(2, 5):
        calls.append(follow(i))
    assert [c.result().samples[0].token_id for c in calls] == expected
    _forward(stub, epoch, finished_seq_ids=[7, 17])


def test_a_decode_that_follows_a_refused_step_is_aborted_at_once(stage):
    stub, epoch, _ = stage
    _forward(stub, epoch, new_sequences=[pb.NewSequence(seq_id=8, block_ids=[0])],
             chunks=[pb.SequenceChunk(seq_id=8, start_pos=0, num_tokens=2, sample=True)], token_ids=[5, 6])
    with pytest.raises(grpc.RpcError) as err:  # a block id outside the pool: refused
        _forward(stub, epoch, chunks=[pb.SequenceChunk(seq_id=8, start_pos=2, num_tokens=1, sample=True,
                                                       output_index=1, new_block_ids=[10_000])], token_ids=[9])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        _forward(stub, epoch, chunks=[pb.SequenceChunk(seq_id=8, start_pos=3, num_tokens=1, sample=True,
                                                       output_index=2, follows_sample=True)], token_ids=[0])
    assert err.value.code() == grpc.StatusCode.ABORTED and "refused" in err.value.details()
    assert time.monotonic() - t0 < 2
    _forward(stub, epoch, new_sequences=[pb.NewSequence(seq_id=9, block_ids=[1], sampling=pb.SamplingParams(
        temperature=0.7, seed=3))], chunks=[pb.SequenceChunk(seq_id=9, start_pos=0, num_tokens=2, sample=True)],
        token_ids=[5, 6])
    with pytest.raises(grpc.RpcError) as err:  # drawn on the host: nothing to follow on the device
        _forward(stub, epoch, chunks=[pb.SequenceChunk(seq_id=9, start_pos=2, num_tokens=1, sample=True,
                                                       output_index=1, follows_sample=True)], token_ids=[0])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "greedy" in err.value.details()
    _forward(stub, epoch, finished_seq_ids=[8, 9])


@pytest.mark.parametrize("bad,code", [
    (dict(epoch_delta=1), grpc.StatusCode.FAILED_PRECONDITION),
    (dict(chunks=[pb.SequenceChunk(seq_id=99, start_pos=0, num_tokens=1)], token_ids=[5]),
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(new_sequences=[pb.NewSequence(seq_id=2, block_ids=[10_000])],
          chunks=[pb.SequenceChunk(seq_id=2, start_pos=0, num_tokens=1)], token_ids=[5]),
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(new_sequences=[pb.NewSequence(seq_id=3, block_ids=[0])],
          chunks=[pb.SequenceChunk(seq_id=3, start_pos=0, num_tokens=2)], token_ids=[5]),
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(new_sequences=[pb.NewSequence(seq_id=4, block_ids=[0])],
          chunks=[pb.SequenceChunk(seq_id=4, start_pos=0, num_tokens=1)], token_ids=[100_000]),
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(new_sequences=[pb.NewSequence(seq_id=5, block_ids=[0])],
          chunks=[pb.SequenceChunk(seq_id=5, start_pos=0, num_tokens=9)], token_ids=[5] * 9),
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(new_sequences=[pb.NewSequence(seq_id=7, block_ids=[0, 0])],
          chunks=[pb.SequenceChunk(seq_id=7, start_pos=0, num_tokens=1)], token_ids=[5]),
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(new_sequences=[pb.NewSequence(seq_id=6, block_ids=[0], sampling=pb.SamplingParams(temperature=-1))],
          chunks=[pb.SequenceChunk(seq_id=6, start_pos=0, num_tokens=1)], token_ids=[5]),
     grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_forward_is_refused_and_changes_nothing(stage, bad, code):
    stub, epoch, _ = stage
    bad = dict(bad)
    epoch += bad.pop("epoch_delta", 0)
    with pytest.raises(grpc.RpcError) as err:
        _forward(stub, epoch, **bad)
    assert err.value.code() == code
    assert err.value.details()
    stats = stub.Stats(pb.StatsRequest())
    assert stats.live_sequences == 0 and stats.blocks_in_use == 0


def test_bytes_that_are_no_forward_request_are_invalid_argument(stage):
    """Malformed bytes get INVALID_ARGUMENT (a stage that answered UNKNOWN would be taken for dead)."""
    stub, epoch, _ = stage
    with grpc.insecure_channel(stub.target) as channel:
        raw = channel.unary_unary("/stagemesh.v1.Stage/Forward")
        good = wire.forward_bytes(pb.ForwardRequest(epoch=epoch, lease_id="t"), torch.zeros(1, 4))
        for bad in (good[:-20], b"\xff\xff\xff"):
            with pytest.raises(grpc.RpcError) as err:
                raw(bad, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed ForwardRequest" in err.value.details()
    assert stub.Stats(pb.StatsRequest()).live_sequences == 0  # and it still serves


def test_hidden_bytes_that_do_not_match_the_shape_are_refused():
    t = torch.zeros(2, 3)
    msg = wire.encode(t)
    msg.shape[:] = [4, 3]
    with pytest.raises(Exception) as err:
        wire.decode(msg)
    assert "needs 48 bytes" in str(err.value)
