"""The command line, generated from the config dataclasses: one flag per field (nested fields as
``--model.d-model``, plus a short alias a field may declare, e.g. ``--lr`` for ``optim.lr``), its
help the field's docstring, its parser the field's type (counts accept ``50M``; booleans take
``--x/--no-x``; lists are comma-separated; choices come from the field's metadata). A flag that is
not given leaves the config's value alone, so presets and config files are overridden only by what
the user typed.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Callable

from .config import load_config_file
from .errors import ConfigError
from .units import parse_count, parse_count_list


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (attribute docstrings, read from the source)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    out = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            out[node.target.id] = " ".join(nxt.value.value.split())
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            out = {**field_docs(base), **out}
    return out


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a comma-separated list of numbers") from None


def _float(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a number") from None


def choice_list(text: str, choices, flag: str) -> list[str]:
    """Comma-separated names, each one of ``choices`` (a registry's keys are read when parsed)."""
    names = [x.strip() for x in str(text).split(",") if x.strip()]
    for x in names:
        if x not in choices:
            raise ConfigError(f"{flag} {x!r} is not one of {', '.join(choices)}")
    return names


def mapping_arg(text: str, flag: str) -> dict:
    """A JSON/TOML file, or an inline JSON object."""
    if Path(text).suffix in (".json", ".toml") or Path(text).is_file():
        d = load_config_file(text)
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(f"{flag} {text!r} is neither a JSON/TOML file nor a JSON object") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{flag} {text!r} must be a JSON object such as '{{\"partition\": \"gpu\"}}'")
    return d


def _converter(tp: Any, flag: str) -> tuple[Callable[[str], Any] | None, str]:
    """(parse, metavar) for an annotation; ``None`` parse means a boolean switch."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if dict in args and str in args:  # an inline JSON object, or a path
            return (lambda v: json.loads(v) if v.lstrip().startswith("{") else v), "JSON|PATH"
        inner = next(a for a in args if a is not type(None))
        parse, meta = _converter(inner, flag)
        if type(None) in args and inner in (int, float):  # "none" gives back an optional number's None (off)
            return (lambda v: None if v.strip().lower() == "none" else parse(v)), f"{meta}|none"
        return parse, meta
    if tp is bool:
        return None, ""
    if tp is int:
        return (lambda v: parse_count(v, flag)), "N"
    if tp is float:
        return (lambda v: _float(v, flag)), "X"
    if tp is str:
        return str, "TEXT"
    if origin is list and args == (int,):
        return (lambda v: parse_count_list(v, flag)), "N,N,..."
    if origin is list and args == (float,):
        return (lambda v: _floats(v, flag)), "X,X,..."
    if origin is list and args == (str,):  # paths: comma-separated
        return (lambda v: [x.strip() for x in v.split(",") if x.strip()]), "TEXT,TEXT,..."
    if tp is dict or origin is dict:
        return (lambda v: mapping_arg(v, flag)), "JSON|FILE"
    return str, "TEXT"  # structured values (a batch schedule) are parsed by the command


@dataclasses.dataclass
class Flag:
    path: tuple[str, ...]
    """The field's path in the dataclass tree."""
    dest: str


def _help(doc: str, default: Any) -> str:
    text = doc or ""
    if default is not dataclasses.MISSING and default is not None and not isinstance(default, (list, dict)):
        text += f" (default: {default})"
    return text.replace("%", "%%")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, *, prefix: tuple[str, ...] = (),
                       exclude: tuple[str, ...] = (), required: tuple[str, ...] = ()) -> list[Flag]:
    """Add one flag per field of ``cls`` (recursing into nested dataclasses); returns them."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    flags: list[Flag] = []
    for f in dataclasses.fields(cls):
        if f.name in exclude or f.metadata.get("cli") is False:
            continue
        tp = hints[f.name]
        path = (*prefix, f.name)
        if dataclasses.is_dataclass(tp):
            flags += add_dataclass_args(parser, tp, prefix=path, exclude=tuple(e[len(f.name) + 1:] for e in exclude
                                                                             if e.startswith(f.name + ".")))
            continue
        name = "--" + ".".join(p.replace("_", "-") for p in path)
        names = [name] + [f"--{a}" for a in f.metadata.get("aliases", ())]
        dest = "cfg__" + "__".join(path)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        choices = f.metadata.get("choices")
        parse, metavar = _converter(tp, names[-1])
        kw: dict = {"dest": dest, "default": argparse.SUPPRESS, "help": _help(docs.get(f.name, ""), default)}
        if parse is None:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        else:
            if choices and typing.get_origin(tp) is list:  # several names: comma-separated, each checked
                kw["type"] = functools.partial(choice_list, choices=choices, flag=names[-1])
                kw["metavar"] = "{" + ",".join(choices) + "},..."
            elif choices:
                kw["choices"] = list(choices)
            else:
                kw["type"], kw["metavar"] = parse, metavar
            is_required = f.name in required or (default is dataclasses.MISSING and not prefix)
            positional = f.metadata.get("positional")
            if positional:
                kw.pop("dest")
                kw["metavar"] = f.name.upper()
                if isinstance(positional, str) and typing.get_origin(tp) is list:  # nargs: argparse types each item
                    kw["type"] = str
                parser.add_argument(dest, nargs=None if positional is True else positional, **kw)
            else:
                parser.add_argument(*names, required=is_required, **kw)
        flags.append(Flag(path, dest))
    return flags


def overrides(ns: argparse.Namespace, flags: list[Flag]) -> dict:
    """The given flags as a nested dict of field values."""
    out: dict = {}
    for fl in flags:
        if not hasattr(ns, fl.dest):
            continue
        d = out
        for p in fl.path[:-1]:
            d = d.setdefault(p, {})
        d[fl.path[-1]] = getattr(ns, fl.dest)
    return out


def flag_names(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """Every subcommand's option strings (for the frozen-CLI test and the docs)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    return {name: sorted(s for a in p._actions for s in (a.option_strings or [a.dest]))  # noqa: SLF001
            for name, p in sub.choices.items()}
