"""The edge where errors become gRPC statuses: the one kind -> status table and `grpc_errors`.

`stagemesh.errors` stays free of grpc so that the pure core (scheduler, block manager, router,
planner) can raise typed errors without importing it (tests/test_layers.py guards that).
"""

from __future__ import annotations

import functools
import inspect

import grpc

from stagemesh.errors import ErrorKind, StagemeshError

STATUS_OF_KIND: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.OUT_OF_RANGE: grpc.StatusCode.OUT_OF_RANGE,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.ABORTED: grpc.StatusCode.ABORTED,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
}


def status_code(exc: StagemeshError) -> grpc.StatusCode:
    """The gRPC status a caller receives for `exc`."""
    return STATUS_OF_KIND[exc.kind]


def grpc_errors(method):
    """Map StagemeshError to the call's status for unary and server-streaming aio handlers."""

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except StagemeshError as exc:
                await context.abort(status_code(exc), str(exc))

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except StagemeshError as exc:
            await context.abort(status_code(exc), str(exc))

    return unary_wrapper
