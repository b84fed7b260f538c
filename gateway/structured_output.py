"""Structured output requests: the API's fields -> one GrammarSpec, checked before admission.

The HTTP API takes what vLLM's server takes: chat `response_format` (`json_object`, `json_schema`),
the extras `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` and their newer
spelling `structured_outputs: {json, regex, choice, grammar, json_object}` (completions and chat),
and, through gateway/tool_calls.py, `tools` with `tool_choice` "required" or a named function. At
most one of them may be set. The gRPC API sends the spec itself (`SamplingParams.grammar`).

Every spec is compiled once here with llguidance, the engine the last stage enforces it with
(stage_worker/grammar.py), so a schema, regex or grammar that does not compile is an
INVALID_ARGUMENT / HTTP 400 naming the field, before the request is queued. Checks are cached by
spec: a client that sends the same schema each time pays for it once.
"""

from __future__ import annotations

import json
from functools import lru_cache

from stagemesh.errors import InvalidArgument
from stagemesh.grammar import GrammarSpec, llguidance_grammar

MAX_GRAMMAR_CHARS = 1 << 20  # a schema, regex or grammar's text
MAX_CHOICES = 1024
# vLLM's structured_outputs keys -> the wire's Grammar kinds.
STRUCTURED_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                   "json_object": "json_object"}
# vLLM's structured_outputs options this engine meets as it is (there is no fallback engine); any
# other key set is refused rather than ignored (disable_any_whitespace too: JSON here has ", ").
STRUCTURED_OPTIONS_MET = {"disable_fallback"}
GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
          "guided_grammar": "grammar"}


class GrammarError(InvalidArgument):
    """A structured-output field that does not compile; `field` names it (HTTP `param`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def check(spec: GrammarSpec, field: str) -> None:
    """GrammarError naming `field` unless the spec compiles."""
    try:
        error = _compile_error(spec)
    except TypeError:  # an unhashable value: not one the wire can carry anyway
        error = "not a string (or, for choice, a list of strings)"
    if error:
        raise GrammarError(field, f"{field}: {error}")


@lru_cache(maxsize=256)
def _compile_error(spec: GrammarSpec) -> str:
    import llguidance

    if spec.kind == "choice":
        if not spec.value or len(spec.value) > MAX_CHOICES or not all(isinstance(c, str) for c in spec.value):
            return f"choice takes 1 to {MAX_CHOICES} strings"
    elif spec.kind != "json_object":
        if not isinstance(spec.value, str) or not spec.value:
            return "must be a non-empty string"
        if len(spec.value) > MAX_GRAMMAR_CHARS:
            return f"longer than {MAX_GRAMMAR_CHARS} characters"
    try:
        grammar = llguidance_grammar(spec, llguidance.LLMatcher)
    except ValueError as exc:  # a schema that is not JSON
        return f"not a valid JSON schema ({exc})"
    error = llguidance.LLMatcher.validate_grammar(grammar)
    return error.strip().splitlines()[0] if error else ""


def _spec(kind: str, value, field: str) -> GrammarSpec:
    if kind == "json_schema" and isinstance(value, (dict, bool)):
        value = json.dumps(value)
    elif kind == "choice":
        if not isinstance(value, list):
            raise GrammarError(field, f"{field}: a list of strings")
        value = tuple(value)
    elif kind == "json_object":
        value = True
    spec = GrammarSpec(kind, value)
    check(spec, field)
    return spec


def from_response_format(rf) -> tuple[GrammarSpec | None, str]:
    """OpenAI's response_format: text (None), json_object, json_schema {name, schema, strict}."""
    if rf is None:
        return None, ""
    if not isinstance(rf, dict):
        raise GrammarError("response_format", "response_format is an object with a `type`")
    kind = rf.get("type")
    if kind == "text":
        return None, ""
    if kind == "json_object":
        return GrammarSpec("json_object", True), "response_format"
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), (dict, bool)):
            raise GrammarError("response_format", "response_format.json_schema is an object whose `schema` "
                                                  "is a JSON schema object")
        return _spec("json_schema", js.get("schema", {}), "response_format.json_schema.schema"), "response_format"
    raise GrammarError("response_format", f"response_format.type must be text, json_object or json_schema, "
                                          f"got {kind!r}")


def from_request(fields: dict) -> tuple[GrammarSpec | None, str]:
    """(spec, the field it came from) out of a request body's fields (a dict of what was set):
    response_format, guided_*, structured_outputs. More than one set is a GrammarError."""
    found: list[tuple[GrammarSpec, str]] = []
    spec, field = from_response_format(fields.get("response_format"))
    if spec is not None:
        found.append((spec, field))
    for name, kind in GUIDED.items():
        if fields.get(name) is not None:
            found.append((_spec(kind, fields[name], name), name))
    so = fields.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise GrammarError("structured_outputs", "structured_outputs is an object")
        for key, value in so.items():
            if value in (None, False) or key in STRUCTURED_OPTIONS_MET:
                continue
            if key not in STRUCTURED_KEYS:
                raise GrammarError(f"structured_outputs.{key}", f"structured_outputs.{key} is not supported "
                                   f"(supported: {', '.join(sorted(STRUCTURED_KEYS))})")
            found.append((_spec(STRUCTURED_KEYS[key], value, f"structured_outputs.{key}"),
                          f"structured_outputs.{key}"))
    if len(found) > 1:
        names = ", ".join(f for _, f in found)
        raise GrammarError(found[1][1], f"at most one structured-output constraint per request, got {names}")
    return found[0] if found else (None, "")


def attach(request, spec: GrammarSpec | None) -> None:
    """Put a spec into a GenerateRequest's sampling (the gateway checks it again, cached)."""
    if spec is not None:
        spec.to_wire(request.sampling.grammar)
