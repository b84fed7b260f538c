"""What a structured-output request asks for, as plain data shared by the gateway and the last stage.

The gateway builds a GrammarSpec from the API's fields (response_format, guided_*, structured_outputs,
tools; gateway/structured_output.py), checks that it compiles, and sends it in
`SamplingParams.grammar`; the last stage turns it into a grammar matcher (stage_worker/grammar.py).
`llguidance_grammar` is the one translation of a spec into what llguidance compiles, used by both
sides so that what the gateway accepted is exactly what the stage enforces. Pure Python: no torch,
no grpc.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")  # the wire's Grammar oneof
# JSON is written as `{"a": 1, "b": [2, 3]}`: fixed separators and no free whitespace, so a model
# cannot run a completion into whitespace until max_tokens (xgrammar's any_whitespace=False).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class GrammarSpec:
    """One constraint: `kind` in KINDS; `value` the schema / regex / grammar text, a tuple of
    strings for choice, True for json_object."""

    kind: str
    value: object

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown grammar kind {self.kind!r} (known: {', '.join(KINDS)})")

    @classmethod
    def from_wire(cls, msg) -> GrammarSpec | None:
        """From a `stagemesh.v1.Grammar` message (None when no kind is set)."""
        kind = msg.WhichOneof("kind")
        if kind is None:
            return None
        value = tuple(msg.choice.values) if kind == "choice" else getattr(msg, kind)
        return cls(kind, value)

    def to_wire(self, msg) -> None:
        """Into a `stagemesh.v1.Grammar` message."""
        if self.kind == "choice":
            msg.choice.values.extend(self.value)
        else:
            setattr(msg, self.kind, self.value)


def regex_escape(text: str) -> str:
    """A regex matching exactly `text` (llguidance's regex syntax, as Rust's regex crate)."""
    return "".join("\\" + ch if ch in ".^$*+?{}[]\\|()-&~#" else ch for ch in text)


def llguidance_grammar(spec: GrammarSpec, matcher_cls) -> str:
    """The llguidance grammar of a spec; `matcher_cls` is llguidance.LLMatcher (passed in, so this
    module imports nothing heavy). Raises ValueError for a schema that is not JSON."""
    if spec.kind == "json_schema":
        schema = json.loads(spec.value) if isinstance(spec.value, str) else spec.value
        if not isinstance(schema, (dict, bool)):
            raise ValueError("a JSON schema is an object (or true / false)")
        return matcher_cls.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
    if spec.kind == "json_object":
        return matcher_cls.grammar_from_json_schema(json.dumps({"type": "object"}), overrides=JSON_OPTIONS)
    if spec.kind == "regex":
        return matcher_cls.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        return matcher_cls.grammar_from_regex("(" + "|".join(regex_escape(c) for c in spec.value) + ")")
    from llguidance import grammar_from  # Lark or GBNF, told apart by llguidance

    return grammar_from("grammar", spec.value)
