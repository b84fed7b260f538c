"""Tool calls: tool_choice "required" / a named function give tool_calls whose arguments validate
against the function's schema, from a random-weights model (the grammar mask does it); "auto"
renders the tools into the chat template as transformers does and parses each family's format.

The parsers are tested on strings written in each template's format (Hermes / Qwen2, Llama 3.1
JSON, DeepSeek-V3); the rest against the real mesh (coordinator, one stage worker, gateway) with a
Qwen2-style template that lists the tools in its system prompt.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import requests

from gateway import tool_calls
from gateway.structured_output import GrammarError
from stagemesh.cli.demo_model import write_demo_model
from tests.meshes import openai_mesh, with_chat_template

QWEN_STYLE = (
    "{%- if tools %}<|im_start|>system\nYou may call functions. Signatures within <tools></tools>:\n<tools>"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\nReturn each call as <tool_call>\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
ALARM = {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                                          "label": {"type": "string", "maxLength": 8}},
         "required": ["hour", "label"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "set_alarm", "parameters": ALARM}}]
SCHEMAS = {"get_weather": WEATHER, "set_alarm": ALARM}
MESSAGES = [{"role": "user", "content": "What is the weather in Oslo this week?"}]


# --- the parsers, on each family's format -----------------------------------------------------------


def test_families_are_recognised_from_their_templates():
    assert tool_calls.family(QWEN_STYLE) == "hermes"
    assert tool_calls.family("{{- '<|python_tag|>' + tool_call.name }} ipython") == "llama3_json"
    assert tool_calls.family("{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>'}}") == "deepseek_v3"
    assert tool_calls.family("{{ messages }}") is None and tool_calls.family(None) is None


def test_hermes_qwen2_format():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n'
            '</tool_call>\n<tool_call>\n{"name": "set_alarm", "arguments": {"hour": 7, "label": "up"}}\n</tool_call>')
    content, calls = tool_calls.parse_hermes(text)
    assert content == "Let me check."
    assert [(n, json.loads(a)) for n, a in calls] == [("get_weather", {"city": "Oslo", "days": 3}),
                                                      ("set_alarm", {"hour": 7, "label": "up"})]
    assert tool_calls.parse_hermes("no call here") == ("no call here", [])
    assert tool_calls.parse_hermes("<tool_call>\n{broken\n</tool_call>")[1] == []


def test_llama3_json_format():
    one = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima", "days": 2}}'
    assert tool_calls.parse_llama3_json(one) == (None, [("get_weather", '{"city": "Lima", "days": 2}')])
    two = '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}'
    assert [n for n, _ in tool_calls.parse_llama3_json(two)[1]] == ["a", "b"]
    assert tool_calls.parse_llama3_json("The weather is fine.") == ("The weather is fine.", [])
    assert tool_calls.parse_llama3_json('{"name": "a", "parameters": {')[1] == []


def test_deepseek_v3_format():
    text = ("Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
            '{"city": "Paris", "days": 1}\n```<｜tool▁call▁end｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>'
            'set_alarm\n```json\n{"hour": 6, "label": "go"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
    content, calls = tool_calls.parse_deepseek_v3(text)
    assert content == "Sure."
    assert [(n, json.loads(a)) for n, a in calls] == [("get_weather", {"city": "Paris", "days": 1}),
                                                      ("set_alarm", {"hour": 6, "label": "go"})]
    assert tool_calls.parse_deepseek_v3("plain answer") == ("plain answer", [])


def test_tool_plans_and_their_refusals():
    plan = tool_calls.plan_tools({"tools": TOOLS}, QWEN_STYLE)
    assert (plan.mode, plan.parser, plan.grammar) == ("auto", "hermes", None)
    assert tool_calls.plan_tools({"tools": TOOLS, "tool_choice": "none"}, QWEN_STYLE).template_tools is None
    assert tool_calls.plan_tools({}, QWEN_STYLE).mode == "none"
    message, finish = plan.message('<tool_call>\n{"name": "set_alarm", "arguments": {"hour": 1}}\n</tool_call>',
                                   "stop")
    assert finish == "tool_calls" and message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "set_alarm", "arguments": '{"hour": 1}'}
    bad = [({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
           ({"tool_choice": "required"}, "tool_choice"),
           ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
           ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}],
             "tool_choice": "required"}, "tools"),
           ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "guided_regex")]
    for fields, param in bad:
        with pytest.raises(GrammarError) as info:
            tool_calls.chat_constraints(fields, QWEN_STYLE)
        assert info.value.field == param, (fields, info.value)


def _streamed(plan, pieces: list[str]) -> list[dict]:
    """The chunk choices a ToolAnswer streams for a completion arriving in `pieces`."""
    from gateway.openai_compat import Job, Shape
    from stagemesh.finish import set_finish
    from stagemesh.v1 import stagemesh_pb2 as pb

    answer = tool_calls.ToolAnswer(Shape("chat", 1, 1), "m", None, [Job(pb.GenerateRequest(), tools=plan)])
    out = []
    for i, piece in enumerate(pieces):
        msg = pb.GenerateResponse(text=piece)
        if i == len(pieces) - 1:
            set_finish(msg, "stop")
        out.append(answer.delta_choice(0, msg, None, i == 0))
    return [c for c in out if c is not None]


def test_auto_streams_content_until_a_call_starts():
    plan = tool_calls.plan_tools({"tools": TOOLS}, QWEN_STYLE)
    pieces = ["Let me ", "check.<tool", '_call>\n{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}\n</tool_call>']
    chunks = _streamed(plan, pieces)
    assert chunks[0]["delta"]["role"] == "assistant"
    assert "".join(c["delta"].get("content") or "" for c in chunks) == "Let me check."
    assert "<tool" not in chunks[1]["delta"].get("content", "")  # held back: it might be a call
    last = chunks[-1]
    assert last["finish_reason"] == "tool_calls"
    assert last["delta"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    plain = _streamed(plan, ["No call: ", "a <tool", " is not one."])
    assert "".join(c["delta"].get("content") or "" for c in plain) == "No call: a <tool is not one."
    assert plain[-1]["finish_reason"] == "stop"
    llama = tool_calls.ToolPlan("auto", TOOLS, parser="llama3_json")
    calls = _streamed(llama, ['{"name": "set_alarm", ', '"parameters": {"hour": 5}}'])
    assert calls[-1]["delta"]["tool_calls"][0]["function"]["name"] == "set_alarm"
    assert not any(c["delta"].get("content") for c in calls)


# --- against the mesh ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    model_dir = with_chat_template(write_demo_model(tmp_path_factory.mktemp("demo")), QWEN_STYLE)
    with openai_mesh(model_dir, stages=1, kv_blocks=320) as m:
        m["dir"] = model_dir
        yield m


def _valid_calls(calls) -> list[str]:
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return [call.function.name for call in calls]


def test_required_and_named_tool_choice(mesh):
    c = mesh["client"]
    for kwargs in ({}, {"parallel_tool_calls": False, "temperature": 1.0, "seed": 5}):
        out = c.chat.completions.create(model="", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                        max_completion_tokens=150, **{"temperature": 0, **kwargs})
        assert out.choices[0].finish_reason == "tool_calls"
        assert _valid_calls(out.choices[0].message.tool_calls)
        if kwargs:  # parallel_tool_calls false: one call
            assert len(out.choices[0].message.tool_calls) == 1
    named = {"type": "function", "function": {"name": "set_alarm"}}
    out = c.chat.completions.create(model="", messages=MESSAGES, tools=TOOLS, tool_choice=named, temperature=0,
                                    max_completion_tokens=80, logprobs=True)
    assert out.choices[0].finish_reason == "stop" and out.choices[0].message.content is None
    assert _valid_calls(out.choices[0].message.tool_calls) == ["set_alarm"]
    chunks = list(c.chat.completions.create(model="", messages=MESSAGES, tools=TOOLS, tool_choice=named,
                                            temperature=0, max_completion_tokens=80, stream=True, logprobs=True))
    streamed_lp = [x.logprob for ch in chunks if ch.choices[0].logprobs for x in ch.choices[0].logprobs.content]
    assert streamed_lp == [x.logprob for x in out.choices[0].logprobs.content]  # logprobs streamed too
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert len(deltas) > 2  # the arguments come as they are generated
    assert "".join(d.function.arguments for d in deltas) == out.choices[0].message.tool_calls[0].function.arguments
    assert deltas[0].index == 0 and deltas[0].function.name == "set_alarm" and deltas[0].id.startswith("call_")
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_auto_renders_the_tools_as_transformers_does(mesh):
    from transformers import AutoTokenizer

    hf_ids = AutoTokenizer.from_pretrained(mesh["dir"]).apply_chat_template(
        MESSAGES, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False)
    out = mesh["client"].chat.completions.create(model="", messages=MESSAGES, tools=TOOLS, temperature=0,
                                                 max_completion_tokens=8)
    assert out.usage.prompt_tokens == len(hf_ids)
    # A random model writes no <tool_call>: its text comes back as content.
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason == "length"
    none = mesh["client"].chat.completions.create(model="", messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                                  temperature=0, max_completion_tokens=8)
    assert none.usage.prompt_tokens < out.usage.prompt_tokens  # no tools in the prompt
    r = requests.post(f"{mesh['base']}/v1/chat/completions", timeout=30, json={
        "model": "", "messages": MESSAGES, "tools": TOOLS, "tool_choice": {"type": "function",
                                                                          "function": {"name": "nope"}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
