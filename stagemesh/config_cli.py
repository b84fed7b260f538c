"""A command line built from a config dataclass: each setting has one default and one help text.

A field that users set is declared with `knob(default, help)` (its help, and where argparse needs
more, its flag or choices, go in the field's metadata); a field without help (a TLS config, a
nested config, a value derived at start-up) is not a flag. `add_flags` adds the knobs to a parser,
`from_args` builds the dataclass back from the parsed namespace, and `to_argv` writes the flags
that hand chosen values to a child process: `stagemesh up` takes its pass-through flags from the
services' configs with `add_flags` and hands them on with `to_argv`, restating no default.

Pure (argparse and dataclasses only), so core modules may declare their knobs with it.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Iterable


def knob(default: Any = dataclasses.MISSING, help: str = "", *, flag: str = "", aliases: tuple[str, ...] = (),
         choices: Iterable[str] | None = None, parse: Callable[[str], Any] | None = None,
         unparse: Callable[[Any], str] | None = None) -> Any:
    """A dataclass field that is also a command-line flag (`--field-name` unless `flag` says).

    A bool defaulting to True is switched off by its `flag` (e.g. `--no-rebalance`); a tuple
    of str is a repeatable flag; `parse`/`unparse` convert a value that is not a plain str,
    int or float (e.g. `--split 10,12,10`)."""
    if not help:
        raise ValueError("a knob needs its help text")
    meta = {"help": help, "flag": flag, "aliases": aliases, "choices": tuple(choices) if choices else None,
            "parse": parse, "unparse": unparse}
    return dataclasses.field(default=default, metadata=meta)


def knobs(cls, only: Iterable[str] | None = None) -> list[dataclasses.Field]:
    """The knob fields of `cls`, all of them or those named in `only` (in that order)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("help")}
    if only is None:
        return list(fields.values())
    missing = [name for name in only if name not in fields]
    if missing:
        raise KeyError(f"{cls.__name__} has no knob {missing}")
    return [fields[name] for name in only]


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def default_of(cls, name: str) -> Any:
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.default


def add_flags(parser, cls, only: Iterable[str] | None = None, help_suffix: str = "") -> None:
    """Add the knobs of `cls` to an argparse parser (or group), dest = field name."""
    for field in knobs(cls, only):
        meta, default = field.metadata, field.default
        kw: dict[str, Any] = {"dest": field.name, "help": meta["help"] + help_suffix}
        if default is dataclasses.MISSING:
            kw["required"] = True
        elif meta["parse"] is not None:
            kw["default"] = ""  # the text is parsed in `values`: empty means the field's default
        elif isinstance(default, bool):
            kw["action"] = "store_false" if default else "store_true"
        elif isinstance(default, tuple):
            kw.update(action="append", default=[])
        else:
            kw.update(default=default, type=type(default))
        if meta["choices"]:
            kw["choices"] = list(meta["choices"])
        parser.add_argument(flag_of(field), *meta["aliases"], **kw)


def values(cls, args: argparse.Namespace, only: Iterable[str] | None = None) -> dict[str, Any]:
    """The knobs of `cls` present in `args`, converted to the field's type."""
    out = {}
    for field in knobs(cls, only):
        if not hasattr(args, field.name):
            continue
        value = getattr(args, field.name)
        if field.metadata["parse"] is not None:
            value = field.metadata["parse"](value) if value else field.default
        elif isinstance(field.default, tuple):
            value = tuple(value)
        out[field.name] = value
    return out


def from_args(cls, args: argparse.Namespace, **extra: Any):
    """`cls` built from the parsed flags (its knobs) and `extra` (its other fields)."""
    return cls(**{**values(cls, args), **extra})


def to_argv(cls, chosen: dict[str, Any], only: Iterable[str] | None = None) -> list[str]:
    """The flags that give a `cls` process the values in `chosen` (knobs absent there: left out)."""
    argv: list[str] = []
    for field in knobs(cls, only):
        if field.name not in chosen:
            continue
        value, flag = chosen[field.name], flag_of(field)
        if isinstance(field.default, bool):
            argv += [flag] if value != field.default else []
        elif field.metadata["unparse"] is not None:
            text = field.metadata["unparse"](value)
            argv += [flag, text] if text else []
        elif isinstance(field.default, tuple):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv
