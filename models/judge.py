"""When is a checkpoint directory that a training job is writing finished?

At once when the trainer wrote an empty `COMPLETE` file into it; otherwise when every file
its index names exists and is whole (each safetensors header parses and the file is exactly
as long as the header says) and nothing in the directory changed for a settle time. A
half-written checkpoint is never taken: a truncated weights file fails the length check,
and a file still growing fails the settle time.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from workers.checkpoint_files import COMPLETE, CONFIG_FILE, weight_files


@dataclass(frozen=True)
class Readiness:
    complete: bool
    reason: str  # why not (or "COMPLETE marker" / "settled")


def check(directory: Path, settle_s: float, now: float) -> Readiness:
    """Whether `directory` holds a finished checkpoint at time `now` (unix seconds)."""
    if not (directory / CONFIG_FILE).is_file():
        return Readiness(False, f"{CONFIG_FILE}: missing")
    try:
        for file in sorted(set(weight_files(directory).values())):  # each file once
            whole_safetensors(file)
    except (OSError, ValueError) as exc:
        return Readiness(False, str(exc))
    if (directory / COMPLETE).exists():
        return Readiness(True, "COMPLETE marker")
    newest = max(p.stat().st_mtime for p in directory.iterdir())
    if now - newest < settle_s:
        return Readiness(False, f"changed {now - newest:.1f}s ago (settle time {settle_s:g}s)")
    return Readiness(True, "settled")


def whole_safetensors(file: Path) -> None:
    """Raise ValueError naming the file unless its header parses and its size matches."""
    size = file.stat().st_size  # FileNotFoundError (an OSError) names a missing shard
    with file.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{file.name}: too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise ValueError(f"{file.name}: header runs past the end of the file")
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            raise ValueError(f"{file.name}: header is not valid JSON") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
              default=0)
    if 8 + header_len + end != size:
        raise ValueError(f"{file.name}: {size} bytes, header says {8 + header_len + end}")
