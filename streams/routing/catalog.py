"""Which deployments exist: the `ferry.requests.*` topics, from a cached admin lookup (the
router and the gateway), or checked once (`check_deployments`, for the CLI)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from aiokafka.admin import AIOKafkaAdminClient

from edge.kafka_clients import client_options
from edge.topic_admin import list_topics
from schemas.topics import MIRROR_PREFIX, REQUESTS_PREFIX
from streams.routing.registry import read_registry


class DeploymentCatalog:
    """Which deployments exist: the `ferry.requests.*` topics, from a cached admin lookup.

    A name found is trusted for `ttl_s`. A name not found is unknown only if the listing is
    newer than the request (`since`): a topic created a moment before its first request is
    never refused from a stale list. Otherwise the catalog lists again, at most once per
    `min_refresh_s` (waiting for the next allowed listing), so a stream of unknown names
    costs at most two metadata requests a second, and never a timeout.
    """

    def __init__(self, bootstrap: str, ttl_s: float = 30.0, min_refresh_s: float = 0.5) -> None:
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_options())
        self._ttl_s, self._min_refresh_s = ttl_s, min_refresh_s
        self._names: set[str] = set()
        self._listed_at = float("-inf")  # monotonic
        self._listed_wall = float("-inf")  # unix time of the same listing
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self._admin.start()

    async def close(self) -> None:
        await self._admin.close()

    async def names(self, max_age_s: float = 0.0) -> set[str]:
        async with self._lock:
            if time.monotonic() - self._listed_at > max_age_s:
                await self._list()
            return set(self._names)

    async def exists(self, deployment: str, since: float | None = None) -> bool:
        """Whether `deployment` has a request topic, as of unix time `since` (default now)."""
        now = time.time()
        since = now if since is None else min(since, now)  # a clock ahead must not stall us
        if deployment in await self.names(max_age_s=self._ttl_s):
            return True
        async with self._lock:
            if self._listed_wall < since:
                wait = self._listed_at + self._min_refresh_s - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)  # the throttle: at most one listing per interval
                if self._listed_wall < since:  # nobody listed while we waited
                    await self._list()
            return deployment in self._names

    async def _list(self) -> None:
        topics = await self._admin.list_topics()
        self._names = {t[len(REQUESTS_PREFIX):] for t in topics if t.startswith(REQUESTS_PREFIX)}
        self._listed_at, self._listed_wall = time.monotonic(), time.time()


class UnknownDeployment(ValueError):
    """A command named deployments that do not exist (or no longer serve)."""


async def check_deployments(bootstrap: str, names: Iterable[str], *,
                            candidates: bool = False) -> None:
    """Refuse names no deployment answers to, so a typo never becomes a route to nowhere.

    A deployment exists when its request topic does (a worker or the deployer created it);
    a shadow candidate (`candidates`) may instead have only its mirror topic (a `--shadow`
    worker started by hand). One the deployer retired or saw fail is refused too: its topic
    stays for replay, but nothing serves it."""
    wanted = list(dict.fromkeys(names))
    topics = await list_topics(bootstrap)
    missing = [n for n in wanted if REQUESTS_PREFIX + n not in topics
               and not (candidates and MIRROR_PREFIX + n in topics)]
    if missing:
        raise UnknownDeployment(
            f"no deployment {', '.join(map(repr, missing))} (no topic "
            f"{REQUESTS_PREFIX}{missing[0]}): `ferry deployments` lists the deployer's, "
            "--force names one about to be deployed")
    gone = {r.deployment: r.status for r in await read_registry(bootstrap)
            if r.status in ("retired", "failed")}
    if dead := [n for n in wanted if n in gone]:
        raise UnknownDeployment(
            f"deployment {dead[0]!r} is {gone[dead[0]]}: nothing serves it "
            "(`ferry deploy` it again, or --force)")
