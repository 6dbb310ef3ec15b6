"""The layers hold: schemas <- edge <- workers <- models <- streams <- ferry, and inside
streams routing <- front, rollout (shadow alone). Read from the imports, no broker."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["schemas", "edge", "workers", "models", "streams", "ferry"]
ROOMS = {"routing": set(), "front": {"routing"}, "rollout": {"front", "routing"},
         "shadow": set()}


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports in functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", ORDER)
def test_no_import_goes_up_the_layers(package: str) -> None:
    above = set(ORDER[ORDER.index(package) + 1:]) | {"tests"}
    wrong = {f"{path.relative_to(ROOT)} imports {name}" for path in files(package)
             for name in imports(path) if name.split(".")[0] in above}
    assert not wrong


@pytest.mark.parametrize("room", ROOMS)
def test_rooms_of_streams_import_only_the_rooms_below(room: str) -> None:
    allowed = ROOMS[room] | {room}
    wrong = {f"{path.relative_to(ROOT)} imports {name}" for path in files(f"streams/{room}")
             for name in imports(path)
             if name.startswith("streams.") and name.split(".")[1] not in allowed}
    assert not wrong


def test_the_check_sees_a_wrong_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from streams.front.gateway import serve\n")
    assert "streams.front.gateway" in imports(bad)
