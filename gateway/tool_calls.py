"""Tool calls on the chat API: `tools` + `tool_choice` in, `message.tool_calls` out (OpenAI's shapes).

  - "none" (the default without tools): the tools are not used; the template gets none.
  - "required": the completion is constrained (gateway/structured_output.py -> the last stage's
    grammar mask) to a JSON array of `{"name": <a tool's name>, "parameters": <its arguments>}`,
    each valid under that tool's `parameters` schema (vLLM's format); at most one element with
    `parallel_tool_calls: false`. finish_reason "tool_calls".
  - a named function (`{"type": "function", "function": {"name": ...}}`): the completion is that
    function's arguments, constrained to its schema. finish_reason "stop", as OpenAI answers.
  - "auto" (the default with tools): the tools go into the checkpoint's chat template (as
    transformers' apply_chat_template(tools=...) passes them) and the completion is parsed in the
    tool-call format of the template's family, where it has one: Hermes / Qwen2 (`<tool_call>{...}
    </tool_call>`), Llama 3.1 JSON (`{"name": ..., "parameters": ...}`, after `<|python_tag|>` or
    not, several joined by `;`), DeepSeek-V3 (`<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME` and a
    ```json block). What parses becomes tool_calls (text before it the content); else it is content.

Streamed, a named function's arguments come as they are generated; "auto" content comes as it is
generated until a tool call starts, the calls whole at the end; "required" calls whole at the end.
Pure Python (no torch, no grpc); event loop only. `ToolAnswer` builds the answers (non-streamed and
streamed) on gateway/openai_compat.py's Answer.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from stagemesh.finish import finish_text
from stagemesh.grammar import GrammarSpec

from gateway import structured_output
from gateway.openai_compat import Answer, chat_logprobs, finish_reason
from gateway.structured_output import GrammarError, check

NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class ToolPlan:
    """What a chat request does with its tools."""

    mode: str  # none | auto | required | named
    tools: list[dict] = field(default_factory=list)  # the request's, checked
    name: str | None = None  # named: the function
    grammar: GrammarSpec | None = None  # required, named
    parser: str | None = None  # auto: the template's family (PARSERS), None: no tool-call format

    @property
    def template_tools(self) -> list[dict] | None:
        """The tools as the chat template receives them (None: no tools)."""
        return None if self.mode == "none" or not self.tools else self.tools

    def message(self, text: str, finish: str) -> tuple[dict, str]:
        """(assistant message, finish_reason) for the completed text."""
        calls, content = [], None  # required, named: the whole text is the calls
        if self.mode == "required":
            calls = _parse_required(text)
        elif self.mode == "named":
            calls = _parse_named(self.name, text)
        elif self.mode == "auto" and self.parser is not None:
            content, calls = PARSERS[self.parser](text)
        if not calls:
            return {"role": "assistant", "content": text}, finish
        message = {"role": "assistant", "content": content or None, "tool_calls": [
            {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": name, "arguments": arguments}} for name, arguments in calls]}
        return message, ("stop" if self.mode == "named" else "tool_calls")


def plan_tools(fields: dict, template_source: str | None) -> ToolPlan:
    """A chat body's `tools`, `tool_choice` and `parallel_tool_calls` (a dict of what was set) as a
    ToolPlan; GrammarError naming the field for anything malformed."""
    tools = _checked_tools(fields.get("tools"))
    choice = fields.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    if choice != "none" and not tools:
        raise GrammarError("tool_choice", "tool_choice needs tools")
    if choice in ("none", "auto"):
        return ToolPlan(choice, tools, parser=family(template_source) if choice == "auto" else None)
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    if choice == "required":
        schema = _required_schema(list(by_name.values()), fields.get("parallel_tool_calls") is False)
        return ToolPlan("required", tools, grammar=_grammar(schema, "tools"))
    if not (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)):
        raise GrammarError("tool_choice", 'tool_choice is "none", "auto", "required" or '
                                          '{"type": "function", "function": {"name": ...}}')
    name = choice["function"].get("name")
    if name not in by_name:
        raise GrammarError("tool_choice", f"tool_choice names {name!r}, which is not one of the tools")
    schema = by_name[name].get("parameters", EMPTY_PARAMETERS)
    return ToolPlan("named", tools, name=name, grammar=_grammar(schema, "tools"))


def _checked_tools(tools) -> list[dict]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise GrammarError("tools", "tools is a list of {'type': 'function', 'function': {...}}")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or t.get("type") != "function":
            raise GrammarError(f"tools[{i}]", f"tools[{i}] is {{'type': 'function', 'function': {{'name': ...}}}}")
        if not isinstance(fn.get("name"), str) or not NAME.match(fn["name"]):
            raise GrammarError(f"tools[{i}].function.name", f"tools[{i}].function.name must be 1-64 letters, "
                                                            "digits, '_', '.' or '-'")
        if not isinstance(fn.get("parameters", {}), dict):
            raise GrammarError(f"tools[{i}].function.parameters", f"tools[{i}].function.parameters is a JSON "
                                                                  "schema object")
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise GrammarError("tools", "two tools have the same name")
    return tools


def _grammar(schema: dict, field_name: str) -> GrammarSpec:
    spec = GrammarSpec("json_schema", json.dumps(schema))
    check(spec, field_name)
    return spec


def _required_schema(functions: list[dict], single: bool) -> dict:
    """vLLM's: an array of {"name": const, "parameters": the function's schema}, one or more."""
    items = [{"type": "object", "properties": {"name": {"const": fn["name"]},
                                               "parameters": fn.get("parameters", EMPTY_PARAMETERS)},
              "required": ["name", "parameters"], "additionalProperties": False} for fn in functions]
    schema = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if single:
        schema["maxItems"] = 1
    return schema


def _parse_required(text: str) -> list[tuple[str, str]]:
    try:
        calls = json.loads(text)
    except ValueError:
        return []  # cut short (max_tokens): the text goes back as content
    return [(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in calls
            if isinstance(c, dict) and "name" in c and "parameters" in c]


def _parse_named(name: str, text: str) -> list[tuple[str, str]]:
    try:
        json.loads(text)
    except ValueError:
        return []
    return [(name, text)]


# --- "auto": the tool-call formats of chat templates ---------------------------------------------------


def family(template_source: str | None) -> str | None:
    """The tool-call format a chat template writes, recognised by its markers."""
    src = template_source or ""
    if "<tool_call>" in src:
        return "hermes"  # Qwen2 / Qwen2.5, Hermes
    if "tool▁calls▁begin" in src:
        return "deepseek_v3"
    if "<|python_tag|>" in src or ("ipython" in src and '"parameters"' in src):
        return "llama3_json"
    return None


def _arguments(obj) -> str:
    return obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)


def parse_hermes(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one or more."""
    start = text.find("<tool_call>")
    if start < 0:
        return text, []
    calls = []
    for body in re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text[start:], re.DOTALL):
        try:
            obj = json.loads(body.strip())
        except ValueError:
            return text, []
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return text, []
        calls.append((obj["name"], _arguments(obj.get("arguments", {}))))
    return text[:start].strip() or None, calls


def parse_llama3_json(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """`{"name": ..., "parameters": {...}}` (Llama 3.1 / 3.2), after `<|python_tag|>` or not,
    several joined by `;`; the whole completion is the call(s)."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            obj, at = decoder.raw_decode(body, at)
        except ValueError:
            return text, []
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return text, []
        calls.append((obj["name"], _arguments(obj.get("parameters", obj.get("arguments", {})))))
        while at < len(body) and body[at] in " \t\n;":
            at += 1
    return None, calls


_DEEPSEEK_CALL = re.compile(r"<｜tool▁call▁begin｜>(?P<type>.*?)<｜tool▁sep｜>(?P<name>.*?)\n```json\n"
                            r"(?P<args>.*?)\n```(?:<｜tool▁call▁end｜>|$)", re.DOTALL)


def parse_deepseek_v3(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """`<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```
    <｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`."""
    start = text.find("<｜tool▁calls▁begin｜>")
    if start < 0:
        return text, []
    calls = []
    for m in _DEEPSEEK_CALL.finditer(text, start):
        try:
            json.loads(m["args"])
        except ValueError:
            return text, []
        calls.append((m["name"].strip(), m["args"]))
    return (text[:start].strip() or None, calls) if calls else (text, [])


PARSERS = {"hermes": parse_hermes, "llama3_json": parse_llama3_json, "deepseek_v3": parse_deepseek_v3}


def template_messages(messages: list[dict]) -> list[dict]:
    """Assistant tool_calls' arguments as objects, as templates expect them (OpenAI sends JSON text)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if isinstance(calls, list):
            fixed = []
            for c in calls:
                fn = c.get("function") if isinstance(c, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    try:
                        c = {**c, "function": {**fn, "arguments": json.loads(fn["arguments"])}}
                    except ValueError:
                        pass
                fixed.append(c)
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out


def chat_constraints(fields: dict, template_source: str | None) -> tuple[GrammarSpec | None, ToolPlan]:
    """A chat body's structured output and tools (fields: what was set): the grammar it is
    constrained to (a response_format / guided_* one, or the tools'), and its ToolPlan."""
    plan = plan_tools(fields, template_source)
    spec, field_name = structured_output.from_request(fields)
    if spec is not None and plan.grammar is not None:
        raise GrammarError(field_name, f"{field_name} cannot be combined with tool_choice {fields.get('tool_choice')!r} "
                                       "(each constrains the whole answer)")
    return spec or plan.grammar, plan


MARKERS = {"hermes": "<tool_call>", "deepseek_v3": "<｜tool▁calls▁begin｜>"}  # where a call starts


@dataclass
class _Streamed:
    """One streamed choice: its text so far, how much of it was sent, whether the rest is held
    (a tool call started), and the id of its call (named)."""

    text: str = ""
    sent: int = 0
    held: bool = False
    call_id: str = ""


class ToolAnswer(Answer):
    """An Answer whose chat choices carry tool_calls (jobs[0].tools: the ToolPlan). Streamed: a named
    function's arguments as they come; "auto" content as it comes until a tool call starts (held
    back from there, sent whole at the end); "required" whole at the end."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan: ToolPlan = self.jobs[0].tools
        self._streams: dict[int, _Streamed] = {}

    def _choice(self, index: int, c, job) -> dict:
        choice = super()._choice(index, c, job)
        choice["message"], choice["finish_reason"] = self.plan.message(c.text, choice["finish_reason"])
        return choice

    def delta_choice(self, index: int, msg, job, first: bool) -> dict | None:
        plan = self.plan
        if plan.mode == "auto" and plan.parser is None:
            return super().delta_choice(index, msg, job, first)
        st = self._streams.setdefault(index, _Streamed())
        st.text += msg.text
        finish = finish_reason(finish_text(msg)) if msg.finish_reason else None
        delta = self._named_delta(st) if plan.mode == "named" else self._content_delta(st, plan.parser)
        if finish:
            message, finish = plan.message(st.text, finish)
            delta = {**delta, **self._final_delta(st, message)}
            del self._streams[index]
        if first:
            delta = {"role": "assistant", **delta}
            if "tool_calls" not in delta:
                delta.setdefault("content", "")
        lp = (chat_logprobs(self.tokens, list(msg.token_ids), list(msg.logprobs))
              if self.shape.logprobs is not None and msg.token_ids else None)  # as the non-streamed answer
        if not delta and not finish and lp is None:
            return None
        return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}

    def _named_delta(self, st: _Streamed) -> dict:
        new, st.sent = st.text[st.sent:], len(st.text)
        if not st.call_id:
            st.call_id = f"call_{uuid.uuid4().hex[:24]}"
            return {"tool_calls": [{"index": 0, "id": st.call_id, "type": "function",
                                    "function": {"name": self.plan.name, "arguments": new}}]}
        return {"tool_calls": [{"index": 0, "function": {"arguments": new}}]} if new else {}

    def _content_delta(self, st: _Streamed, parser: str | None) -> dict:
        """auto: the content not sent yet, up to where a tool call starts or may be starting."""
        if st.held or parser is None:  # required: all at the end
            return {}
        text = st.text
        if parser == "llama3_json":  # the whole completion is the call(s), or content
            body = text.lstrip()
            if body.startswith(("{", "<|python_tag|>")) or not body:
                st.held = bool(body)
                return {}
            end = len(text)
        else:
            marker = MARKERS[parser]
            at = text.find(marker, max(0, st.sent - len(marker)))
            if at >= 0:
                end, st.held = at, True
            else:  # hold back what may be the start of the marker
                end = len(text) - next((k for k in range(len(marker) - 1, 0, -1) if text.endswith(marker[:k])), 0)
        new, st.sent = text[st.sent:end], max(st.sent, end)
        return {"content": new} if new else {}

    def _final_delta(self, st: _Streamed, message: dict) -> dict:
        if self.plan.mode == "named":
            return {}
        if "tool_calls" not in message:  # no call after all: the rest is content
            rest, st.sent = st.text[st.sent:], len(st.text)
            return {"content": rest} if rest else {}
        return {"tool_calls": [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]}


def answer_type(jobs: list) -> type[Answer]:
    """The Answer class of a request's jobs: with tools in use, ToolAnswer."""
    plan = jobs[0].tools if jobs else None
    return Answer if plan is None or plan.mode == "none" else ToolAnswer
