"""Tensor <-> protobuf `Tensor` codec: raw bytes plus dtype and shape, no per-element protobuf.

Encoding copies once (tensor storage -> bytes); decoding wraps the received bytes with
`torch.frombuffer` without a copy. bfloat16 has no numpy dtype, so bytes go through torch alone.
"""

from __future__ import annotations

import warnings

import torch

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


def decode(msg: pb.Tensor, expect_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Wrap the message's bytes as a tensor; validates that dtype and shape match the bytes."""
    dtype = dtype_from_name(msg.dtype)
    if expect_dtype is not None and dtype != expect_dtype:
        raise InvalidArgument(f"hidden states have dtype {msg.dtype}, this stage runs {_NAMES[expect_dtype]}")
    shape = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"tensor shape {shape} has a negative dimension")
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if numel * itemsize != len(msg.data):
        raise InvalidArgument(
            f"tensor of shape {shape} and dtype {msg.dtype} needs {numel * itemsize} bytes, got {len(msg.data)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    # The bytes object is immutable and we never write into it; silence torch's warning about that
    # instead of paying a copy (the hidden states are consumed read-only by the next layer).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(msg.data, dtype=dtype).view(shape)
