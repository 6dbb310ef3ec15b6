"""Export the records as JSON Schema files for producers in other languages.

`python -m schemas.export` (or `ferry schemas export`) rewrites `schemas/json/`; a test
fails when the committed files and the code disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson

from schemas.fields import json_schema
from schemas.messages import Cancel, DeadLetter, Delta, Request, Result

JSON_DIR = Path(__file__).parent / "json"
RECORDS: dict[str, type] = {"request": Request, "result": Result, "delta": Delta,
                             "cancel": Cancel, "dead_letter": DeadLetter}


def schema_files() -> dict[str, bytes]:
    """File name -> exact bytes of every exported schema."""
    out = {}
    for name, cls in RECORDS.items():
        schema: dict[str, Any] = json_schema(cls, f"ferry.{name}")
        out[f"{name}.schema.json"] = orjson.dumps(schema, option=orjson.OPT_INDENT_2) + b"\n"
    return out


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
