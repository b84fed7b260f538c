"""The HTTP port's utility endpoints, as vLLM's OpenAI server has them:

    GET  /version       {"version": "<stagemesh version>"}
    POST /tokenize      {"prompt": text} or {"messages": [...]} -> {"count", "max_model_len", "tokens"}
    POST /detokenize    {"tokens": [ids]} -> {"prompt": text}
    GET  /metrics       the gateway's Prometheus metrics (the same as on --metrics-port)

They take the API key like /v1 (only /health and /openapi.json are open: gateway/http_guard.py).
Everything runs on the gateway's event loop.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any, Union

from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from stagemesh.errors import StagemeshError

from gateway import validation
from gateway.http_errors import ApiError, flatten_message
from gateway.http_schema import ERRORS, ChatMessage


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = ""
    prompt: Union[str, None] = Field(None, description="text to tokenize (or messages)")
    messages: Union[list[ChatMessage], None] = Field(None, description="a chat, rendered with the chat template")
    add_special_tokens: bool = Field(True, description="text prompts: add BOS etc. as the tokenizer does")
    add_generation_prompt: bool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = ""
    tokens: list[int] = Field(json_schema_extra={"items": {"type": "integer", "minimum": 0}})


class DetokenizeResponse(BaseModel):
    prompt: str


class Version(BaseModel):
    version: str


def _version() -> str:
    try:
        return metadata.version("stagemesh")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def add_utility_routes(app, front) -> None:
    """Register the endpoints above on `app` for an OpenAIFrontend (its gateway and template)."""
    gw = front.gw

    def tokenizer():
        if gw.tokenizer is None:
            raise ApiError(400, "this checkpoint ships no tokenizer.json", param="tokenizer")
        return gw.tokenizer

    @app.get("/version", response_model=Version)
    async def version() -> dict[str, Any]:
        return {"version": _version()}

    errors = {code: ERRORS[code] for code in (400, 404, 413, 503)}  # no key needed (gateway/http_guard.py)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=errors)
    async def tokenize(body: TokenizeRequest):
        front.check_model(body.model)
        tokenizer()
        limits = front._limits()
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "send either prompt or messages", param="prompt")
        if body.messages is not None:
            if front.template is None:
                raise ApiError(400, "this model has no chat template", param="messages")
            messages = [flatten_message(m.model_dump(exclude_unset=True), i) for i, m in enumerate(body.messages)]
            try:
                text = front.template.render(messages, add_generation_prompt=body.add_generation_prompt)
            except StagemeshError as exc:
                raise ApiError(400, str(exc), param="messages") from exc
            special = False
        else:
            text, special = body.prompt, body.add_special_tokens
        validation.check_prompt_bytes(text, limits)
        ids = await gw.tokenize(text, limits.max_model_len, add_special_tokens=special)
        return {"count": len(ids), "max_model_len": limits.max_model_len, "tokens": ids}

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=errors)
    async def detokenize(body: DetokenizeRequest):
        front.check_model(body.model)
        limits = front._limits()
        bad = [t for t in body.tokens if not 0 <= t < limits.vocab_size]
        if bad:
            raise ApiError(400, f"tokens: {bad[0]} is outside the vocabulary [0, {limits.vocab_size})", param="tokens")
        return {"prompt": tokenizer().decode(body.tokens, skip_special_tokens=False)}

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics():
        """The gateway's Prometheus metrics, text format."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
