"""CLI flags generated from a component's frozen config dataclass.

Each setting's default, type and help live once, on its dataclass field; `add_flags` turns the
fields into `--kebab-case` flags and `from_args` builds the config back from parsed arguments.
A field's `metadata` says the rest:

- `help`: the flag's help ("(default: X)" is appended);
- `env`: an environment variable whose value, when set, replaces the default;
- `flag`: the flag's name when it is not the field's (`--request-timeout` for
  `request_timeout_s`); the parsed attribute is named after the flag, as argparse names it;
- `negate`: a bool field set by a store_true flag that means its opposite (`--direct` for
  `auth`);
- `metavar`, `choices` (or a `Literal[...]` annotation);
- `parse`: a function from the flag's one text to the field's value, for a syntax of its own
  (`--every 2m`, `--steps 5,25,100`); its ValueError is argparse's error message;
- `format`: the default as the help shows it, in the flag's syntax (`parse`'s inverse);
- `secret`: `describe` masks the value.

Types: int, float, str, Path, bool (default False: `--x`; default True: `--x/--no-x`),
`X | None`, `Literal[...]`, `tuple[X, ...]`/`list[X]` (repeat the flag; `nargs` with
`metadata={"nargs": "+"}`), `dict[str, str]` (repeat `--flag KEY=VALUE`). A field whose type is
a dataclass contributes its own fields' flags (their names must not collide).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

_MISSING = dataclasses.MISSING
_SCALARS: tuple[type, ...] = (int, float, str, Path)


def add_flags(parser: argparse.ArgumentParser, cls: type, *, skip: Iterable[str] = (),
              required: Iterable[str] = ()) -> None:
    """A flag per init field of dataclass `cls` (and of its dataclass-typed fields), except
    `skip`; fields without a default, and those in `required`, are required flags."""
    skip, required = frozenset(skip), frozenset(required)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        if _is_config(hints[f.name]):
            add_flags(parser, hints[f.name], skip=skip, required=required)
        else:
            _add_flag(parser, f, hints[f.name], f.name in required)


def from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """`cls` built from flags that `add_flags` added; `overrides` (field names, nested ones
    included) win, and a field with no flag and no override keeps its default. A skipped
    field whose name is still an attribute of `args` (a hand-written flag) is read from it:
    override it when it means something else."""
    unknown = set(overrides) - _names(cls)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    return _build(cls, args, overrides)


def describe(config: Any) -> str:
    """One line `name=value ...` of a config (nested ones flattened), secrets masked."""
    parts = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            parts.append(describe(value))
        else:
            shown = "***" if f.metadata.get("secret") and value else value
            parts.append(f"{f.name}={shown}")
    return " ".join(parts)


# ---- one flag ----------------------------------------------------------------------------

def flag_name(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def dest(f: dataclasses.Field[Any]) -> str:
    """The parsed attribute: argparse's name for the flag (`--model` -> `model`)."""
    return flag_name(f).lstrip("-").replace("-", "_")


def field_default(f: dataclasses.Field[Any]) -> Any:
    """The field's default (a factory's product); MISSING when it has none."""
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


def _add_flag(parser: argparse.ArgumentParser, f: dataclasses.Field[Any], kind: Any,
              required: bool) -> None:
    meta: Mapping[str, Any] = f.metadata
    base, _ = _unwrap_optional(kind)
    default = field_default(f)
    env = meta.get("env")
    if env and os.environ.get(env) not in (None, ""):
        default = _convert(base, os.environ[env], meta)
    kwargs: dict[str, Any] = {"dest": dest(f)}
    if "metavar" in meta:
        kwargs["metavar"] = meta["metavar"]
    shown_default = field_default(f)
    if "format" in meta and shown_default not in (_MISSING, None):
        shown_default = meta["format"](shown_default)
    shown = _default_text(shown_default, env)
    if base is bool:
        kwargs.update(_bool_kwargs(bool(default) if default is not _MISSING else False,
                                   meta.get("negate", False)))
        # a store_true flag is off unless given; argparse adds its own text to --x/--no-x
        # unless the help has one
        optional = kwargs["action"] is argparse.BooleanOptionalAction
        shown = "(default: %(default)s)" if optional else ""
    else:
        kwargs.update(_value_kwargs(base, meta, default))
    if default is _MISSING or required:
        kwargs["required"] = True
        shown = ""
    help_text = meta.get("help", "").replace("%", "%%")
    kwargs["help"] = " ".join(part for part in (help_text, shown) if part) or None
    parser.add_argument(flag_name(f), **kwargs)


def _bool_kwargs(default: bool, negate: bool) -> dict[str, Any]:
    if negate:  # `--direct` sets auth=False: the flag is the field's opposite
        return {"action": "store_true", "default": not default}
    if default:
        return {"action": argparse.BooleanOptionalAction, "default": True}
    return {"action": "store_true", "default": False}


def _value_kwargs(base: Any, meta: Mapping[str, Any], default: Any) -> dict[str, Any]:
    if "parse" in meta:  # argparse runs `type` on a str default only: the field's is kept
        return {"type": _parse_text(meta["parse"]),
                "default": None if default is _MISSING else default}
    origin, params = typing.get_origin(base), typing.get_args(base)
    if origin is typing.Literal:
        return {"type": type(params[0]), "choices": params,
                "default": None if default is _MISSING else default}
    if origin in (tuple, list):
        item = params[0] if params else str
        if "nargs" in meta:
            return {"type": item, "nargs": meta["nargs"],
                    "default": None if default is _MISSING else list(default)}
        # append onto None: argparse would extend a default list in place
        return {"type": item, "action": "append", "default": None}
    if origin is dict:
        return {"type": _pair, "action": "append", "default": None,
                "metavar": meta.get("metavar", "KEY=VALUE")}
    if base not in _SCALARS:
        raise TypeError(f"no flag for a field of type {base!r}")
    kwargs: dict[str, Any] = {"type": base, "default": None if default is _MISSING else default}
    if "choices" in meta:
        kwargs["choices"] = meta["choices"]
    return kwargs


def _default_text(default: Any, env: str | None) -> str:
    if default is _MISSING:
        return f"(default: ${env})" if env else ""
    if isinstance(default, (tuple, list, dict)) and not default:
        default = None
    if default is None:
        return f"(default: ${env}, else none)" if env else ""
    return f"(default: {default}{f', or ${env}' if env else ''})"


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _parse_text(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` as an argparse `type`: its ValueError's message is the one shown."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    convert.__name__ = getattr(parse, "__name__", "parse")
    return convert


def _convert(base: Any, text: str, meta: Mapping[str, Any]) -> Any:
    if "parse" in meta:
        return meta["parse"](text)
    if base is bool:
        return text.strip().lower() in ("1", "true", "yes", "on")
    if typing.get_origin(base) is typing.Literal:
        return text
    return base(text)


def _unwrap_optional(kind: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (kind, False)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return kind, False


def _is_config(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


# ---- back to a config --------------------------------------------------------------------

def _names(cls: type) -> set[str]:
    hints = typing.get_type_hints(cls)
    names = set()
    for f in dataclasses.fields(cls):
        names.add(f.name)
        if _is_config(hints[f.name]):
            names |= _names(hints[f.name])
    return names


def _build(cls: type, args: argparse.Namespace, overrides: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in overrides:
            kwargs[f.name] = overrides[f.name]
        elif _is_config(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], args, overrides)
        elif hasattr(args, dest(f)):
            value = _value(f, hints[f.name], getattr(args, dest(f)))
            if value is not _MISSING:
                kwargs[f.name] = value
    return cls(**kwargs)


def _value(f: dataclasses.Field[Any], kind: Any, value: Any) -> Any:
    """A parsed value as the field holds it; MISSING: keep the field's default."""
    base, _ = _unwrap_optional(kind)
    origin = typing.get_origin(base)
    if base is bool and f.metadata.get("negate"):
        return not value
    if origin in (tuple, list, dict) and value is None:
        return _MISSING  # repeatable flag not given
    if origin is tuple:
        return tuple(value)
    if origin is list:
        return list(value)
    if origin is dict:
        return dict(value)
    return value


# ---- flags added on first use ------------------------------------------------------------

class DeferredParser(argparse.ArgumentParser):
    """A (sub)command parser whose flags may be added when it is first used: a component's
    config lives next to its code, whose imports (aiohttp, torch, ...) `ferry --version` or
    `ferry keys list` should not pay for. argparse hands a subcommand's arguments to its
    parser's `parse_known_args`, and help or an error formats it first: all of them run
    `ready()` before."""

    _deferred: list[Callable[[argparse.ArgumentParser], None]]

    def defer(self, add: Callable[[argparse.ArgumentParser], None]) -> None:
        """Run `add(self)` before this parser is first used."""
        self.__dict__.setdefault("_deferred", []).append(add)

    def ready(self) -> argparse.ArgumentParser:
        """Add the deferred flags now (idempotent); returns the parser."""
        pending = self.__dict__.pop("_deferred", [])
        for add in pending:
            add(self)
        return self

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self.ready()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.ready()
        return super().format_usage()

    def format_help(self) -> str:
        self.ready()
        return super().format_help()
