"""Field specs shared by validation and JSON Schema export, so the two cannot disagree.

A record is a dataclass whose fields carry `spec(...)` metadata. `from_dict` validates a
parsed JSON object against the fields and names the first offending field; `json_schema`
renders the same fields as JSON Schema (draft 2020-12) for producers in other languages.
Rules across fields that a record's `__post_init__` checks are spelled for JSON Schema in its
`json_schema_rules` class attribute.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from enum import Enum
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from schemas.errors import SchemaError

T = TypeVar("T")
_MISSING = object()
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def spec(description: str, **constraints: Any) -> dict[str, Any]:
    """Field metadata: a description plus JSON Schema keywords (minimum, maxLength, pattern...;
    `items` constrains a list's members, `propertyNames` and `additionalProperties` a dict's
    keys and values)."""
    return {"description": description, "constraints": constraints}


def _optional_inner(tp: Any) -> Any | None:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0]
    return None


def _union_members(tp: Any) -> tuple[Any, ...] | None:
    """The members of a union of several JSON kinds (`str | list[Part] | None`)."""
    return get_args(tp) if get_origin(tp) in (Union, types.UnionType) else None


def _json_kind(tp: Any) -> str:
    """The JSON kind a type reads: a union picks its member by the kind of the value."""
    if tp is type(None):
        return "null"
    if get_origin(tp) is list:
        return "array"
    if dataclasses.is_dataclass(tp) or get_origin(tp) is dict:
        return "object"
    if tp in _JSON_TYPES:
        return _JSON_TYPES[tp]
    raise TypeError(f"unsupported union member {tp!r}")  # a bug in a record, not bad input


def _kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {str: "string", list: "array", dict: "object", int: "integer",
            float: "number"}.get(type(value), type(value).__name__)


def _check_constraints(path: str, value: Any, constraints: dict[str, Any]) -> None:
    if "minimum" in constraints and value < constraints["minimum"]:
        raise SchemaError(path, f"must be >= {constraints['minimum']}, got {value}")
    if "maximum" in constraints and value > constraints["maximum"]:
        raise SchemaError(path, f"must be <= {constraints['maximum']}, got {value}")
    if "exclusiveMinimum" in constraints and value <= constraints["exclusiveMinimum"]:
        raise SchemaError(path, f"must be > {constraints['exclusiveMinimum']}, got {value}")
    if "minLength" in constraints and len(value) < constraints["minLength"]:
        raise SchemaError(path, f"must have at least {constraints['minLength']} characters")
    if "maxLength" in constraints and len(value) > constraints["maxLength"]:
        raise SchemaError(path, f"must have at most {constraints['maxLength']} characters")
    if "minItems" in constraints and len(value) < constraints["minItems"]:
        raise SchemaError(path, f"must have at least {constraints['minItems']} items")
    if "maxItems" in constraints and len(value) > constraints["maxItems"]:
        raise SchemaError(path, f"must have at most {constraints['maxItems']} items")
    if "pattern" in constraints:
        if re.fullmatch(constraints["pattern"], value) is None:
            raise SchemaError(path, f"must match {constraints['pattern']}, got {value!r}")


def _convert(path: str, tp: Any, value: Any) -> Any:
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _convert(path, inner, value)
    if (members := _union_members(tp)) is not None:
        kinds = {_json_kind(m): m for m in members}
        kind = _kind_of(value)
        if kind == "integer" and "integer" not in kinds:
            kind = "number"  # JSON has one kind of number; an int may fill a float
        if kind not in kinds:
            raise SchemaError(path, f"must be {' or '.join(kinds)}, got {_kind_of(value)}")
        return None if value is None else _convert(path, kinds[kind], value)
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise SchemaError(path, f"must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise SchemaError(path, f"must be an array, got {type(value).__name__}")
        (item,) = get_args(tp)
        if item in (int, str) and all(type(v) is item for v in value):
            return value  # token ids and strings, the long lists: valid as they are
        return [_convert(f"{path}[{i}]", item, v) for i, v in enumerate(value)]
    if origin is dict:  # JSON object keys are strings; the values share one type
        if not isinstance(value, dict):
            raise SchemaError(path, f"must be an object, got {type(value).__name__}")
        _, item = get_args(tp)
        return {k: _convert(f"{path}.{k}", item, v) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=path + ".")
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            raise SchemaError(path, f"must be one of {[m.value for m in tp]}, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(path, f"must be a number, got {type(value).__name__}")
        return float(value)
    if tp in (int, str, bool):
        if isinstance(value, bool) != (tp is bool) or not isinstance(value, tp):
            raise SchemaError(path, f"must be {_JSON_TYPES[tp]}, got {type(value).__name__}")
        return value
    raise TypeError(f"unsupported field type {tp!r}")  # a bug in a record, not bad input


@functools.cache
def _record(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field], list[str]]:
    """A record's resolved field types, its fields and its tag fields (Literal-typed), once:
    resolving the annotations took most of the time of validating a small record."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return hints, fields, [n for n in fields if get_origin(hints[n]) is Literal]


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Validate a parsed JSON object into record `cls`; SchemaError names the first bad field."""
    if not isinstance(data, dict):
        raise SchemaError(prefix.rstrip(".") or "$", f"must be an object, got {type(data).__name__}")
    hints, fields, tags = _record(cls)
    for name in tags:  # tags first: an object of another kind is named by its tag
        if name in data:
            _convert(prefix + name, hints[name], data[name])
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SchemaError(prefix + unknown[0], "unknown field")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        path = prefix + name
        value = data.get(name, _MISSING)
        if value is _MISSING:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SchemaError(path, "is required")
            continue
        kwargs[name] = _convert(path, hints[name], value)
        if kwargs[name] is not None:
            constraints = f.metadata.get("constraints", {})
            _check_constraints(path, kwargs[name], constraints)
            if isinstance(kwargs[name], list) and (items := constraints.get("items")):
                for i, v in enumerate(kwargs[name]):
                    _check_constraints(f"{path}[{i}]", v, items)
            if isinstance(kwargs[name], dict):
                for k, v in kwargs[name].items():
                    if keys := constraints.get("propertyNames"):
                        _check_constraints(f"{path}.{k}", k, keys)
                    if values := constraints.get("additionalProperties"):
                        _check_constraints(f"{path}.{k}", v, values)
    try:
        return cls(**kwargs)
    except SchemaError as exc:  # a nested record's own checks name their field within it
        if not prefix:
            raise
        raise SchemaError(prefix + exc.field, exc.reason) from None


def _type_schema(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    inner = _optional_inner(tp)
    if inner is not None:
        return {"anyOf": [_type_schema(inner, defs), {"type": "null"}]}
    if (members := _union_members(tp)) is not None:
        return {"anyOf": [{"type": "null"} if m is type(None) else _type_schema(m, defs)
                          for m in members]}
    origin = get_origin(tp)
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    if origin is list:
        return {"type": "array", "items": _type_schema(get_args(tp)[0], defs)}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(get_args(tp)[1], defs)}
    if isinstance(tp, type) and issubclass(tp, Enum):
        return {"enum": [m.value for m in tp]}
    if dataclasses.is_dataclass(tp):
        defs[tp.__name__] = _object_schema(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    return {"type": _JSON_TYPES[tp]}


def _object_schema(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    props: dict[str, Any] = {}
    required = []
    for f in dataclasses.fields(cls):
        schema = _type_schema(hints[f.name], defs)
        constraints = dict(f.metadata.get("constraints", {}))
        target = schema["anyOf"][0] if "anyOf" in schema else schema  # the non-null branch
        for nested in ("items", "additionalProperties"):  # constraints on members
            if nested in constraints:
                target[nested] = {**target[nested], **constraints.pop(nested)}
        target.update(constraints)
        if "description" in f.metadata:
            schema["description"] = f.metadata["description"]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
        elif f.default is not dataclasses.MISSING and not dataclasses.is_dataclass(f.default):
            schema["default"] = f.default
        props[f.name] = schema
    # Rules across fields that __post_init__ checks (a class attribute, not a field).
    rules = getattr(cls, "json_schema_rules", {})
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": False, **rules}


def json_schema(cls: type, title: str) -> dict[str, Any]:
    defs: dict[str, Any] = {}
    body = _object_schema(cls, defs)
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": title,
              "description": (cls.__doc__ or "").strip(), **body}
    if defs:
        schema["$defs"] = dict(sorted(defs.items()))
    return schema
