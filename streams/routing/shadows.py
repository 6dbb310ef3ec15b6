"""Shadow configuration: which candidates get a copy of an alias's traffic, and how much.

Kept in the compacted `ferry.shadow` topic (alias -> {candidates, percent}), read whole by
every router. Whether a request is mirrored is a pure function of its id, so every router
instance mirrors the same requests, and independent of the A/B split (another salt).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from edge.tables import ControlTable, put
from schemas import SchemaError
from schemas.fields import from_dict
from schemas.tables import ShadowRecord
from schemas.topics import SHADOW_TOPIC
from streams.routing.routes import NAME, parse_weights, point

log = logging.getLogger("ferry.shadow")


@dataclass(frozen=True)
class Shadow:
    alias: str
    candidates: tuple[str, ...]
    percent: float  # share of the alias's requests copied to every candidate, 0..100

    def mirrors(self, request_id: str) -> bool:
        return point(request_id + "#shadow") * 100 < self.percent


class ShadowTable(ControlTable):
    topic = SHADOW_TOPIC

    def __init__(self, bootstrap: str) -> None:
        super().__init__(bootstrap)
        self._shadows: dict[str, Shadow] = {}  # validated once per change, read per request
        self.view.on_change.append(self._changed)

    def _changed(self, alias: str, value: dict[str, Any] | None) -> None:
        self._shadows.pop(alias, None)
        if value is not None:
            try:
                record = from_dict(ShadowRecord, value)
            except SchemaError as exc:  # a row that does not fit: no mirroring, said once
                log.warning("%s: shadow of %r ignored: %s", SHADOW_TOPIC, alias, exc)
                return
            self._shadows[alias] = Shadow(alias, tuple(record.candidates), record.percent)

    def get(self, alias: str) -> Shadow | None:
        return self._shadows.get(alias)

    def all(self) -> dict[str, Shadow]:
        return dict(self._shadows)


async def set_shadow(bootstrap: str, alias: str, candidates: list[str],
                     percent: float) -> Shadow:
    if not NAME.fullmatch(alias):
        raise ValueError(f"alias: {alias!r} is not a valid name")
    parse_weights(candidates)  # the same name rules as deployments in routes
    if not candidates:
        raise ValueError("candidate: at least one is needed")
    if not 0 < percent <= 100:
        raise ValueError(f"percent: must be in (0, 100], got {percent:g}")
    shadow = Shadow(alias, tuple(candidates), percent)
    await put(bootstrap, SHADOW_TOPIC, alias, ShadowRecord(list(candidates), percent))
    return shadow


async def shadow_off(bootstrap: str, alias: str) -> None:
    await put(bootstrap, SHADOW_TOPIC, alias, None)


async def read_shadows(bootstrap: str) -> dict[str, Shadow]:
    async with ShadowTable.snapshot(bootstrap) as table:
        return table.all()
