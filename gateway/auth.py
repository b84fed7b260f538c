"""API keys and per-key rate limits of the gateway's public APIs (gRPC and HTTP).

A caller presents `authorization: Bearer KEY` (gRPC metadata or the HTTP header). With keys
configured, a missing or unknown key is UNAUTHENTICATED (HTTP 401). With `rate_limit_rps` set,
each key (or, without keys, every caller together) has a token bucket of that rate and a burst of
`rate_limit_burst` requests; a Generate beyond it is RESOURCE_EXHAUSTED (HTTP 429). Buckets exist
only for configured keys (plus one anonymous bucket), so memory does not grow with callers.

Wrong keys are throttled per peer (its IP address): after `max_failures` wrong keys within
`failure_window_s`, every attempt from that peer is refused for `lockout_s` without looking at
its key (UNAUTHENTICATED, HTTP 429), so guessing runs at `max_failures` tries per lockout at
most. Looking at the key during the lockout would tell a guesser which try was right. A missing
key is not a guess and is not counted. Every refusal that has a retry delay says it in a
machine-readable form: `google.rpc.RetryInfo` in the gRPC status details
(`grpc-status-details-bin`), `Retry-After` on HTTP.

`ApiKeyAuth.check` is plain Python (no grpc, no I/O); `ApiKeyInterceptor` applies it to the
Generation service (health and reflection stay open) and `ApiKeyMiddleware` to the HTTP app.
Everything runs on the gateway's event loop.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import urllib.parse
from pathlib import Path

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from stagemesh.errors import ResourceExhausted, StagemeshError, Unauthenticated
from stagemesh.grpc_status import status_code
from stagemesh.membership import API_KEYS_ENV, guarded

ANONYMOUS = "-"


class RateLimited(ResourceExhausted):
    """A key exceeded its request rate; `retry_after_s` says when one more request fits."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Throttled(Unauthenticated):
    """A peer sent too many wrong keys; it is refused for `retry_after_s` more seconds."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class FailureThrottle:
    """Wrong keys per peer in a fixed window; a peer at `max_failures` is locked out.

    Memory is bounded: at most `max_peers` peers are tracked (expired ones dropped first, then
    the oldest), so a flood of addresses cannot grow it. Event loop only.
    """

    def __init__(self, max_failures: int, window_s: float, lockout_s: float, max_peers: int = 10_000):
        if max_failures < 0 or window_s <= 0 or lockout_s < 0:
            raise ValueError("auth throttle: max_failures >= 0, window_s > 0 and lockout_s >= 0")
        self.max_failures, self.window_s, self.lockout_s = max_failures, window_s, lockout_s
        self.max_peers = max_peers
        self._peers: dict[str, list[float]] = {}  # peer -> [window start, failures, locked until]

    def locked_for(self, peer: str, now: float) -> float:
        entry = self._peers.get(peer)
        return max(0.0, entry[2] - now) if entry else 0.0

    def failed(self, peer: str, now: float) -> None:
        if not self.max_failures:
            return
        entry = self._peers.get(peer)
        if entry is None or now - entry[0] > self.window_s:
            self._make_room(now)
            entry = self._peers[peer] = [now, 0, 0.0]
        entry[1] += 1
        if entry[1] >= self.max_failures:
            entry[:] = [now, 0, now + self.lockout_s]  # a new window starts when the lockout does

    def _make_room(self, now: float) -> None:
        if len(self._peers) < self.max_peers:
            return
        for peer in [p for p, (start, _n, until) in self._peers.items()
                     if now - start > self.window_s and now >= until]:
            del self._peers[peer]
        while len(self._peers) >= self.max_peers:
            del self._peers[next(iter(self._peers))]


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


def keys_from_env(environ=None) -> list[str]:
    """Keys handed down in the environment (whitespace-separated): how `stagemesh up` passes them
    to its gateway, never on the command line, where any local user could read them."""
    env = os.environ if environ is None else environ
    return env.get(API_KEYS_ENV, "").split()


def load_keys_file(path: str) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"--api-keys-file {path}: {exc.strerror}") from exc
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


class ApiKeyAuth:
    def __init__(self, keys=(), rate_limit_rps: float = 0.0, rate_limit_burst: float = 0.0, clock=time.monotonic,
                 max_failures: int = 10, failure_window_s: float = 60.0, lockout_s: float = 30.0):
        if rate_limit_rps < 0 or rate_limit_burst < 0:
            raise ValueError("--rate-limit-rps and --rate-limit-burst must be >= 0")
        self._names = {_digest(k): f"key#{i}" for i, k in enumerate(keys)}
        self.required = bool(self._names)
        self.rate = rate_limit_rps
        self.burst = rate_limit_burst or max(1.0, math.ceil(rate_limit_rps))
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self.throttle = FailureThrottle(max_failures, failure_window_s, lockout_s)

    @property
    def enabled(self) -> bool:
        return self.required or self.rate > 0

    def check(self, authorization: str, count: bool = True, peer: str = "") -> str:
        """Returns the caller's key name; raises Unauthenticated, Throttled or RateLimited.

        `count`: whether this request spends a token (Generate does; ListModels does not).
        `peer`: who is calling (an address without its port), for the wrong-key throttle.
        """
        name = ANONYMOUS
        if self.required:
            name = self._key_name(authorization, peer)
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

    def _key_name(self, authorization: str, peer: str) -> str:
        now = self._clock()
        locked = self.throttle.locked_for(peer, now)
        if locked:
            raise Throttled(f"too many wrong API keys from {peer or 'this peer'}; retry in {locked:.1f}s", locked)
        scheme, _, key = (authorization or "").strip().partition(" ")
        if not authorization:
            raise Unauthenticated("missing API key: send the header `authorization: Bearer <key>`")
        name = self._names.get(_digest(key.strip())) if scheme.lower() == "bearer" else None
        if name is None:
            self.throttle.failed(peer, now)
            if scheme.lower() != "bearer" or not key.strip():
                raise Unauthenticated("malformed authorization: expected `Bearer <key>`")
            raise Unauthenticated("invalid API key")
        return name


# -- gRPC ---------------------------------------------------------------------------------------
class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call of the services under `prefix`; others (health, reflection) pass.

    The check runs inside the call (a wrapped handler): the wrong-key throttle needs the peer's
    address, which only the call's context has.
    """

    def __init__(self, auth: ApiKeyAuth, prefix: str = "/stagemesh.v1.Generation/", counted=("Generate",)):
        self.auth, self.prefix = auth, prefix
        self.counted = {prefix + m for m in counted}

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        metadata = dict(details.invocation_metadata or ())
        authorization, count = str(metadata.get("authorization", "")), details.method in self.counted

        async def check(context) -> None:
            try:
                self.auth.check(authorization, count=count, peer=peer_of(context.peer()))
            except StagemeshError as exc:
                await abort(context, exc)

        return guarded(handler, check)


def peer_of(grpc_peer: str) -> str:
    """`ipv4:10.0.0.1:5555` -> `10.0.0.1`, `ipv6:[::1]:5555` -> `::1`: a client's every connection
    is one peer, and the same one that the HTTP API sees (its ASGI `client` address)."""
    peer = urllib.parse.unquote(grpc_peer)
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer[5:].rpartition(":")[0].strip("[]")
    return peer


async def abort(context, exc: StagemeshError) -> None:
    """Abort with `exc`'s status; a retry delay also goes into the status details (RetryInfo)."""
    delay = getattr(exc, "retry_after_s", None)
    code = status_code(exc)
    trailing = () if delay is None else retry_info_metadata(code, str(exc), delay)
    await context.abort(code, str(exc), trailing_metadata=trailing)


def retry_info_metadata(code: grpc.StatusCode, message: str, delay_s: float) -> tuple:
    """`grpc-status-details-bin`: a google.rpc.Status carrying google.rpc.RetryInfo (what
    grpcio-status's `rpc_status.from_call` reads; gRPC clients in every language understand it)."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(max(1, int(delay_s * 1e9)))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[detail])
    return (("grpc-status-details-bin", status.SerializeToString()),)


# -- HTTP (pure ASGI: leaves streaming responses and disconnect detection untouched) ---------------
class ApiKeyMiddleware:
    def __init__(self, app, auth: ApiKeyAuth):
        self.app, self.auth = app, auth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        client = scope.get("client")
        try:
            self.auth.check(authorization, count=scope.get("method") == "POST", peer=client[0] if client else "")
        except StagemeshError as exc:
            return await _send_error(send, exc)
        return await self.app(scope, receive, send)


async def _send_error(send, exc: StagemeshError) -> None:
    if isinstance(exc, Throttled):
        status, type_, code = 429, "rate_limit_error", "too_many_failed_authentications"
        extra = [(b"retry-after", str(max(1, math.ceil(exc.retry_after_s))).encode())]
    elif isinstance(exc, Unauthenticated):
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
