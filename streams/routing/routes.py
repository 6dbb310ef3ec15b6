"""Routes: an alias maps to deployments with weights; the one routing core of router and gateway.

The choice is a pure function of the request id, so every router and gateway instance sends
the same request to the same deployment, a retry can exclude backends already tried, and a
90/10 split is 90/10 over ids whatever instance handles them.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from edge.tables import ControlTable, put
from schemas import SchemaError
from schemas.fields import from_dict
from schemas.messages import TOPIC_PATTERN
from schemas.tables import NAME_PATTERN, RouteRecord
from schemas.topics import ROUTES_TOPIC
from streams.routing.registry import deployment_name

NAME = re.compile(NAME_PATTERN)
log = logging.getLogger("ferry.routes")


@dataclass(frozen=True)
class Route:
    alias: str
    weights: dict[str, int]  # deployment -> weight (> 0 share; 0 = attached, no traffic)

    def backends(self) -> list[str]:
        return [d for d, w in self.weights.items() if w > 0]

    def record(self) -> RouteRecord:
        return RouteRecord(alias=self.alias, weights=dict(self.weights))


def parse_weights(items: Collection[str]) -> dict[str, int]:
    """`["dep-a=90", "dep-b=10"]` -> {"dep-a": 90, "dep-b": 10}; a bare name weighs 100."""
    weights: dict[str, int] = {}
    for item in items:
        name, _, weight = item.partition("=")
        if not NAME.fullmatch(name) or not re.fullmatch(TOPIC_PATTERN, "ferry.requests." + name):
            raise ValueError(f"deployment: {name!r} is not a valid deployment name")
        try:
            value = int(weight) if weight else 100
        except ValueError:
            raise ValueError(f"weight of {name}: {weight!r} is not an integer") from None
        if value < 0:
            raise ValueError(f"weight of {name}: must be >= 0, got {value}")
        weights[name] = value
    if not weights or sum(weights.values()) <= 0:
        raise ValueError("weights: at least one deployment needs a weight above 0")
    return weights


def point(request_id: str) -> float:
    """A uniform number in [0, 1) fixed by the request id."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def pick(weights: Mapping[str, int], request_id: str,
         exclude: Collection[str] = ()) -> str | None:
    """The deployment for `request_id` by weight, skipping `exclude`; None when none is left."""
    live = [(d, w) for d, w in sorted(weights.items()) if w > 0 and d not in exclude]
    total = sum(w for _, w in live)
    if total <= 0:
        return None
    target = point(request_id) * total
    for deployment, weight in live:
        target -= weight
        if target < 0:
            return deployment
    return live[-1][0]


class RouteTable(ControlTable):
    """Routes from the compacted `ferry.routes` topic, current within a fetch."""

    topic = ROUTES_TOPIC

    def __init__(self, bootstrap: str) -> None:
        super().__init__(bootstrap)
        self._routes: dict[str, Route] = {}  # validated once per change, read per request
        self.view.on_change.append(self._changed)

    def _changed(self, alias: str, value: dict[str, Any] | None) -> None:
        self._routes.pop(alias, None)
        if value is not None:
            try:
                self._routes[alias] = Route(alias, from_dict(RouteRecord, value).weights)
            except SchemaError as exc:  # a row that does not fit: no route, said once
                log.warning("%s: route %r ignored: %s", ROUTES_TOPIC, alias, exc)

    def get(self, alias: str) -> Route | None:
        return self._routes.get(alias)

    def aliases(self) -> dict[str, Route]:
        return dict(self._routes)

    def resolve(self, model: str, request_id: str, exclude: Collection[str] = ()) -> str | None:
        """The deployment to serve `model`: by its route when it is an alias, else the name
        itself (a deployment addressed directly); None when every backend is excluded."""
        route = self.get(model)
        if route is None:
            name, sep, version = model.partition("@")  # NAME@VERSION of a deployed checkpoint
            direct = deployment_name(name, version) if sep else model
            return None if direct in exclude else direct
        return pick(route.weights, request_id, exclude)


async def set_route(bootstrap: str, alias: str, weights: dict[str, int]) -> Route:
    if not NAME.fullmatch(alias):
        raise ValueError(f"alias: {alias!r} is not a valid name")
    route = Route(alias, dict(weights))
    await put(bootstrap, ROUTES_TOPIC, alias, route.record())
    return route


async def delete_route(bootstrap: str, alias: str) -> None:
    await put(bootstrap, ROUTES_TOPIC, alias, None)


async def read_routes(bootstrap: str) -> dict[str, Route]:
    """A snapshot of every route (for the CLI and the canary controller)."""
    async with RouteTable.snapshot(bootstrap) as table:
        return table.aliases()
