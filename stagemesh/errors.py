"""Typed errors and their one mapping to gRPC status codes.

Services raise these; `grpc_errors` (a decorator on servicer methods) turns them into a status
with the message unchanged, so callers see a sentence they can act on, never INTERNAL for input.
"""

from __future__ import annotations

import functools
import inspect

import grpc


class StagemeshError(Exception):
    """Base class; `code` is the gRPC status the caller receives."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(StagemeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class OutOfRange(StagemeshError):
    code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhausted(StagemeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(StagemeshError):
    code = grpc.StatusCode.UNAVAILABLE


class FailedPrecondition(StagemeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(StagemeshError):
    """A step that depended on an earlier one that failed: run it again."""

    code = grpc.StatusCode.ABORTED


class Unauthenticated(StagemeshError):
    code = grpc.StatusCode.UNAUTHENTICATED


class NotFound(StagemeshError):
    code = grpc.StatusCode.NOT_FOUND


class CheckpointError(StagemeshError):
    """A missing or malformed checkpoint file; the message names the file."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class NoFreeBlocks(ResourceExhausted):
    """The block allocator cannot satisfy a request (typed, never None)."""


def grpc_errors(method):
    """Map StagemeshError to the call's status for unary and server-streaming aio handlers."""

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except StagemeshError as exc:
                await context.abort(exc.code, str(exc))

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except StagemeshError as exc:
            await context.abort(exc.code, str(exc))

    return unary_wrapper
