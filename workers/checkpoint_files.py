"""The files of a Hugging Face layout checkpoint directory, named once for those who write
it (models/factory.py, models/trainer.py, workers/reshard.py) and those who read it (the
loader, the deployer's judge). No torch here: the deployer imports it.

The directory holds `config.json`, the weights as `model.safetensors` or as shards listed by
`model.safetensors.index.json`, and, once a trainer has finished writing it, an empty
`COMPLETE` marker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
COMPLETE = "COMPLETE"  # written last, empty: every other file is in place


def weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> file from the index, or {"": file} for a single-file checkpoint;
    FileNotFoundError for a missing file, ValueError for an unreadable index."""
    if (index := path / INDEX_FILE).is_file():
        weight_map = read_json(index).get("weight_map")
        if (not isinstance(weight_map, dict) or not weight_map
                or not all(isinstance(f, str) for f in weight_map.values())):
            raise ValueError(f"{index}: no weight_map of tensor name -> file")
        files = {name: path / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise FileNotFoundError(f"{file}: shard named in {index} is missing")
        return files
    if (single := path / SINGLE_FILE).is_file():
        return {"": single}
    raise FileNotFoundError(f"{path / SINGLE_FILE}: missing (and no {INDEX_FILE})")


def read_json(file: Path) -> dict[str, Any]:
    """A JSON object file; ValueError naming the file when it is not one."""
    try:
        value = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file}: not a JSON object")
    return value
