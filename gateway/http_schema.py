"""The HTTP API's bodies as pydantic models, and the OpenAPI document served at /openapi.json.

The models say what the endpoints really take: strict JSON types (a string is not a number), and
the ranges of gateway/validation.py written into the schema (`minimum`, `maximum`, ...) but not
enforced here: validation.py checks every number once, for both APIs, with messages that name the
field. Fields we refuse unless they are off (`suffix`) are described with the one value we take.
Unknown fields are accepted and ignored (OpenAI clients send e.g. `user`).

Errors are 400 (never FastAPI's 422) in OpenAI's shape; `openapi()` documents that.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from stagemesh.sampling import MAX_LOGPROBS

from gateway.validation import (DEFAULT_MAX_STOP_STRINGS, FLOAT32_MAX, INT32_MAX, MAX_LOGIT_BIAS, MAX_N,
                                MAX_PROMPTS, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS, UINT64_MAX)


def _range(lo=None, hi=None, description: str = "", **extra) -> Any:
    """A field documented with its valid range (checked in validation.py, not by pydantic)."""
    schema = {k: v for k, v in (("minimum", lo), ("maximum", hi)) if v is not None}
    return Field(None, description=description or None, json_schema_extra={**schema, **extra})


class CommonParams(BaseModel):
    """Fields common to both endpoints."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field("", description="the served model's id; empty: the served model")
    max_tokens: int | None = _range(1, INT32_MAX, "tokens to generate; prompt + max_tokens must fit the context")
    temperature: float | None = _range(0, FLOAT32_MAX, "0 = greedy; default 1")
    top_p: float | None = _range(None, 1, "nucleus mass in (0, 1]", exclusiveMinimum=0)
    top_k: int | None = _range(-1, INT32_MAX, "keep the k most likely tokens; 0 or -1 = no limit")
    seed: int | None = _range(0, UINT64_MAX, "reproducible sampling")
    stop: Union[str, list[str], None] = Field(
        None, description=f"stop strings (not included in the output); at most {DEFAULT_MAX_STOP_STRINGS}, none empty",
        json_schema_extra={"anyOf": [{"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
                                     {"type": "array", "maxItems": DEFAULT_MAX_STOP_STRINGS,
                                      "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}},
                                     {"type": "null"}]})
    n: int | None = _range(1, MAX_N, "choices per prompt (samples sharing the prompt's KV blocks)")
    stream: bool | None = False
    stream_options: dict | None = Field(None, description="{'include_usage': true} adds a usage chunk")
    ignore_eos: bool = False
    presence_penalty: float | None = _range(-2, 2, "subtracted from the logits of tokens the output contains")
    frequency_penalty: float | None = _range(-2, 2, "subtracted once per occurrence in the output")
    logit_bias: dict | None = Field(None, description="token id (as a string) -> bias added to its logit",
                                    json_schema_extra={"maxProperties": MAX_LOGIT_BIAS,
                                                       "additionalProperties": {"type": "number", "minimum": -100,
                                                                                "maximum": 100}})
    # vLLM's extras
    guided_json: Union[str, dict[str, Any], None] = Field(
        None, description="structured output: a JSON schema the answer conforms to (gateway/structured_output.py)")
    guided_regex: str | None = Field(None, description="structured output: a regex the whole answer matches")
    guided_choice: list[str] | None = Field(None, description="structured output: the answer is one of these",
                                            json_schema_extra={"minItems": 1})
    guided_grammar: str | None = Field(None, description="structured output: a Lark or GBNF grammar")
    structured_outputs: dict[str, Any] | None = Field(
        None, description="vLLM's newer spelling: one of {json, regex, choice, grammar, json_object}")
    min_p: float | None = _range(0, 1, "keep tokens at least min_p times as likely as the most likely one")
    repetition_penalty: float | None = _range(None, 100, "divides (or multiplies, when negative) the logits of "
                                                         "tokens seen in prompt or output; 1 = off",
                                              exclusiveMinimum=0)
    min_tokens: int | None = _range(0, INT32_MAX, "no stop token or stop string before this many tokens "
                                                  "(at most max_tokens)")
    stop_token_ids: list[int] | None = Field(None, description="token ids that end the generation",
                                             json_schema_extra={"maxItems": MAX_STOP_TOKEN_IDS,
                                                                "items": {"type": "integer", "minimum": 0,
                                                                          "maximum": INT32_MAX}})


_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": INT32_MAX}}


class CompletionRequest(CommonParams):
    prompt: Union[str, list[int], list[str], list[list[int]]] = Field(
        description="text, or token ids (each below the model's vocabulary size); or a list of several of either",
        json_schema_extra={"anyOf": [{"type": "string", "minLength": 1}, _TOKEN_IDS,
                                     {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS,
                                      "items": {"type": "string", "minLength": 1}},
                                     {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS, "items": _TOKEN_IDS}]})
    best_of: int | None = _range(1, MAX_N, "samples drawn per prompt, the n most likely returned (>= n; "
                                           "not with stream unless equal to n)")
    echo: bool | None = Field(None, description="the prompt before the completion (with logprobs: its logprobs too)")
    logprobs: int | None = _range(0, MAX_LOGPROBS, "log-probabilities of the chosen tokens and of this many "
                                                   "most likely ones at each position")
    suffix: str | None = Field(None, description="not supported: empty or absent", json_schema_extra={"maxLength": 0})


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: Union[str, list[dict[str, Any]], None] = Field(
        None, description="text, or a list of {'type': 'text', 'text': ...} parts")


class ChatCompletionRequest(CommonParams):
    messages: list[ChatMessage] = Field(json_schema_extra={"minItems": 1})
    max_completion_tokens: int | None = _range(1, INT32_MAX, "as max_tokens; default: what fits the context")
    logprobs: bool | None = Field(None, description="log-probabilities of the chosen tokens")
    top_logprobs: int | None = _range(0, MAX_LOGPROBS, "with logprobs: this many most likely tokens at each position")
    tools: list[dict[str, Any]] | None = Field(
        None, description="functions the model may call: {'type': 'function', 'function': {'name', 'description', "
                          "'parameters' (a JSON schema)}} (gateway/tool_calls.py)")
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = Field(
        None, description="none, auto (default with tools: the template's tool-call format is parsed), required "
                          "(constrained to the tools' schemas), or {'type': 'function', 'function': {'name': ...}}")
    parallel_tool_calls: bool | None = Field(None, description="false: tool_choice required calls one tool")
    response_format: dict[str, Any] | None = Field(
        None, description="{'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', 'json_schema': "
                          "{'name', 'schema', 'strict'}}: the answer is constrained to it")
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="extra variables for the chat template")


# --- answers (documentation; the handlers build plain dicts) ----------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class CachedTokens(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: CachedTokens


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length"]


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["serving", "not_serving"]


def _error(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


ERRORS = {
    400: _error("invalid request: the message says what to change, `param` names the field"),
    401: _error("missing or unknown API key (when the gateway has keys)"),
    404: _error("no such model"),
    413: _error("the request body or the prompt text is over the gateway's limit"),
    429: _error("rate limit or a full queue; retry later"),
    503: _error("no ready pipeline, or the request failed in the pipeline"),
}


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length", None]


class CompletionChunk(BaseModel):
    """One event of a streamed completion; with include_usage, a last one with no choices."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ToolCallFunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None  # a piece of the JSON text


class ToolCallDelta(BaseModel):
    """A piece of a tool call: the first carries id, type and name; then pieces of its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ToolCallFunctionDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length", "tool_calls", None]


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


STREAM_CHUNKS = {CompletionResponse: CompletionChunk, ChatCompletionResponse: ChatCompletionChunk}


def _sse(chunk: type[BaseModel]) -> dict:
    """Each server-sent event: `data` is a chunk as JSON, an error object (a failure after the
    stream started), or `[DONE]` last (Open API < 3.2: `schema` describes one event)."""
    json_data = {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"anyOf": [{"$ref": f"#/components/schemas/{chunk.__name__}"},
                                             {"$ref": "#/components/schemas/ErrorResponse"}]}}
    return {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}, "event": {"type": "string"},
                       "id": {"type": "string"}, "retry": {"type": "integer"}}}}}


def generation_responses(model: type[BaseModel]) -> dict:
    """200 as JSON (`stream` false) or server-sent events (`stream` true), and the errors."""
    return {200: {"model": model, "content": _sse(STREAM_CHUNKS[model]), "description": "the completion, or its stream"},
            **ERRORS}


def openapi(app) -> dict:
    """FastAPI's document without the 422 it adds for bodies: ours are 400s, documented above."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        _, defs = models_json_schema([(m, "serialization") for m in STREAM_CHUNKS.values()],
                                     ref_template="#/components/schemas/{model}")
        components.update(defs["$defs"])  # the chunks the event stream schemas refer to
        app.openapi_schema = schema
    return app.openapi_schema
