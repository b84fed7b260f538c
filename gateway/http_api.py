"""OpenAI-compatible HTTP API, served by the gateway process beside gRPC.

    GET  /v1/models             the served model
    POST /v1/completions        prompt: text or token ids -> text
    POST /v1/chat/completions   messages -> the checkpoint's chat template -> text
    GET  /health                200 when the gateway can serve, else 503 (no API key needed)
    GET  /version, POST /tokenize, POST /detokenize, GET /metrics   as vLLM's server (http_utility.py)
    GET  /openapi.json          this API's OpenAPI document (bodies: gateway/http_schema.py)

Each request becomes one `GenerateRequest` and goes through `Gateway.generate`, the same path as
the gRPC API, so validation, queueing, prefix caching and cancellation are shared. We await the
first delta before answering: input errors and a full queue then get a real HTTP status (400,
404, 413, 429, 503) in OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`
(gateway/http_errors.py), even for `stream: true`. Streams are server-sent events in OpenAI's chunk format, ending with
`data: [DONE]`; a failure after the stream has started is sent as one `data: {"error": ...}`
event. A client that disconnects cancels its sequence (its KV blocks are freed). A body over the
limit that --max-prompt-bytes implies is a 413 before any of it is read (gateway/http_guard.py);
every number is range-checked by gateway/validation.py before it becomes a GenerateRequest.

`n`, `best_of`, several prompts, `logprobs` / `top_logprobs`, `echo`, penalties, `logit_bias` and
vLLM's sampling extras are mapped, and the answers built, in gateway/openai_compat.py; structured
output (`response_format`, `guided_*`, `structured_outputs`) in gateway/structured_output.py, `tools`
and `tool_choice` in gateway/tool_calls.py.

Differences from OpenAI, all deliberate:
  - `suffix` is refused with a 400 rather than silently ignored.
  - extensions (as in vLLM): `top_k` (0 or -1 = no limit), `min_p`, `repetition_penalty`,
    `min_tokens`, `stop_token_ids`, `ignore_eos`, `add_generation_prompt` and
    `chat_template_kwargs` for chat.
  - `temperature` defaults to 1.0 (OpenAI's default); `max_tokens` defaults to 16 for completions
    (OpenAI's default) and, for chat, to whatever fits in the context and the KV cache.
  - chat without a template in the checkpoint is a 400 naming the missing file (see chat_template.py).

Everything here runs on the gateway's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from stagemesh.client import build_request
from stagemesh.errors import StagemeshError, Unavailable

from gateway import structured_output, tool_calls, validation
from gateway.chat_template import ChatTemplate
from gateway.http_errors import ApiError, api_error, field_path, flatten_message
from gateway.http_guard import BodyLimit, PublicPaths
from gateway.http_utility import add_utility_routes
from gateway.openai_compat import Job, Refused, Shape, TokenText, apply_extra_fields, collect, extra_fields
from gateway.http_schema import (ERRORS, ChatCompletionRequest, ChatCompletionResponse, CommonParams,
                                 CompletionRequest, CompletionResponse, Health, ModelCard, ModelList,
                                 generation_responses, openapi)

# --- request bodies (gateway/http_schema.py) ------------------------------------------------------


# Fields OpenAI's or vLLM's server takes that would change the answer here but are not implemented:
# a 400 naming the field when one is set to anything but its no-op value (None, or the value that
# is what this server does anyway), rather than a 200 that silently ignores it. Unknown fields stay
# accepted (clients send their own extras: `user`, `metadata`, ...).
_NO_EFFECT_VALUES: dict[str, tuple] = {
    "use_beam_search": (False,), "length_penalty": (1, 1.0), "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,), "prompt_logprobs": (),
    "truncate_prompt_tokens": (), "allowed_token_ids": (), "bad_words": ([],), "guided_whitespace_pattern": (),
    "guided_decoding_backend": ("auto", "llguidance"), "return_tokens_as_token_ids": (False,),
    "logits_processors": (), "functions": (), "function_call": (), "prompt_embeds": (),
}
_CHAT_NO_EFFECT_VALUES = {"echo": (False,), "best_of": (1,), "continue_final_message": (False,)}


def _refuse_unsupported(req: CommonParams, kind: str) -> None:
    if getattr(req, "suffix", None):
        raise ApiError(400, "suffix is not supported", param="suffix")
    set_fields = req.model_dump(exclude_unset=True)  # extras included (extra="allow")
    table = {**_NO_EFFECT_VALUES, **(_CHAT_NO_EFFECT_VALUES if kind == "chat" else {})}
    for name, no_op in table.items():
        if name in set_fields and set_fields[name] is not None and set_fields[name] not in no_op:
            where = " on chat completions" if name in _CHAT_NO_EFFECT_VALUES else ""
            raise ApiError(400, f"{name} is not supported{where} (it would be ignored)", param=name)


# --- the app -----------------------------------------------------------------------------------


class OpenAIFrontend:
    """Turns OpenAI requests into GenerateRequests for one Gateway. Event loop only."""

    def __init__(self, gateway, chat_template: ChatTemplate | None):
        self.gw = gateway
        self.template = chat_template
        self.tokens = TokenText(gateway.tokenizer)  # logprobs' token strings

    # /v1/models
    def models(self) -> dict:
        gw = self.gw
        return {"object": "list", "data": [{
            "id": gw.model_id, "object": "model", "created": 0, "owned_by": "stagemesh",
            "max_model_len": gw.max_model_len,
        }]}

    # /v1/completions
    def completion_request(self, req: CompletionRequest) -> list[Job]:
        """One Job per prompt (text, token ids, or a list of either)."""
        self.check(req, "text")
        prompts = req.prompt
        if not isinstance(prompts, list) or not prompts or isinstance(prompts[0], int):
            prompts = [prompts]
        if len(prompts) > validation.MAX_PROMPTS:
            raise ApiError(400, f"at most {validation.MAX_PROMPTS} prompts in one request, got {len(prompts)}",
                           param="prompt")
        grammar, _ = structured_output.from_request(req.model_dump(exclude_unset=True))  # guided_* (vLLM)
        jobs = []
        for prompt in prompts:
            if isinstance(prompt, str):
                jobs.append(Job(self._build(req, prompt=prompt, max_tokens=req.max_tokens, grammar=grammar), prompt))
            else:
                jobs.append(Job(self._build(req, prompt_ids=list(prompt), max_tokens=req.max_tokens,
                                            grammar=grammar)))
        validation.check_sequences(len(jobs), jobs[0].request.n if jobs[0].request.HasField("n") else 1)
        return jobs

    # /v1/chat/completions
    async def chat_request(self, req: ChatCompletionRequest):
        self.check(req, "chat")
        if self.template is None:
            raise ApiError(400, f"model {self.gw.model_id!r} has no chat template (no `chat_template` in "
                                "tokenizer_config.json, no chat_template.jinja): use /v1/completions with a "
                                "formatted prompt", param="messages", code="no_chat_template")
        if self.gw.tokenizer is None:
            raise ApiError(400, "this checkpoint ships no tokenizer.json: chat needs one", param="messages")
        if not req.messages:
            raise ApiError(400, "messages must not be empty", param="messages")
        limits = self._limits()
        messages = [flatten_message(m.model_dump(exclude_unset=True), i) for i, m in enumerate(req.messages)]
        # response_format / guided_* / tools (structured output and tool calls: gateway/tool_calls.py)
        grammar, tools = tool_calls.chat_constraints(req.model_dump(exclude_unset=True), self.template.source)
        try:
            text = self.template.render(tool_calls.template_messages(messages), tools=tools.template_tools,
                                        add_generation_prompt=req.add_generation_prompt,
                                        kwargs=req.chat_template_kwargs)
        except StagemeshError as exc:
            raise ApiError(400, str(exc), param="messages") from exc
        validation.check_prompt_bytes(text, limits)
        # The template wrote the special tokens itself (as transformers' apply_chat_template).
        prompt_ids = await self.gw.tokenize(text, limits.max_model_len, add_special_tokens=False)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = self._room_left(len(prompt_ids))
        return [Job(self._build(req, prompt_ids=prompt_ids, max_tokens=max_tokens, kind="chat", grammar=grammar),
                    tools=tools)]

    def _limits(self) -> validation.ModelLimits:
        if self.gw.limits is None:
            raise Unavailable("the gateway has no ready plan yet; retry shortly")
        return self.gw.limits

    def _room_left(self, prompt_len: int) -> int | None:
        """Chat default: as many tokens as fit (None -> the gateway's default, or its error)."""
        limits = self._limits()
        room = min(limits.max_model_len, limits.kv_capacity_tokens) - prompt_len
        return room if room >= 1 else None

    def _build(self, req: CommonParams, prompt: str | None = None, prompt_ids: list[int] | None = None,
               max_tokens: int | None = None, kind: str = "text", grammar=None):
        if isinstance(prompt_ids, list) and not prompt_ids and prompt is None:
            raise ApiError(400, "the prompt is empty", param="prompt")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        top_k = req.top_k or 0
        if top_k == -1:  # vLLM's spelling of "no limit"
            top_k = 0
        temperature = 1.0 if req.temperature is None else req.temperature
        # JSON numbers are unbounded: range-check them before protobuf sees them (it would raise).
        limits = self._limits()
        try:
            fields = validation.Fields(max_tokens=max_tokens, temperature=temperature, top_p=req.top_p, top_k=top_k,
                                       seed=req.seed, stop=tuple(stop), grammar=grammar, **extra_fields(req, kind))
        except Refused as exc:
            raise ApiError(400, str(exc), param=exc.param) from exc
        validation.check_fields(fields, limits)
        if prompt_ids is not None:
            validation.check_prompt_ids(prompt_ids, limits)
        grpc_request = build_request(prompt=prompt, prompt_ids=prompt_ids, max_tokens=max_tokens,
                                     temperature=temperature, top_p=req.top_p, top_k=top_k, seed=req.seed, stop=stop,
                                     ignore_eos=req.ignore_eos, model=self.gw.model_id)
        apply_extra_fields(grpc_request, fields)
        structured_output.attach(grpc_request, grammar)
        return grpc_request

    def check(self, req: CommonParams, kind: str) -> None:
        self.check_model(req.model)
        _refuse_unsupported(req, kind)

    def check_model(self, model: str) -> None:
        if model and model != self.gw.model_id:
            raise ApiError(404, f"the model {model!r} does not exist: this server serves {self.gw.model_id!r}",
                           param="model", code="model_not_found")

    async def start(self, jobs: list[Job]):
        """Submit every job and wait for the first delta of each, so that errors surface before any
        response: [(deltas, first delta)] in job order."""
        gens = [self.gw.generate(job.request) for job in jobs]
        firsts = await asyncio.gather(*(g.__anext__() for g in gens), return_exceptions=True)
        failed = next((f for f in firsts if isinstance(f, BaseException)), None)
        if failed is not None:
            for g in gens:
                await g.aclose()
            if isinstance(failed, StagemeshError):
                raise api_error(failed) from failed
            raise failed
        return list(zip(gens, firsts))


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, coro):
    """Run coro; cancel it (and so the sequence) if the client goes away first. None then."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    return None if work.cancelled() else work.result()


def create_app(gateway, chat_template: ChatTemplate | None = None) -> FastAPI:
    """The ASGI app for one Gateway. The chat template defaults to the checkpoint's."""
    front = OpenAIFrontend(gateway, chat_template or ChatTemplate.from_dir(gateway.config.model_dir))
    app = FastAPI(title="stagemesh", version="1", description=__doc__, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.openapi = lambda: openapi(app)
    app.add_middleware(BodyLimit, limit=validation.http_body_limit(gateway.config.max_prompt_bytes,
                                                                   gateway.model.max_position_embeddings))
    if getattr(gateway, "auth", None) is not None:  # API keys (401) and per-key rate limit (429)
        app.add_middleware(PublicPaths, auth=gateway.auth)

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StagemeshError)
    async def _stagemesh_error(_request, exc: StagemeshError):
        return api_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(_request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        path = field_path(err.get("loc", ()))
        message = f"{path or 'body'}: {err.get('msg', 'invalid request body')}"
        return ApiError(400, message, param=path or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        # 405 keeps Starlette's `Allow` header (RFC 9110 requires it).
        return ApiError(exc.status_code, str(exc.detail), type_, headers=exc.headers).response()

    @app.get("/health", response_model=Health, responses={503: {"model": Health, "description": "not serving"}})
    async def health():
        """200 when the gateway can serve (a ready plan), else 503. No API key needed."""
        if gateway.serving:
            return {"status": "serving"}
        return JSONResponse({"status": "not_serving"}, status_code=503)

    @app.get("/v1/models", response_model=ModelList, responses={401: ERRORS[401], 429: ERRORS[429]})
    async def list_models():
        return front.models()

    @app.get("/v1/models/{model:path}", response_model=ModelCard,
             responses={401: ERRORS[401], 404: ERRORS[404], 429: ERRORS[429]})
    async def get_model(model: str):
        front.check_model(model)
        return front.models()["data"][0]

    @app.post("/v1/completions", responses=generation_responses(CompletionResponse))
    async def completions(body: CompletionRequest, request: Request):
        return await _serve(front, request, "text", body, front.completion_request(body))

    @app.post("/v1/chat/completions", responses=generation_responses(ChatCompletionResponse))
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _serve(front, request, "chat", body, await front.chat_request(body))

    add_utility_routes(app, front)
    return app


async def _serve(front: OpenAIFrontend, request: Request, kind: str, body: CommonParams, jobs: list[Job]):
    """Run a request's jobs and answer: an event stream, or the final body once every choice is done."""
    shape = Shape.of(body, kind)
    streams = await front.start(jobs)
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    answer = tool_calls.answer_type(jobs)(shape, front.gw.model_id, front.tokens, jobs, include_usage)
    if body.stream:
        return EventSourceResponse(answer.events(streams), sep="\n", ping=15)
    try:
        done = await _unless_disconnected(request, collect(streams, shape.samples))
    except StagemeshError as exc:
        raise ApiError(503, str(exc), "server_error", code="unavailable") from exc
    if done is None:
        return Response(status_code=499)  # nobody reads it
    return answer.final(done)


# --- serving -----------------------------------------------------------------------------------


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside an already-running loop: the gateway owns SIGINT/SIGTERM, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpFrontend:
    """The HTTP server of one gateway. `start()` returns once the port accepts connections."""

    def __init__(self, gateway, host: str, port: int):
        self.gateway, self.host, self.port = gateway, host, port
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        # Bind and listen here, so a busy port is an OSError now and not a sys.exit inside uvicorn,
        # and connections made right after we return queue in the backlog.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP, not 0: accepted sockets inherit it, and asyncio sets TCP_NODELAY only on
        # sockets that say TCP. Without it Nagle held each response's body behind its headers
        # until the client's delayed ACK: 40+ ms per request on a kept-alive connection.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        tls = getattr(self.gateway.config, "tls", None)  # the gRPC port's certificate, client cert optional
        ssl_kw = {} if tls is None else dict(ssl_certfile=tls.cert, ssl_keyfile=tls.key, ssl_ca_certs=tls.ca,
                                             ssl_cert_reqs=ssl.CERT_REQUIRED if tls.require_client_cert
                                             else ssl.CERT_OPTIONAL)
        config = uvicorn.Config(create_app(self.gateway), log_config=None, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=2, access_log=False, **ssl_kw)
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http")
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()  # raises what failed

    async def wait(self) -> None:
        await asyncio.shield(self._task)  # cancelling the waiter must not kill the server mid-request

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

