"""ASGI layers in front of the HTTP API: a body size limit, and the paths open without an API key.

Both are pure ASGI (no BaseHTTPMiddleware), so streaming responses and the disconnect detection of
gateway/http_api.py pass through untouched. Everything runs on the gateway's event loop.
"""

from __future__ import annotations

import json

from gateway.auth import ApiKeyMiddleware

# As in vLLM's AuthenticationMiddleware, only the /v1 API needs the key (and spends the rate limit):
# probes, Prometheus scrapes, the version and the tokenizer endpoints stay open. vLLM opens every
# path that does not start with /v1; these are this app's such routes, matched exactly, so a path
# that routes nowhere (or `/health/../v1/...`) is refused like /v1 rather than opened.
PUBLIC_PATHS = frozenset({"/health", "/openapi.json", "/version", "/metrics", "/tokenize", "/detokenize"})


def error_response(status: int, message: str, type_: str, code: str, headers=()) -> tuple[dict, dict]:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *headers]}
    return start, {"type": "http.response.body", "body": body}


class BodyLimit:
    """Refuses a body over `limit` bytes with 413 before the app reads any of it.

    A declared Content-Length over the limit is refused at once, unread, and the connection
    closed (a client that waits for `Expect: 100-continue` sends nothing). A chunked body is read
    here up to the limit and handed on whole, as the app would buffer it anyway.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        length = headers.get(b"content-length")
        if length is not None:
            if int(length) > self.limit:  # h11 has checked it is a number
                return await self._refuse(send)
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(send)
            if not message.get("more_body"):
                break
        return await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, send) -> None:
        start, body = error_response(
            413, f"the request body is over this gateway's limit of {self.limit} bytes (set by --max-prompt-bytes)",
            "invalid_request_error", "request_too_large", headers=[(b"connection", b"close")])
        await send(start)
        await send(body)


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then the real channel: a disconnect must still be seen

    return replayed


class PublicPaths:
    """API keys and rate limits (gateway/auth.py) on every path but PUBLIC_PATHS; CORS preflights
    (OPTIONS) pass too, as in vLLM (a browser sends them without credentials)."""

    def __init__(self, app, auth):
        self.app, self.guarded = app, ApiKeyMiddleware(app, auth=auth)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope.get("path") in PUBLIC_PATHS or scope.get("method") == "OPTIONS"):
            return await self.app(scope, receive, send)
        return await self.guarded(scope, receive, send)
