"""HTTP errors in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`, and the one
mapping from the gateway's typed errors (stagemesh.errors) to HTTP statuses.

Shared by the OpenAI API (gateway/http_api.py) and the utility endpoints (gateway/http_utility.py);
neither imports the other for them. Imports neither torch nor grpc (pyproject.toml's pure core).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from stagemesh.errors import ErrorKind, StagemeshError

from gateway import validation


class ApiError(Exception):
    """An error answered in OpenAI's shape; `status` is the HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# The one mapping from the gateway's typed errors to HTTP.
_STATUS = {
    ErrorKind.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_argument"),
    ErrorKind.OUT_OF_RANGE: (400, "invalid_request_error", "context_length_exceeded"),
    ErrorKind.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    ErrorKind.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "queue_full"),
    ErrorKind.UNAVAILABLE: (503, "server_error", "unavailable"),
    ErrorKind.FAILED_PRECONDITION: (503, "server_error", "unavailable"),
}


def api_error(exc: StagemeshError) -> ApiError:
    if isinstance(exc, validation.PromptTooLarge):
        return ApiError(413, str(exc), param="prompt", code="request_too_large")
    status, type_, code = _STATUS.get(exc.kind, (500, "server_error", "internal_error"))
    return ApiError(status, str(exc), type_, param=getattr(exc, "field", None), code=code)


def field_path(loc) -> str:
    """A field's path as errors spell it everywhere: `messages[0].role`, `tools[1].function.name`
    (pydantic's loc ("body", "messages", 0, "role") would join as `messages.0.role`)."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "body":
            path += f".{part}" if path else str(part)
    return path


def flatten_message(message: dict, index: int) -> dict:
    """Content parts -> one string, as most templates expect (vLLM's "string" content format)."""
    if not isinstance(message.get("role"), str):
        raise ApiError(400, f"messages[{index}] has no role", param=f"messages[{index}].role")
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(400, f"messages[{index}]: content parts of type {kind!r} are not supported "
                                    "(text only)", param=f"messages[{index}].content")
            texts.append(str(part.get("text", "")))
        message = {**message, "content": "\n".join(texts)}
    return message
