"""Export the records as JSON Schema files for producers in other languages, and the
AsyncAPI document of every topic (`asyncapi.json`, referencing them).

`python -m schemas.export` (or `ferry schemas export`) rewrites `schemas/json/`; a test
fails when the committed files and the code disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson

from schemas.asyncapi import document
from schemas.events import CheckpointEvent, Comparison, Telemetry
from schemas.fields import json_schema
from schemas.messages import Cancel, DeadLetter, Delta, Request, Result
from schemas.tables import (
    ApiKeyRecord, DeploymentRecord, QuotaState, RouteRecord, ShadowRecord, TenantRecord,
)

JSON_DIR = Path(__file__).parent / "json"
ASYNCAPI_FILE = "asyncapi.json"
# Every record that crosses Kafka, by the name of its schema file (NAME.schema.json).
RECORDS: dict[str, type] = {
    "request": Request, "result": Result, "delta": Delta, "cancel": Cancel,
    "dead_letter": DeadLetter, "route": RouteRecord, "shadow": ShadowRecord,
    "api_key": ApiKeyRecord, "tenant": TenantRecord, "deployment": DeploymentRecord,
    "quota_state": QuotaState, "checkpoint_event": CheckpointEvent, "telemetry": Telemetry,
    "comparison": Comparison}


def schema_files() -> dict[str, bytes]:
    """File name -> exact bytes of every exported schema and of the AsyncAPI document."""
    out = {}
    for name, cls in RECORDS.items():
        schema: dict[str, Any] = json_schema(cls, f"ferry.{name}")
        out[f"{name}.schema.json"] = _json(schema)
    out[ASYNCAPI_FILE] = _json(document())
    return out


def _json(value: dict[str, Any]) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n"


def write(directory: Path = JSON_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in schema_files().items():
        (directory / name).write_bytes(data)
        written.append(directory / name)
    return written


if __name__ == "__main__":
    for path in write(Path(sys.argv[1]) if len(sys.argv) > 1 else JSON_DIR):
        print(path)
