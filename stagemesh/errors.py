"""Typed errors, each with a plain `kind` (no grpc here: the pure core raises these).

Services raise these; the edge (`stagemesh/grpc_status.py`: the `grpc_errors` decorator on
servicer methods, and the HTTP API's table) turns a kind into a status with the message unchanged,
so callers see a sentence they can act on, never INTERNAL for input. The kinds are named after
the gRPC status codes they become, so the two tables read side by side.
"""

from __future__ import annotations

import enum


class ErrorKind(str, enum.Enum):
    """What went wrong, in the caller's terms; each maps to exactly one gRPC status at the edge."""

    INTERNAL = "internal"
    INVALID_ARGUMENT = "invalid_argument"
    OUT_OF_RANGE = "out_of_range"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    FAILED_PRECONDITION = "failed_precondition"
    ABORTED = "aborted"
    UNAUTHENTICATED = "unauthenticated"
    NOT_FOUND = "not_found"


class StagemeshError(Exception):
    """Base class; `kind` says which status the caller receives."""

    kind = ErrorKind.INTERNAL


class InvalidArgument(StagemeshError):
    kind = ErrorKind.INVALID_ARGUMENT


class OutOfRange(StagemeshError):
    kind = ErrorKind.OUT_OF_RANGE


class ResourceExhausted(StagemeshError):
    kind = ErrorKind.RESOURCE_EXHAUSTED


class Unavailable(StagemeshError):
    kind = ErrorKind.UNAVAILABLE


class FailedPrecondition(StagemeshError):
    kind = ErrorKind.FAILED_PRECONDITION


class Aborted(StagemeshError):
    """A step that depended on an earlier one that failed: run it again."""

    kind = ErrorKind.ABORTED


class Unauthenticated(StagemeshError):
    kind = ErrorKind.UNAUTHENTICATED


class NotFound(StagemeshError):
    kind = ErrorKind.NOT_FOUND


class CheckpointError(StagemeshError):
    """A missing or malformed checkpoint file; the message names the file."""

    kind = ErrorKind.FAILED_PRECONDITION


class NoFreeBlocks(ResourceExhausted):
    """The block allocator cannot satisfy a request (typed, never None)."""
