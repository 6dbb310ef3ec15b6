"""The one choice of a backend, made alike by the gateway and the router.

A request names a model: an alias (routed by weights, `routes.py`), `NAME@VERSION` of a
deployed checkpoint, or a deployment itself. `choose_backend` walks its candidates in
weighted order and takes the first that exists (has a request topic), takes new requests
(the registry: loading, draining and retired deployments do not), and, when a busy check is
given, is not over its backlog. Gateway and router differ only in what they do when nothing
is chosen: the gateway answers 503/404 with the reasons, the router refuses the request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol


class Routes(Protocol):  # streams.routing.routes.RouteTable
    def resolve(self, model: str, request_id: str,
                exclude: Collection[str] = ()) -> str | None: ...


class Catalog(Protocol):  # streams.routing.catalog.DeploymentCatalog
    async def exists(self, deployment: str, since: float | None = None) -> bool: ...


class Lifecycle(Protocol):  # streams.routing.registry.Registry
    def accepts_new(self, deployment: str) -> bool: ...

# Given a deployment: None when it is not busy, else seconds after which to retry.
BusyCheck = Callable[[str], Awaitable[float | None]]


@dataclass
class Choice:
    """The backend chosen (None: none could take the request) and why others were skipped."""

    deployment: str | None = None
    unready: list[str] = field(default_factory=list)  # loading, draining or retired
    busy_retry_s: list[float] = field(default_factory=list)  # per busy deployment


async def choose_backend(model: str, request_id: str, routes: Routes, catalog: Catalog,
                         registry: Lifecycle, tried: set[str], *, pinned: bool = False,
                         busy: BusyCheck | None = None, since: float | None = None) -> Choice:
    """The backend for `model`; every candidate looked at is added to `tried` (and none in
    it is chosen), so a retry asks for the next one. `pinned`: `model` is the deployment
    itself, never resolved by a route. `since`: the request's post time, so a deployment
    whose topic appeared after the catalog's last look is still found."""
    choice = Choice()
    while True:
        if pinned:
            deployment = None if model in tried else model
        else:
            deployment = routes.resolve(model, request_id, exclude=tried)
        if deployment is None:
            return choice
        tried.add(deployment)
        if not await catalog.exists(deployment, since):
            continue  # an alias may name a deployment that is not up yet
        if not registry.accepts_new(deployment):
            choice.unready.append(deployment)
            continue
        if busy is not None and (retry := await busy(deployment)) is not None:
            choice.busy_retry_s.append(retry)
            continue
        choice.deployment = deployment
        return choice
