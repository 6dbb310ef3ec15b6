"""The one codec: every producer and consumer turns messages into bytes and back here."""

from __future__ import annotations

from typing import Any

import orjson

from schemas.errors import SchemaError


def encode(obj: Any) -> bytes:
    """Encode a record (dataclass) or plain JSON value; dataclasses are serialised natively."""
    return orjson.dumps(obj)


def decode(raw: bytes | None) -> Any:
    """Parse JSON bytes, raising SchemaError (field "$") for anything that is not JSON."""
    if raw is None:
        raise SchemaError("$", "empty message (null value)")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SchemaError("$", f"not valid JSON: {exc}") from None
