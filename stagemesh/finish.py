"""Finish reasons: the strings users see and the wire's `FinishReason` enum.

Users see "stop", "length", "cancelled" or "error:WHAT" (`stagemesh generate --json`, the HTTP
API's `finish_reason`); those strings are a contract. On the wire the reason is an enum with the
error's WHAT beside it (`GenerateResponse.error`), and the deprecated text field 3 still carries
the string for clients built before the enum.
"""

from __future__ import annotations

from stagemesh.v1 import stagemesh_pb2 as pb

_WIRE = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
    "error": pb.FINISH_REASON_ERROR,
}
_TEXT = {value: text for text, value in _WIRE.items()}


def set_finish(msg: pb.GenerateResponse, reason: str) -> None:
    """Mark `msg` as the last one, ended for `reason` ("stop", …, "error:kv_capacity")."""
    kind, _, what = reason.partition(":")
    if kind not in _WIRE:  # no such reason: an error, named by the whole string
        kind, what = "error", reason
    msg.finish_reason = _WIRE[kind]
    msg.error = what
    msg.finish_reason_text = reason


def copy_finish(dst: pb.GenerateResponse, src: pb.GenerateResponse) -> None:
    dst.finish_reason, dst.error, dst.finish_reason_text = src.finish_reason, src.error, src.finish_reason_text


def finish_text(msg: pb.GenerateResponse) -> str:
    """The reason as users see it; "" while the stream runs. A gateway built before the enum
    sends only the text field."""
    if msg.finish_reason not in _TEXT:  # unset, or a reason newer than this client: the text says it
        return msg.finish_reason_text
    text = _TEXT.get(msg.finish_reason, "error")
    return f"{text}:{msg.error}" if msg.error else text
