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


def _host_view(t: torch.Tensor) -> tuple[str, list[int], memoryview | bytes]:
    """(dtype name, shape, a flat byte view of a contiguous host copy) of a tensor on any device."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""
    return _NAMES[t.dtype], list(t.shape), data


def encode(t: torch.Tensor) -> pb.Tensor:
    """Serialise a tensor (any device) as raw bytes."""
    dtype, shape, data = _host_view(t)
    return pb.Tensor(dtype=dtype, shape=shape, data=bytes(data))


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
# 4,096-token micro-batch of an 8B model). Through protobuf those bytes are copied on the sender
# (to bytes, into a Tensor, into the request, into the wire string) and on the receiver (parse,
# then every `.data` read). Protobuf's wire format is a concatenation of fields in any order, so
# the sender writes field 8 itself, first, from a view of the pinned host copy (one copy), and the
# receiver cuts it off the front of the received bytes (no copy); the rest goes through protobuf.

_LEN = 2  # wire type of a length-delimited field
_HIDDEN_FIELD = pb.ForwardRequest.DESCRIPTOR.fields_by_name["hidden"].number
_DATA_FIELD = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number
_HIDDEN_KEY = bytes([_HIDDEN_FIELD << 3 | _LEN])


class RawTensor:
    """A Tensor message's fields with `data` a view of received bytes; `decode` takes it."""

    __slots__ = ("dtype", "shape", "data")

    def __init__(self, dtype: str, shape, data):
        self.dtype, self.shape, self.data = dtype, shape, data


class ForwardIn:
    """A received ForwardRequest: the request without its hidden states, those as a RawTensor
    (or None), or `error` when the bytes are no ForwardRequest (the handler answers INVALID_ARGUMENT)."""

    __slots__ = ("request", "hidden", "error")

    def __init__(self, request: pb.ForwardRequest | None, hidden: RawTensor | None, error: str = ""):
        self.request, self.hidden, self.error = request, hidden, error


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
    """(field number, wire type, first byte, value start, value end) of each field in
    buf[start:end]; value start is None for wire types other than length-delimited."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _read_varint(buf, pos, end)
        number, wtype = key >> 3, key & 7
        value = None
        if wtype == 0:
            _, pos = _read_varint(buf, pos, end)
        elif wtype in (1, 5):
            pos += 8 if wtype == 1 else 4
        elif wtype == _LEN:
            size, pos = _read_varint(buf, pos, end)
            value, pos = pos, pos + size
        else:
            raise ValueError(f"unsupported wire type {wtype}")
        if pos > end:
            raise ValueError("field runs past the end of the message")
        yield number, wtype, first, value, pos


def forward_bytes(request: pb.ForwardRequest, hidden) -> bytes:
    """`request` (its hidden field unset) with `hidden` as field 8, written first, serialised with
    one copy of the hidden bytes. Protobuf parses it as if the field had been set through it.
    hidden: a tensor, or hidden states as received (a RawTensor or Tensor message: passed on as
    they came, unchecked; the stage that decodes them checks them)."""
    if request.HasField("hidden"):
        raise ValueError("forward_bytes: the request carries hidden states already")
    if isinstance(hidden, torch.Tensor):
        dtype, shape, data = _host_view(hidden)
    else:
        dtype, shape, data = hidden.dtype, list(hidden.shape), hidden.data
    head = pb.Tensor(dtype=dtype, shape=shape).SerializeToString()
    nbytes = len(data)  # bytes, or a flat uint8 view: its length is its size in bytes
    data_key = _varint(_DATA_FIELD << 3 | _LEN) + _varint(nbytes) if nbytes else b""
    tensor_len = len(head) + len(data_key) + nbytes
    return b"".join((_HIDDEN_KEY, _varint(tensor_len), head, data_key, data, request.SerializeToString()))


def _raw_tensor(buf: memoryview, start: int, end: int) -> RawTensor:
    head, data = [], b""
    for number, wtype, first, value, stop in _fields(buf, start, end):
        if number == _DATA_FIELD and wtype == _LEN:
            data = buf[value:stop]  # proto3: the last one wins
        else:
            head.append(buf[first:stop])
    msg = pb.Tensor.FromString(b"".join(head))
    return RawTensor(msg.dtype, tuple(msg.shape), data)


def parse_forward(raw: bytes) -> ForwardIn:
    """The gRPC request deserializer of Stage.Forward; never raises. Hidden states written first
    (forward_bytes) stay in `raw`; any other encoding goes through protobuf's parser whole."""
    buf = memoryview(raw)
    try:
        number, wtype, _, value, stop = next(_fields(buf, 0, len(buf)), (0, 0, 0, None, 0))
        if number == _HIDDEN_FIELD and wtype == _LEN:
            hidden = _raw_tensor(buf, value, stop)
            request = pb.ForwardRequest.FromString(buf[stop:])
            if not request.HasField("hidden"):  # else field 8 again: protobuf merges the two
                return ForwardIn(request, hidden)
    except (ValueError, DecodeError):
        pass  # protobuf decides below
    try:
        request = pb.ForwardRequest.FromString(raw)
    except DecodeError as exc:
        return ForwardIn(None, None, f"malformed ForwardRequest: {exc}")
    if not request.HasField("hidden"):
        return ForwardIn(request, None)
    h = request.hidden
    hidden = RawTensor(h.dtype, tuple(h.shape), h.data)
    request.ClearField("hidden")  # so that a stage forwarding the request sends its own
    return ForwardIn(request, hidden)
