"""The OpenAI-compatible HTTP API, driven by the official `openai` client against the real mesh.

Coordinator, two stage workers and the gateway (with --http-port) run as separate processes on
loopback, serving the demo checkpoint (real BPE tokenizer) with a ChatML template written into
its tokenizer_config.json. Text and usage must equal the gRPC API's for the same request, chat
prompts must tokenize as transformers' apply_chat_template does, and every error must be an
OpenAI-shaped error with the right status.
"""

from __future__ import annotations

import json

import grpc
import openai
import pytest
import requests

from gateway.chat_template import ChatTemplate
from stagemesh.client import Client
from stagemesh.cli.demo_model import write_demo_model
from stagemesh.errors import InvalidArgument, OutOfRange, ResourceExhausted, Unavailable
from stagemesh.v1 import stagemesh_pb2 as pb
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc
from stagemesh.cli.harness import wait_kv_free
from tests.meshes import openai_mesh, with_chat_template

CHATML = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Tell me about the river and the old mill."}]
PROMPT = "The old mill stood by the river"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return with_chat_template(write_demo_model(tmp_path_factory.mktemp("demo")), CHATML)


@pytest.fixture(scope="module")
def mesh(model_dir):
    with openai_mesh(model_dir, stages=2, kv_blocks=96, timeout=30) as m:
        with grpc.insecure_channel(m["gateway"]) as ch:
            m["model"] = pb_grpc.GenerationStub(ch).ListModels(pb.ListModelsRequest(), timeout=5).models[0].id
        yield m


def grpc_generate(m, **kwargs):
    with Client(m["gateway"]) as c:
        return c.generate(timeout=30, **kwargs)


def test_models_list(mesh):
    models = mesh["client"].models.list().data
    assert [m.id for m in models] == [mesh["model"]]
    assert mesh["client"].models.retrieve(mesh["model"]).id == mesh["model"]


def test_completion_equals_grpc_and_is_deterministic(mesh):
    c = mesh["client"]
    first = c.completions.create(model=mesh["model"], prompt=PROMPT, max_tokens=12, temperature=0)
    again = c.completions.create(model=mesh["model"], prompt=PROMPT, max_tokens=12, temperature=0)
    ref = grpc_generate(mesh, prompt=PROMPT, max_tokens=12, temperature=0.0)
    assert first.object == "text_completion" and first.model == mesh["model"]
    assert first.choices[0].text == again.choices[0].text == ref.text
    assert first.choices[0].finish_reason == ref.finish_reason == "length"
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (ref.prompt_tokens, ref.completion_tokens)
    assert first.usage.total_tokens == ref.prompt_tokens + ref.completion_tokens
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the same prefix, now cached


def test_completion_from_token_ids_and_stop_strings(mesh):
    c = mesh["client"]
    ids = [0, 57, 300, 12, 91, 5]
    out = c.completions.create(model=mesh["model"], prompt=ids, max_tokens=10, temperature=0)
    ref = grpc_generate(mesh, prompt_ids=ids, max_tokens=10, temperature=0.0)
    assert out.choices[0].text == ref.text and out.usage.prompt_tokens == len(ids)
    stop = ref.text.strip()[3:6]
    assert stop and stop in ref.text
    cut = c.completions.create(model=mesh["model"], prompt=ids, max_tokens=10, temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].text == ref.text[: ref.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_completion_stream(mesh):
    c = mesh["client"]
    full = c.completions.create(model=mesh["model"], prompt=PROMPT, max_tokens=16, temperature=0)
    chunks = list(c.completions.create(model=mesh["model"], prompt=PROMPT, max_tokens=16, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    text_chunks = [ch for ch in chunks if ch.choices]
    assert len(text_chunks) > 1
    assert "".join(ch.choices[0].text for ch in text_chunks) == full.choices[0].text
    assert [ch.choices[0].finish_reason for ch in text_chunks][-1] == "length"
    assert all(ch.usage is None for ch in text_chunks)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 16
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_uses_the_template_as_transformers_does(mesh, model_dir):
    from transformers import AutoTokenizer

    hf_ids = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    out = mesh["client"].chat.completions.create(model=mesh["model"], messages=MESSAGES, max_completion_tokens=10,
                                                 temperature=0)
    ref = grpc_generate(mesh, prompt_ids=list(hf_ids), max_tokens=10, temperature=0.0)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == len(hf_ids) and out.usage.completion_tokens == 10


def test_chat_stream_with_usage(mesh):
    c = mesh["client"]
    messages = [{"role": "user", "content": [{"type": "text", "text": "Say something about mills."}]}]
    full = c.chat.completions.create(model=mesh["model"], messages=messages, max_tokens=12, temperature=0)
    chunks = list(c.chat.completions.create(model=mesh["model"], messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.id == chunks[0].id and ch.object == "chat.completion.chunk" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert (usage.prompt_tokens, usage.completion_tokens) == (full.usage.prompt_tokens, 12)
    assert usage.prompt_tokens_details.cached_tokens > 0  # same conversation as `full`


def test_seeded_sampling_is_reproducible(mesh):
    c = mesh["client"]
    kw = dict(model=mesh["model"], prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=7,
              extra_body={"top_k": 50})
    assert c.completions.create(**kw).choices[0].text == c.completions.create(**kw).choices[0].text


ERRORS = [
    ("completions", dict(n=17), openai.BadRequestError, "n must be in"),
    ("completions", dict(model="no-such-model"), openai.NotFoundError, "does not exist"),
    ("completions", dict(max_tokens=5000), openai.BadRequestError, "context"),
    ("completions", dict(max_tokens=0), openai.BadRequestError, "max_tokens"),
    ("completions", dict(temperature=-1), openai.BadRequestError, "temperature"),
    ("completions", dict(prompt=["a"] * 65), openai.BadRequestError, "at most 64 prompts"),
    ("completions", dict(prompt=[0, 99999]), openai.BadRequestError, "vocabulary"),
    ("completions", dict(logprobs=21), openai.BadRequestError, "logprobs"),
    ("completions", dict(max_tokens=5000, stream=True), openai.BadRequestError, "context"),
    ("chat", dict(n=0), openai.BadRequestError, "n must be in"),
    ("chat", dict(model="no-such-model", stream=True), openai.NotFoundError, "does not exist"),
    ("chat", dict(max_completion_tokens=5000), openai.BadRequestError, "context"),
    ("chat", dict(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
     openai.BadRequestError, "roles must alternate"),
    ("chat", dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     openai.BadRequestError, "image_url"),
    ("chat", dict(messages=[]), openai.BadRequestError, "empty"),
]


@pytest.mark.parametrize("endpoint,kwargs,error,words", ERRORS, ids=[f"{e}-{list(k)[0]}" for e, k, _, _ in ERRORS])
def test_errors_are_openai_shaped(mesh, endpoint, kwargs, error, words):
    c = mesh["client"]
    if endpoint == "chat":
        call, base = c.chat.completions.create, dict(model=mesh["model"], messages=MESSAGES, max_tokens=4)
    else:
        call, base = c.completions.create, dict(model=mesh["model"], prompt=PROMPT, max_tokens=4)
    with pytest.raises(error) as info:
        call(**{**base, **kwargs})
    body = info.value.body
    assert set(body) >= {"message", "type", "param", "code"}, body
    assert words in body["message"], body


def test_malformed_body_is_a_400_not_a_422(mesh):
    with pytest.raises(openai.BadRequestError) as info:
        mesh["client"].post("/completions", body={"model": mesh["model"]}, cast_to=object)
    assert "prompt" in info.value.body["message"]


# Bodies that parse as JSON (Python's parser takes Infinity and NaN, and 1e309 is inf) with a
# number no field can hold: a 400 naming the field, never a 500. Issue #21.
RAW_BAD = [
    ('{"prompt": "hi", "temperature": Infinity}', "temperature"),
    ('{"prompt": "hi", "temperature": 1e309}', "temperature"),
    ('{"prompt": "hi", "temperature": NaN}', "temperature"),
    ('{"prompt": "hi", "temperature": 1e39}', "temperature"),  # finite, past float32
    ('{"prompt": "hi", "top_p": -Infinity}', "top_p"),
    ('{"prompt": "hi", "max_tokens": 2147483648}', "max_tokens"),
    ('{"prompt": "hi", "max_tokens": 100000000000000000000000}', "max_tokens"),
    ('{"prompt": [1, 2147483648]}', "prompt"),
    ('{"prompt": [[1, -1]]}', "prompt"),
    ('{"prompt": "hi", "top_k": 1099511627776}', "top_k"),
    ('{"prompt": "hi", "top_k": -2}', "top_k"),
    ('{"prompt": "hi", "seed": 18446744073709551616}', "seed"),
    ('{"prompt": "hi", "seed": -1}', "seed"),
    ('{"prompt": "hi", "n": 4294967296}', "n"),
    ('{"prompt": "hi", "stop": [""]}', "stop"),
    ('{"prompt": "hi", "stop": ""}', "stop"),
    ('{"prompt": "hi", "max_tokens": "5"}', "max_tokens"),  # strict: a string is not a number
    ('{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2147483648}', "max_tokens"),
    ('{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"messages": []}}', "messages"),
    ('{"messages": [{"content": "hi"}]}', "messages[0].role"),  # one spelling of a field path everywhere
    ('{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "messages[0].content"),
]


@pytest.mark.parametrize("body,field", RAW_BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(RAW_BAD)])
def test_numbers_beyond_their_field_are_400_naming_it(mesh, body, field):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = requests.post(mesh["base"] + path, data=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, (r.status_code, r.text)
    error = r.json()["error"]
    assert field in error["message"] or field in (error["param"] or ""), error


def test_oversize_bodies_are_413_before_being_read(mesh):
    big = b'{"prompt": "' + b"word " * (20 << 20) + b'"}'  # 100 MB, Content-Length declared
    r = requests.post(mesh["base"] + "/v1/completions", data=big, headers={"content-type": "application/json"},
                      timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"word " * (1 << 18)
        yield b'"}'

    r = requests.post(mesh["base"] + "/v1/completions", data=chunked(), headers={"content-type": "application/json"},
                      timeout=60)
    assert r.status_code == 413, r.text
    # Under the body limit, over the prompt's byte limit (4 MiB by default): 413 naming the flag.
    r = requests.post(mesh["base"] + "/v1/completions", json={"prompt": "word " * (1 << 20)}, timeout=60)
    assert r.status_code == 413 and "--max-prompt-bytes" in r.json()["error"]["message"], r.text
    ok = mesh["client"].completions.create(model=mesh["model"], prompt=PROMPT, max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2


def test_health_and_schema_need_no_key(mesh):
    assert requests.get(mesh["base"] + "/health", timeout=10).json() == {"status": "serving"}
    schema = requests.get(mesh["base"] + "/openapi.json", timeout=10).json()
    ops = schema["paths"]["/v1/completions"]["post"]
    assert "422" not in ops["responses"] and {"200", "400", "413"} <= set(ops["responses"])
    r = requests.delete(mesh["base"] + "/v1/completions", timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


# 360 tokens take ~2.5 s here; freeing the KV well before that shows that the request was cancelled.
LONG = dict(prompt=PROMPT, max_tokens=360, temperature=0, extra_body={"ignore_eos": True})


def test_abandoned_stream_frees_kv(mesh):
    stream = mesh["client"].completions.create(model=mesh["model"], stream=True, **LONG)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    wait_kv_free(mesh, 1.0)


def test_client_timeout_frees_kv(mesh):
    with pytest.raises(openai.APITimeoutError):
        mesh["client"].completions.create(model=mesh["model"], timeout=0.3, **LONG)
    wait_kv_free(mesh, 1.0)


# --- pure tests: no mesh ---------------------------------------------------------------------------


TEMPLATES = [
    CHATML,
    # tojson, namespace, loop controls, the generation block, strip filters: the usual Hub template idioms
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}[{{ ns.n }}] {{ m | tojson }}\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content | trim }}{% endgeneration %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ eos_token }}>>> {% endif %}",
]


@pytest.mark.parametrize("template", TEMPLATES, ids=["chatml", "idioms"])
def test_render_equals_transformers(model_dir, tmp_path, template):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(model_dir)
    messages = MESSAGES + [{"role": "assistant", "content": "  Wet <b>&</b> \"old\".  "},
                           {"role": "user", "content": "Ünïcode ✓"}]
    ours = ChatTemplate(template, {"bos_token": "<s>", "eos_token": "</s>"})
    for gen in (True, False):
        assert ours.render(messages, add_generation_prompt=gen) == hf.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=gen, tokenize=False)


def test_template_sources(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    assert ChatTemplate.from_dir(tmp_path) is None
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}{{ eos_token }}")
    assert ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "hi"}]) == "hi</s>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default"}]}))
    assert ChatTemplate.from_dir(tmp_path).render([]) == "default"
    with pytest.raises(InvalidArgument, match="alternate"):
        ChatTemplate(CHATML).render([{"role": "user", "content": "a"}] * 2)


def test_error_statuses():
    from gateway.http_errors import api_error
    from gateway.validation import FieldError, PromptTooLarge

    assert api_error(InvalidArgument("x")).status == 400
    assert api_error(OutOfRange("x")).status == 400
    assert api_error(ResourceExhausted("queue full")).status == 429
    assert api_error(PromptTooLarge("x")).status == 413
    assert api_error(FieldError("top_k", "x")).param == "top_k"
    assert api_error(Unavailable("x")).status == 503


def test_field_paths_are_spelled_one_way():
    """`messages[0].role`, as tool_calls spells `tools[0].function.name`."""
    from gateway.http_errors import ApiError, field_path, flatten_message

    assert field_path(("body", "messages", 0, "role")) == "messages[0].role"
    assert field_path(("body", "prompt", "list[int]", 1)) == "prompt.list[int][1]"
    assert field_path(("body",)) == ""
    with pytest.raises(ApiError) as info:
        flatten_message({"content": "hi"}, 2)
    assert info.value.param == "messages[2].role"
    with pytest.raises(ApiError) as info:
        flatten_message({"role": "user", "content": ["hi"]}, 1)
    assert info.value.param == "messages[1].content"


def _asgi(app, method: str, path: str, headers=(), chunks=(b"",)) -> tuple[int, bytes]:
    """One request through an ASGI app; the body arrives in `chunks`. Returns (status, body)."""
    import asyncio

    async def go():
        sent, pending = [], [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                             for i, c in enumerate(chunks)]

        async def receive():
            return pending.pop(0) if pending else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": method, "path": path, "client": ("127.0.0.1", 1),
                 "headers": [(k.encode(), v.encode()) for k, v in headers]}
        await app(scope, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    return asyncio.run(go())


async def _echo_body(scope, receive, send):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def test_only_the_v1_api_needs_the_api_key_as_in_vllm():
    from gateway.auth import ApiKeyAuth
    from gateway.http_guard import PublicPaths

    app = PublicPaths(_echo_body, ApiKeyAuth(keys=("sk-right",)))
    for method, path in (("GET", "/health"), ("GET", "/openapi.json"), ("GET", "/version"), ("GET", "/metrics"),
                         ("POST", "/tokenize"), ("POST", "/detokenize"), ("OPTIONS", "/v1/completions")):
        assert _asgi(app, method, path)[0] == 200, path
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("GET", "/health/../v1/models"), ("GET", "/nowhere")):  # exact paths only
        assert _asgi(app, method, path)[0] == 401, path
    assert _asgi(app, "GET", "/v1/models", headers=[("authorization", "Bearer sk-right")])[0] == 200


def test_body_limit_counts_declared_and_chunked_bodies():
    from gateway.http_guard import BodyLimit

    app = BodyLimit(_echo_body, limit=10)
    assert _asgi(app, "POST", "/v1/completions", headers=[("content-length", "11")], chunks=[b"x" * 11])[0] == 413
    assert _asgi(app, "POST", "/v1/completions", chunks=[b"x" * 6, b"y" * 6])[0] == 413  # no length: counted
    assert _asgi(app, "POST", "/v1/completions", chunks=[b"ab", b"cd", b""]) == (200, b"abcd")  # handed on whole
    assert _asgi(app, "POST", "/v1/completions", headers=[("content-length", "4")], chunks=[b"abcd"]) == (200, b"abcd")
