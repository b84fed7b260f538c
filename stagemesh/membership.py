"""Who may call the internal services: mesh members only.

The Stage, Coordinator and CacheIndex services take orders that only the mesh's own processes
should give (run a micro-batch, drop a lease's KV, declare a worker dead, register a worker that
will then receive hidden states). A caller proves membership in one of two ways:

- **mutual TLS** (`--tls-*` given): by its certificate's role, the URI SAN `MEMBER_URI`, which
  `stagemesh certs` writes into server.pem (the certificate every mesh process presents, on its
  port and on its links) and not into the user's client.pem. The TLS handshake already proved
  the CA signed it; the role says what the holder is. A deployment with its own PKI puts
  `MEMBER_URI` into its members' certificates.
- **the cluster token** (plaintext ports): a shared secret that `stagemesh up` generates and hands
  to its children in the environment (`TOKEN_ENV`, or a 0600 file named by `TOKEN_FILE_ENV`).
  Every channel built by `stagemesh.security` sends it as `TOKEN_HEADER` metadata; every internal
  server compares it in constant time.

Without TLS and without a token a service runs in *trusted-network mode*, as before: anyone who
can reach the port may call it (services started by hand on loopback, the tests' component
meshes). `stagemesh up` always has a token, so a mesh it starts is never in that mode.

Health and reflection stay open (Consul and compose healthchecks call health), and so do the
read-only `OPEN_METHODS` (`Stage.Stats`, `Coordinator.GetPlan`): they change nothing, and
`stagemesh status` and dashboards read them. Everything else on the guarded services is refused:
UNAUTHENTICATED without a credential, PERMISSION_DENIED with a wrong one.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import sys
from pathlib import Path

import grpc

TOKEN_HEADER = "x-stagemesh-cluster-token"
MEMBER_URI = "spiffe://stagemesh/member"

# Secrets reach a process through its environment (readable by its own user only: /proc/PID/environ
# is 0400), never its command line (/proc/PID/cmdline, `ps`: readable by every local user).
TOKEN_ENV = "STAGEMESH_CLUSTER_TOKEN"
TOKEN_FILE_ENV = "STAGEMESH_CLUSTER_TOKEN_FILE"
API_KEYS_ENV = "STAGEMESH_API_KEYS"  # the gateway's API keys, whitespace-separated
REDIS_URL_ENV = "STAGEMESH_REDIS_URL"  # cache_service's Redis URL (it may carry a password)

GUARDED_SERVICES = ("/stagemesh.v1.Stage/", "/stagemesh.v1.Coordinator/", "/stagemesh.v1.CacheIndex/")
OPEN_METHODS = frozenset({"/stagemesh.v1.Stage/Stats", "/stagemesh.v1.Coordinator/GetPlan"})


def new_token() -> str:
    """A fresh cluster token: 256 random bits, URL-safe (it travels as gRPC metadata)."""
    return secrets.token_urlsafe(32)


def cluster_token(environ=None) -> str:
    """This process's cluster token, handed down by `stagemesh up` (or set by hand); "" if none.

    Read when a channel or a server is built (never at import): `TOKEN_ENV`, else the file that
    `TOKEN_FILE_ENV` names (a Docker/Kubernetes secret mount).
    """
    env = os.environ if environ is None else environ
    token = env.get(TOKEN_ENV, "").strip()
    if token:
        return token
    path = env.get(TOKEN_FILE_ENV, "")
    if not path:
        return ""
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"{TOKEN_FILE_ENV}={path}: {exc.strerror}") from exc


def redact_url(url: str) -> str:
    """`redis://:PASSWORD@host:6379/0` -> `redis://:***@host:6379/0`, for log lines."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user, colon, _password = userinfo.partition(":")
    return f"{scheme}://{user}{colon}{'***' if colon else ''}@{host}"


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((TOKEN_HEADER, token),) if token else ()


def is_guarded(method: str) -> bool:
    return method.startswith(GUARDED_SERVICES) and method not in OPEN_METHODS


# -- server side ------------------------------------------------------------------------------------
def check_token(expected: str, metadata) -> None:
    """Raises _Refused unless `metadata` carries `expected` (compared in constant time)."""
    sent = ""
    for key, value in metadata or ():
        if key == TOKEN_HEADER:
            sent = value if isinstance(value, str) else value.decode("latin-1")
            break
    if not sent:
        raise _Refused(grpc.StatusCode.UNAUTHENTICATED,
                       f"internal service: only mesh members may call it; send the cluster token as "
                       f"`{TOKEN_HEADER}` metadata (stagemesh up hands it to its processes in ${TOKEN_ENV})")
    if not hmac.compare_digest(sent.encode(), expected.encode()):
        raise _Refused(grpc.StatusCode.PERMISSION_DENIED, "internal service: wrong cluster token")


def check_member_cert(auth_context: dict) -> None:
    """Raises _Refused unless the TLS peer's certificate carries the member role (URI SAN)."""
    if MEMBER_URI.encode() in auth_context.get("peer_uri", ()):
        return
    if not auth_context.get("x509_pem_cert"):
        raise _Refused(grpc.StatusCode.UNAUTHENTICATED,
                       "internal service: only mesh members may call it; present a member certificate")
    raise _Refused(grpc.StatusCode.PERMISSION_DENIED,
                   f"internal service: this certificate is not a mesh member's (no URI SAN {MEMBER_URI}); "
                   f"a client certificate opens the gateway's public API only")


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class MemberInterceptor(grpc.aio.ServerInterceptor):
    """Refuses non-members on the guarded methods; everything else passes untouched.

    With `tls` the check needs the peer's certificate, which only the call's context has: the
    guarded handlers are wrapped to check it first. With a token the metadata suffices, so the
    check runs here and the handler is passed on as it is (no cost per message on Forward).
    """

    def __init__(self, token: str = "", tls: bool = False):
        if not token and not tls:
            raise ValueError("MemberInterceptor needs a cluster token or TLS")
        self.token, self.tls = token, tls

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not is_guarded(details.method):
            return handler
        if self.tls:
            return guarded(handler, _check_cert)
        try:
            check_token(self.token, details.invocation_metadata)
        except _Refused as exc:
            return guarded(handler, _refuse_with(exc))
        return handler


async def _check_cert(context) -> None:
    check_member_cert(context.auth_context())


def _refuse_with(exc: _Refused):
    async def refuse(_context) -> None:
        raise exc
    return refuse


def guarded(handler, check):
    """The same handler, `check(context)` first; a refusal (`_Refused`, or `check` aborting the call
    itself) ends the call with its status. Serves the member check here and the gateway's API keys."""
    async def guard(context) -> None:
        try:
            await check(context)
        except _Refused as exc:
            await context.abort(exc.code, str(exc))

    if handler.unary_unary:
        async def unary_unary(request, context):
            await guard(context)
            return await handler.unary_unary(request, context)
        return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer,
                                                   handler.response_serializer)
    if handler.unary_stream:
        async def unary_stream(request, context):
            await guard(context)
            async for item in handler.unary_stream(request, context):
                yield item
        return grpc.unary_stream_rpc_method_handler(unary_stream, handler.request_deserializer,
                                                    handler.response_serializer)
    if handler.stream_unary:
        async def stream_unary(requests, context):
            await guard(context)
            return await handler.stream_unary(requests, context)
        return grpc.stream_unary_rpc_method_handler(stream_unary, handler.request_deserializer,
                                                    handler.response_serializer)

    async def stream_stream(requests, context):
        await guard(context)
        async for item in handler.stream_stream(requests, context):
            yield item
    return grpc.stream_stream_rpc_method_handler(stream_stream, handler.request_deserializer,
                                                 handler.response_serializer)


def server_interceptors(host: str, tls, service: str) -> list:
    """The interceptors of an internal service bound on `host` (`tls`: its TlsConfig or None).

    Trusted-network mode (no TLS, no token) adds none, and warns on stderr when the port is
    not on loopback: anyone who reaches it then controls the service. (A token without TLS on a
    network is a deliberate choice; `stagemesh up --host` warns about that one.)
    """
    token = cluster_token()
    if tls is None and not token:
        if not is_loopback(host):
            print(f"{service}: warning: internal port on {host} without TLS or a cluster token: anyone who "
                  f"reaches it controls this {service} (give --tls-* or set ${TOKEN_ENV})", file=sys.stderr,
                  flush=True)
        return []
    return [MemberInterceptor(token=token, tls=tls is not None)]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: assume it resolves beyond this host


# -- client side ------------------------------------------------------------------------------------
class _TokenCall:
    """Adds the token to the call's metadata (one client interceptor for the four call shapes)."""

    def __init__(self, token: str):
        self.metadata = token_metadata(token)

    def _details(self, details):
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self.metadata)
        return details._replace(metadata=metadata)


class TokenUnaryUnary(_TokenCall, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class TokenUnaryStream(_TokenCall, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


def client_interceptors(token: str | None = None) -> list:
    """aio client interceptors that send the cluster token (none when the process has none)."""
    token = cluster_token() if token is None else token
    return [TokenUnaryUnary(token), TokenUnaryStream(token)] if token else []


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self.metadata = token_metadata(token)

    def _details(self, details):
        return _SyncDetails(details.method, details.timeout, [*(details.metadata or ()), *self.metadata],
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def intercept_sync(channel: grpc.Channel, token: str | None = None) -> grpc.Channel:
    """A blocking channel that sends the cluster token (unchanged when the process has none)."""
    token = cluster_token() if token is None else token
    return grpc.intercept_channel(channel, _SyncToken(token)) if token else channel
