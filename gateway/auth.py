"""API keys and per-key rate limits of the gateway's public APIs (gRPC and HTTP).

A caller presents `authorization: Bearer KEY` (gRPC metadata or the HTTP header). With keys
configured, a missing or unknown key is UNAUTHENTICATED (HTTP 401). With `rate_limit_rps` set,
each key (or, without keys, every caller together) has a token bucket of that rate and a burst of
`rate_limit_burst` requests; a Generate beyond it is RESOURCE_EXHAUSTED (HTTP 429). Buckets exist
only for configured keys (plus one anonymous bucket), so memory does not grow with callers.

`ApiKeyAuth.check` is plain Python (no grpc, no I/O); `ApiKeyInterceptor` applies it to the
Generation service (health and reflection stay open) and `ApiKeyMiddleware` to the HTTP app.
Everything runs on the gateway's event loop.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import grpc

from stagemesh.errors import ResourceExhausted, StagemeshError, Unauthenticated

ANONYMOUS = "-"


class RateLimited(ResourceExhausted):
    """A key exceeded its request rate; `retry_after_s` says when one more request fits."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.last = burst, now

    def take(self, now: float) -> float:
        """Take one token; returns 0 on success, else the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


def _digest(key: str) -> bytes:
    # Keys are looked up by digest: the lookup's timing says nothing about a key's prefix.
    return hashlib.sha256(key.encode()).digest()


def load_keys_file(path: str) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"--api-keys-file {path}: {exc.strerror}") from exc
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


class ApiKeyAuth:
    def __init__(self, keys=(), rate_limit_rps: float = 0.0, rate_limit_burst: float = 0.0, clock=time.monotonic):
        if rate_limit_rps < 0 or rate_limit_burst < 0:
            raise ValueError("--rate-limit-rps and --rate-limit-burst must be >= 0")
        self._names = {_digest(k): f"key#{i}" for i, k in enumerate(keys)}
        self.required = bool(self._names)
        self.rate = rate_limit_rps
        self.burst = rate_limit_burst or max(1.0, math.ceil(rate_limit_rps))
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return self.required or self.rate > 0

    def check(self, authorization: str, count: bool = True) -> str:
        """Returns the caller's key name; raises Unauthenticated or RateLimited.

        `count`: whether this request spends a token (Generate does; ListModels does not).
        """
        name = ANONYMOUS
        if self.required:
            scheme, _, key = (authorization or "").strip().partition(" ")
            if not authorization:
                raise Unauthenticated("missing API key: send the header `authorization: Bearer <key>`")
            if scheme.lower() != "bearer" or not key.strip():
                raise Unauthenticated("malformed authorization: expected `Bearer <key>`")
            name = self._names.get(_digest(key.strip()))
            if name is None:
                raise Unauthenticated("invalid API key")
        if count and self.rate > 0:
            now = self._clock()
            bucket = self._buckets.get(name)
            if bucket is None:
                bucket = self._buckets[name] = TokenBucket(self.rate, self.burst, now)
            wait = bucket.take(now)
            if wait:
                raise RateLimited(f"rate limit of {self.rate:g} requests/s exceeded for this API key; "
                                  f"retry in {wait:.2f}s", wait)
        return name


# -- gRPC ---------------------------------------------------------------------------------------
class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call of the services under `prefix`; others (health, reflection) pass."""

    def __init__(self, auth: ApiKeyAuth, prefix: str = "/stagemesh.v1.Generation/", counted=("Generate",)):
        self.auth, self.prefix = auth, prefix
        self.counted = {prefix + m for m in counted}

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        metadata = dict(details.invocation_metadata or ())
        try:
            self.auth.check(str(metadata.get("authorization", "")), count=details.method in self.counted)
        except StagemeshError as exc:
            return _refusal(handler, exc)
        return handler


def _refusal(handler, exc: StagemeshError):
    async def refuse(_request, context):
        await context.abort(exc.code, str(exc))

    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, handler.request_deserializer, handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(refuse, handler.request_deserializer, handler.response_serializer)


# -- HTTP (pure ASGI: leaves streaming responses and disconnect detection untouched) ---------------
class ApiKeyMiddleware:
    def __init__(self, app, auth: ApiKeyAuth):
        self.app, self.auth = app, auth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        try:
            self.auth.check(authorization, count=scope.get("method") == "POST")
        except StagemeshError as exc:
            return await _send_error(send, exc)
        return await self.app(scope, receive, send)


async def _send_error(send, exc: StagemeshError) -> None:
    if isinstance(exc, Unauthenticated):
        status, type_, code = 401, "invalid_request_error", "invalid_api_key"
        extra = [(b"www-authenticate", b"Bearer")]
    else:
        status, type_, code = 429, "rate_limit_error", "rate_limit_exceeded"
        extra = [(b"retry-after", str(max(1, math.ceil(getattr(exc, "retry_after_s", 1)))).encode())]
    body = json.dumps({"error": {"message": str(exc), "type": type_, "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})
