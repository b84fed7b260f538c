"""Stage.Forward's own framing of the hidden states (wire.forward_bytes / parse_forward): what it
writes is a ForwardRequest to any protobuf reader, and any valid encoding of one reads back the same."""

import pytest
import torch

from stagemesh import wire
from stagemesh.v1 import stagemesh_pb2 as pb


def _request() -> pb.ForwardRequest:
    return pb.ForwardRequest(
        epoch=3, lease_id="lease", step_id=9, finished_seq_ids=[4],
        new_sequences=[pb.NewSequence(seq_id=1, block_ids=[2, 3], sampling=pb.SamplingParams(temperature=0.5))],
        chunks=[pb.SequenceChunk(seq_id=i, start_pos=i, num_tokens=2, sample=i % 2 == 0) for i in range(5)],
    )


def _through_protobuf(req: pb.ForwardRequest, hidden: torch.Tensor) -> pb.ForwardRequest:
    full = pb.ForwardRequest()
    full.CopyFrom(req)
    full.hidden.CopyFrom(wire.encode(hidden))
    return full


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [0, 1, 3, 257])
def test_forward_bytes_read_as_protobuf(dtype, rows):
    hidden = torch.randn(rows, 24).to(dtype)
    req = _request()
    raw = wire.forward_bytes(req, hidden)
    assert pb.ForwardRequest.FromString(raw) == _through_protobuf(req, hidden)
    received = wire.parse_forward(raw)
    assert received.request == req and not received.request.HasField("hidden")
    got = wire.decode(received.hidden)
    assert got.dtype == dtype and torch.equal(got, hidden)


def test_parse_takes_fields_in_any_order_and_a_request_without_hidden_states():
    hidden = torch.arange(12, dtype=torch.float32).view(3, 4)
    req = _request()
    tensor = wire.encode(hidden).SerializeToString()
    hidden_first = bytes([8 << 3 | 2]) + wire._varint(len(tensor)) + tensor + req.SerializeToString()
    received = wire.parse_forward(hidden_first)
    assert received.request == req and torch.equal(wire.decode(received.hidden), hidden)
    # data before dtype and shape inside the Tensor, as another writer may order them
    data_first = pb.Tensor(data=wire.encode(hidden).data).SerializeToString() + \
        pb.Tensor(dtype="float32", shape=[3, 4]).SerializeToString()
    received = wire.parse_forward(req.SerializeToString() + bytes([8 << 3 | 2]) + wire._varint(len(data_first))
                                  + data_first)
    assert torch.equal(wire.decode(received.hidden), hidden)
    received = wire.parse_forward(req.SerializeToString())
    assert received.request == req and received.hidden is None


def test_odd_encodings_go_to_protobufs_parser():
    req = _request()
    # field 8 twice: protobuf merges the two Tensor messages (shapes concatenate, the later data wins)
    twice = _through_protobuf(req, torch.zeros(2, 2)).SerializeToString() + \
        pb.ForwardRequest(hidden=wire.encode(torch.ones(2, 2))).SerializeToString()
    received, expected = wire.parse_forward(twice), pb.ForwardRequest.FromString(twice)
    expected.ClearField("hidden")
    assert received.request == expected and not received.error
    assert (received.hidden.dtype, list(received.hidden.shape), received.hidden.data) == (
        "float32", [2, 2, 2, 2], wire.encode(torch.ones(2, 2)).data)
    # the request comes without them, so a stage that forwards it sends its own hidden states once
    assert not received.request.HasField("hidden")
    assert wire.parse_forward(wire.forward_bytes(received.request, torch.ones(1, 2))).hidden.shape == (1, 2)
    with pytest.raises(ValueError):
        wire.forward_bytes(_through_protobuf(req, torch.ones(1, 2)), torch.ones(1, 2))


@pytest.mark.parametrize("cut", [1, 2, 17, 40, 60])  # 1, 2: inside the last field (finished_seq_ids)
def test_truncated_bytes_are_an_error_not_an_exception(cut):
    """Cut in the deltas, in the data, in the Tensor's header: the handler answers INVALID_ARGUMENT."""
    raw = wire.forward_bytes(_request(), torch.ones(4, 4))
    received = wire.parse_forward(raw[:len(raw) - cut] if cut < 60 else raw[:cut])
    assert received.error.startswith("malformed ForwardRequest") and received.request is None


def test_unaligned_bytes_are_copied_for_the_cpu_only():
    odd = []
    for cols in (8, 200, 7, 130):  # the shape's varints move the data's offset in the message
        hidden = torch.randn(5, cols).to(torch.bfloat16)
        received = wire.parse_forward(wire.forward_bytes(pb.ForwardRequest(lease_id="x"), hidden))
        view = wire.decode(received.hidden, aligned=False)
        aligned = wire.decode(received.hidden)
        assert torch.equal(view, hidden) and torch.equal(aligned, hidden)
        assert aligned.data_ptr() % 2 == 0
        odd.append(view.data_ptr() % 2 == 1)
        if odd[-1]:
            assert aligned.data_ptr() != view.data_ptr()
        else:
            assert aligned.data_ptr() == view.data_ptr()  # no copy
    assert True in odd and False in odd  # both cases ran
