"""Shadow configuration: which candidates get a copy of an alias's traffic, and how much.

Kept in the compacted `ferry.shadow` topic (alias -> {candidates, percent}), read whole by
every router. Whether a request is mirrored is a pure function of its id, so every router
instance mirrors the same requests, and independent of the A/B split (another salt).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from schemas.topics import SHADOW_TOPIC
from streams.control import ControlTable, put
from streams.routes import NAME, parse_weights, point


@dataclass(frozen=True)
class Shadow:
    alias: str
    candidates: tuple[str, ...]
    percent: float  # share of the alias's requests copied to every candidate, 0..100

    def mirrors(self, request_id: str) -> bool:
        return point(request_id + "#shadow") * 100 < self.percent


class ShadowTable(ControlTable):
    topic = SHADOW_TOPIC

    def get(self, alias: str) -> Shadow | None:
        value = self.view.values.get(alias)
        if not value:
            return None
        candidates = value.get("candidates")
        percent = value.get("percent")
        if not isinstance(candidates, list) or not isinstance(percent, (int, float)):
            return None
        return Shadow(alias, tuple(str(c) for c in candidates), float(percent))

    def all(self) -> dict[str, Shadow]:
        return {a: s for a in list(self.view.values) if (s := self.get(a)) is not None}


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
    await put(bootstrap, SHADOW_TOPIC, alias, {"candidates": list(candidates),
                                               "percent": percent, "updated_at": time.time()})
    return shadow


async def shadow_off(bootstrap: str, alias: str) -> None:
    await put(bootstrap, SHADOW_TOPIC, alias, None)


async def read_shadows(bootstrap: str) -> dict[str, Shadow]:
    async with ShadowTable.snapshot(bootstrap) as table:
        return table.all()
