"""The checkpoint's chat template, rendered with jinja2 exactly as transformers renders it.

`ChatTemplate.from_dir(model_dir)` reads `chat_template` from tokenizer_config.json (a string, or
the older list of named templates, of which "default" is used) or, as transformers >= 4.43 saves
it, a `chat_template.jinja` file beside it. It returns None when the checkpoint has none: the HTTP
API then answers chat requests with a 400 that says so. We deliberately do not guess a fallback
format: a base model prompted in a format it was never trained on answers plausibly but badly,
and that is harder for a user to diagnose than a clear error (vLLM and transformers >= 4.44
refuse the same way).

Rendering mirrors transformers' `_compile_jinja_template` / `render_jinja_template`: an
ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the loopcontrols extension, a
`{% generation %}` block (rendered as its body), `raise_exception`, `strftime_now`, a `tojson`
that does not HTML-escape, and the tokenizer's special tokens (bos_token, eos_token, ...) as
variables. The rendered text already holds the special tokens the model expects, so it must be
tokenized with add_special_tokens=False (as `apply_chat_template(tokenize=True)` does).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from stagemesh.errors import CheckpointError, InvalidArgument
from stagemesh.gguf_file import gguf_chat_template, is_gguf

RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt"})
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; we only render it."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class ChatTemplate:
    """A compiled template plus the special-token variables it sees. Immutable; safe to share."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = compile_template(source)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ChatTemplate | None:
        """The checkpoint's template, or None when it ships none (a .gguf file: its metadata's)."""
        if is_gguf(model_dir):
            source, special = gguf_chat_template(model_dir)
            return cls(source, special) if source is not None else None
        model_dir = Path(model_dir)
        config_path = model_dir / "tokenizer_config.json"
        config = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from exc
        source = _template_source(config.get("chat_template"), config_path)
        jinja_path = model_dir / "chat_template.jinja"
        if source is None and jinja_path.is_file():
            source = jinja_path.read_text()
        if source is None:
            return None
        try:
            return cls(source, _special_tokens(config))
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise CheckpointError(f"{model_dir}: the chat template does not compile ({exc})") from exc

    def render(self, messages: list[dict], add_generation_prompt: bool = True, kwargs: dict | None = None,
               tools: list[dict] | None = None) -> str:
        """Render a conversation; raises InvalidArgument when the template rejects it.

        `kwargs` (a request's chat_template_kwargs, a dict so that no key of it can collide with
        a parameter here) may not replace the conversation itself.
        """
        kwargs = kwargs or {}
        reserved = sorted(set(kwargs) & RESERVED)
        if reserved:
            raise InvalidArgument(f"chat_template_kwargs may not set {', '.join(reserved)}: they are request fields")
        variables = {**self.special_tokens, **kwargs, "messages": messages, "tools": tools, "documents": None,
                     "add_generation_prompt": add_generation_prompt}
        try:
            return self._template.render(**variables)
        except jinja2.exceptions.TemplateError as exc:  # raise_exception(...) in the template, sandbox errors
            raise InvalidArgument(f"the chat template rejected the messages: {exc}") from exc
        except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as exc:
            # The template's own code tripped over a message shape it did not expect (a number as
            # content, a missing key): that is this request's input, not a server fault.
            raise InvalidArgument(f"the chat template cannot render these messages: {type(exc).__name__}: {exc}") \
                from exc


def _template_source(value, config_path: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
    raise CheckpointError(f"{config_path}: chat_template has no usable default template")


def _special_tokens(config: dict) -> dict[str, str]:
    out = {}
    for name in SPECIAL_TOKENS:
        tok = config.get(name)
        if isinstance(tok, dict):  # serialized AddedToken
            tok = tok.get("content")
        if isinstance(tok, str):
            out[name] = tok
    extra = config.get("additional_special_tokens")
    if isinstance(extra, list):
        out["additional_special_tokens"] = [t.get("content") if isinstance(t, dict) else t for t in extra]
    return out
