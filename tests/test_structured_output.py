"""Structured output against the real mesh: a random-weights model that would never write JSON by
itself writes JSON that validates, text that full-matches a regex, one of the choices.

Coordinator, two stage workers (the grammar mask runs on the last, which never sees the prompt's
tokens) and the gateway run as processes on loopback, serving the demo checkpoint (a real
byte-level BPE). Schemas are bounded (maxLength, enums, integer ranges, maxItems) so that every
completion ends well inside max_tokens whatever the model prefers: the test is that the mask,
not the model, makes it conform. Bad constraints are 400s / INVALID_ARGUMENT naming the field,
before anything is queued.
"""

from __future__ import annotations

import json
import re

import grpc
import jsonschema
import pytest
import requests

from stagemesh.cli.demo_model import write_demo_model
from stagemesh.client import Client, build_request
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc
from tests.meshes import openai_mesh, with_chat_template

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["river", "mill", "bridge"]},
        "year": {"type": "integer", "minimum": 1200, "maximum": 2100},
        "open": {"type": "boolean"},
        "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 6}},
    },
    "required": ["name", "kind", "year", "open", "tags"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe the old mill as JSON."}]
REGEX = r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01]) [a-z]{2,8}"
CHOICES = ["the river", "the old mill", "the stone bridge"]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    model_dir = with_chat_template(write_demo_model(tmp_path_factory.mktemp("demo")), CHATML)
    with openai_mesh(model_dir, stages=2, kv_blocks=96) as m:
        yield m


def _chat(mesh, **kwargs):
    kwargs.setdefault("max_completion_tokens", 120)
    kwargs.setdefault("temperature", 0)
    return mesh["client"].chat.completions.create(model="", messages=MESSAGES, **kwargs)


def _completion(mesh, extra: dict, **kwargs):
    kwargs.setdefault("max_tokens", 60)
    kwargs.setdefault("temperature", 0)
    return mesh["client"].completions.create(model="", prompt="The old mill", extra_body=extra, **kwargs)


def test_json_schema_from_a_random_model_validates(mesh):
    free = _chat(mesh, max_completion_tokens=30)
    with pytest.raises(ValueError):  # what the model writes by itself is no JSON
        json.loads(free.choices[0].message.content)
    rf = {"type": "json_schema", "json_schema": {"name": "mill", "schema": SCHEMA, "strict": True}}
    greedy = _chat(mesh, response_format=rf)
    sampled = _chat(mesh, response_format=rf, temperature=1.0, seed=7)
    for out in (greedy, sampled):
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    assert sampled.choices[0].message.content != greedy.choices[0].message.content


def test_guided_json_streamed_and_json_object(mesh):
    chunks = list(mesh["client"].completions.create(model="", prompt="The old mill", max_tokens=120, temperature=0,
                                                    stream=True, extra_body={"guided_json": SCHEMA}))
    jsonschema.validate(json.loads("".join(c.choices[0].text for c in chunks)), SCHEMA)
    assert chunks[-1].choices[0].finish_reason == "stop"
    # Any JSON object: unbounded, so a random model may run out of tokens inside it; what it
    # finished parses, what it did not is a prefix of an object.
    out = _chat(mesh, response_format={"type": "json_object"}, max_completion_tokens=200, temperature=1.0, seed=3)
    text = out.choices[0].message.content
    assert text.startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_guided_regex_and_choice_and_structured_outputs(mesh):
    for extra in ({"guided_regex": REGEX}, {"structured_outputs": {"regex": REGEX}}):
        out = _completion(mesh, extra)
        assert re.fullmatch(REGEX, out.choices[0].text), out.choices[0].text
        assert out.choices[0].finish_reason == "stop"
    for seed in (1, 2):
        out = _completion(mesh, {"guided_choice": CHOICES}, temperature=1.0, seed=seed)
        assert out.choices[0].text in CHOICES
    chat = _chat(mesh, extra_body={"structured_outputs": {"choice": CHOICES}})
    assert chat.choices[0].message.content in CHOICES
    for grammar in ('start: "yes" | "no" | "it" " " ("is" | "was")', 'root ::= "yes" | "no" | "it " ("is" | "was")'):
        out = _completion(mesh, {"guided_grammar": grammar}, temperature=1.0, seed=11)  # Lark, then GBNF
        assert out.choices[0].text in ("yes", "no", "it is", "it was")


def test_grpc_generate_takes_a_grammar(mesh):
    req = build_request(prompt="The old mill", max_tokens=60)
    req.sampling.grammar.regex = REGEX
    with grpc.insecure_channel(mesh["gateway"]) as ch:
        stub = pb_grpc.GenerationStub(ch)
        text = "".join(m.text for m in stub.Generate(req, timeout=60))
        assert re.fullmatch(REGEX, text), text
        bad = build_request(prompt="The old mill", max_tokens=8)
        bad.sampling.grammar.json_schema = '{"type": "no-such-type"}'
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(bad, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.grammar" in info.value.details()
    with Client(mesh["gateway"]) as c:  # the mesh still serves
        assert c.generate(prompt="The old mill", max_tokens=3, timeout=30).completion_tokens == 3


@pytest.mark.parametrize("endpoint, body, param", [
    ("chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ("chat/completions", {"response_format": {"type": "xml"}}, "response_format"),
    ("chat/completions", {"guided_json": {"type": "object"}, "guided_regex": "a+"}, "guided_regex"),
    ("completions", {"guided_regex": "[0-9"}, "guided_regex"),
    ("completions", {"guided_json": "{not json"}, "guided_json"),
    ("completions", {"guided_choice": []}, "guided_choice"),
    ("completions", {"guided_grammar": "start: nothing_defined"}, "guided_grammar"),
    ("completions", {"structured_outputs": {"json": {"$ref": "#/nowhere"}}}, "structured_outputs.json"),
    ("completions", {"structured_outputs": {"regex": "a+", "whitespace_pattern": " "}},
     "structured_outputs.whitespace_pattern"),
])
def test_bad_constraints_are_400_naming_the_field(mesh, endpoint, body, param):
    base = {"model": "", "max_tokens": 4}
    base.update({"messages": MESSAGES} if endpoint.startswith("chat") else {"prompt": "The old mill"})
    r = requests.post(f"{mesh['base']}/v1/{endpoint}", json={**base, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


# --- the last stage's grammar book, in-process: output index, rollback, replay ------------------------


def _step(lease: str, seq_id: int, output_index: int, start_pos: int, new=None):
    from stage_worker.step_input import Chunk, StepInput

    chunk = Chunk(seq_id, start_pos, 1, 0, sample=True, output_index=output_index)
    return StepInput(lease, "", 0, 1, {seq_id: new} if new else {}, [chunk], frozenset(), 1)


def _launch(book, leases, step) -> tuple[list, list[int]]:
    """Commit a step as the executor does and get its bias: (picks, the token ids it allows)."""
    leases.commit(step, leases.plan(step))
    picks = [(0, step.chunks[0])]
    bias = book.bias(step, picks, [leases.get(step.lease_id, step.chunks[0].seq_id).sampling])
    return picks, (bias[0] == 0).nonzero().flatten().tolist()


def test_grammar_book_follows_the_output_index_rolls_back_and_replays(tmp_path):
    import torch

    from stage_worker.grammar import GrammarBook
    from stage_worker.lease_table import LeaseTable
    from stage_worker.step_input import NewSequence
    from stagemesh.cli.demo_model import train_tokenizer
    from stagemesh.grammar import GrammarSpec
    from stagemesh.sampling import SamplingSpec

    tok = train_tokenizer(768)
    tok.save(str(tmp_path / "tokenizer.json"))
    regex = r"[0-9]{2}-[a-z]{2}"
    spec = SamplingSpec(grammar=GrammarSpec("regex", regex))
    leases = LeaseTable(16)
    book = GrammarBook(tmp_path, tok.get_vocab_size(), (1,), leases, torch.device("cpu"))
    allowed, chosen = [], []
    for k in range(12):  # the last allowed token each time, until only EOS (id 1) is left
        new = NewSequence(7, [0, 1], spec, [5, 6, 7], 3) if k == 0 else None
        picks, ids = _launch(book, leases, _step("L", 7, k, 3 + k, new))
        if ids == [1]:
            break
        if k == 1:  # drawn, but its answer was lost: the same step again gets the same mask
            book.advance(picks, [ids[-1]])
            picks, again = _launch(book, leases, _step("L", 7, 1, 4))
            assert again == ids
        allowed.append(ids)
        chosen.append(ids[-1])
        book.advance(picks, [ids[-1]])
    assert re.fullmatch(regex, tok.decode(chosen)), tok.decode(chosen)
    # A replay on a new lease, admitted with its outputs in history at output 2: the mask the
    # sequence had there.
    replay = NewSequence(9, [2, 3], spec, [5, 6, 7] + chosen[:2], 3)
    assert _launch(book, leases, _step("M", 9, 2, 5, replay))[1] == allowed[2]


def test_a_grammar_without_a_tokenizer_is_refused_before_admission():
    import asyncio

    from gateway.validation import FieldError, ModelLimits, validate_request

    req = build_request(prompt_ids=[5, 6, 7], max_tokens=4)
    req.sampling.grammar.regex = "[a-z]+"
    with pytest.raises(FieldError) as info:  # tokenize None: the checkpoint ships no tokenizer
        asyncio.run(validate_request(req, ModelLimits("m", 768, 256, 4096), None))
    assert info.value.field == "sampling.grammar" and "tokenizer" in str(info.value)
