"""Tensor <-> protobuf `Tensor` codec: raw bytes plus dtype and shape, no per-element protobuf.

Encoding copies once (tensor storage -> bytes); decoding wraps the received bytes with
`torch.frombuffer` without a copy. bfloat16 has no numpy dtype, so bytes go through torch alone.
Stage.Forward's requests skip protobuf's own copies of the hidden states (forward_bytes,
parse_forward, below).
"""

from __future__ import annotations

import warnings

import torch
from google.protobuf.message import DecodeError

from stagemesh.errors import InvalidArgument
from stagemesh.v1 import stagemesh_pb2 as pb

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise InvalidArgument(f"unsupported tensor dtype {name!r}; expected one of {sorted(_DTYPES)}")


def encode(t: torch.Tensor) -> pb.Tensor:
    """Serialise a tensor (any device) as raw bytes."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return pb.Tensor(dtype=_NAMES[t.dtype], shape=list(t.shape), data=raw)


def decode(msg, expect_dtype: torch.dtype | None = None, aligned: bool = True) -> torch.Tensor:
    """Wrap the bytes of a `Tensor` message (or a RawTensor) as a tensor without a copy; validates
    dtype and shape first. aligned: copy bytes that sit at an address that is no multiple of the
    element size (CPU kernels want aligned elements; a copy to a GPU does not care)."""
    dtype = dtype_from_name(msg.dtype)
    if expect_dtype is not None and dtype != expect_dtype:
        raise InvalidArgument(f"hidden states have dtype {msg.dtype}, this stage runs {_NAMES[expect_dtype]}")
    shape = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"tensor shape {shape} has a negative dimension")
    numel = 1
    for d in shape:
        numel *= d
    data = msg.data  # one read: a protobuf message copies its bytes field at every read
    itemsize = torch.empty((), dtype=dtype).element_size()
    if numel * itemsize != len(data):
        raise InvalidArgument(
            f"tensor of shape {shape} and dtype {msg.dtype} needs {numel * itemsize} bytes, got {len(data)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    # The bytes are immutable and we never write into them; silence torch's warning about that
    # instead of paying a copy (the hidden states are consumed read-only by the next layer).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.frombuffer(data, dtype=dtype).view(shape)
    return t.clone() if aligned and t.data_ptr() % itemsize else t


# -- Forward without the protobuf copies ----------------------------------------------------------
# A stage-to-stage ForwardRequest is a few KB of deltas plus the hidden states (32 MB for a
# 4,096-token micro-batch of an 8B model). Through protobuf those bytes are copied five times on
# the sender (to bytes, into a Tensor, into the request, into the wire string) and three times on
# the receiver (parse, then every `.data` read). Protobuf's wire format is a plain concatenation of
# fields, so the sender writes field 8 itself from a view of the pinned host tensor (one copy) and
# the receiver cuts it out of the received bytes (no copy); the rest goes through protobuf.

_LEN = 2  # wire type of a length-delimited field
_HIDDEN_FIELD = pb.ForwardRequest.DESCRIPTOR.fields_by_name["hidden"].number
_DATA_FIELD = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number


class RawTensor:
    """A Tensor message's fields with `data` a view of received bytes; `decode` takes it."""

    __slots__ = ("dtype", "shape", "data")

    def __init__(self, dtype: str, shape, data):
        self.dtype, self.shape, self.data = dtype, shape, data


class ForwardIn:
    """A received ForwardRequest: the request without its hidden states, and those as a RawTensor."""

    __slots__ = ("request", "hidden")

    def __init__(self, request: pb.ForwardRequest, hidden: RawTensor | None):
        self.request, self.hidden = request, hidden


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, start, end) of each top-level field in buf[start:end]."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _read_varint(buf, pos, end)
        number, wtype = key >> 3, key & 7
        if wtype == 0:
            _, pos = _read_varint(buf, pos, end)
        elif wtype == 1:
            pos += 8
        elif wtype == 5:
            pos += 4
        elif wtype == _LEN:
            size, pos = _read_varint(buf, pos, end)
            yield number, wtype, first, pos, pos + size
            pos += size
            continue
        else:
            raise ValueError(f"unsupported wire type {wtype}")
        yield number, wtype, first, None, pos
    if pos != end:
        raise ValueError("field runs past the end of the message")


def forward_bytes(request: pb.ForwardRequest, hidden: torch.Tensor) -> bytes:
    """`request` (its hidden field unset) with `hidden` as field 8, serialised with one copy of the
    hidden bytes. Equal to setting the field through protobuf and serialising."""
    t = hidden.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    head = pb.Tensor(dtype=_NAMES[t.dtype], shape=list(t.shape)).SerializeToString()
    data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""
    nbytes = len(data)  # a flat uint8 view: its length is its size in bytes
    data_key = _varint(_DATA_FIELD << 3 | _LEN) + _varint(nbytes) if nbytes else b""
    tensor_len = len(head) + len(data_key) + nbytes
    return b"".join((request.SerializeToString(), _varint(_HIDDEN_FIELD << 3 | _LEN), _varint(tensor_len),
                     head, data_key, data))


def parse_forward(raw: bytes) -> ForwardIn:
    """The gRPC request deserializer of Stage.Forward: the hidden states stay in `raw`. Anything
    this reader does not expect (a repeated field 8, a malformed buffer) goes to protobuf's parser,
    which accepts or rejects it as it always does."""
    buf = memoryview(raw)
    try:
        rest, hidden = [], None
        for number, wtype, first, start, end in _fields(buf, 0, len(buf)):
            if number != _HIDDEN_FIELD:
                rest.append(buf[first:end])
                continue
            if wtype != _LEN or hidden is not None:
                raise ValueError("field 8 repeated or not a message")
            head, data = [], b""
            for n, wt, f, s, e in _fields(buf, start, end):
                if n == _DATA_FIELD and wt == _LEN:
                    data = buf[s:e]  # proto3: the last one wins
                else:
                    head.append(buf[f:e])
            msg = pb.Tensor.FromString(b"".join(head))
            hidden = RawTensor(msg.dtype, tuple(msg.shape), data)
        return ForwardIn(pb.ForwardRequest.FromString(b"".join(rest)), hidden)
    except (ValueError, DecodeError):
        request = pb.ForwardRequest.FromString(raw)
        return ForwardIn(request, request.hidden if request.HasField("hidden") else None)
