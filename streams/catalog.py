"""Which deployments exist: the `ferry.requests.*` topics, from a cached admin lookup."""

from __future__ import annotations

import asyncio
import time

from aiokafka.admin import AIOKafkaAdminClient

from schemas.topics import REQUESTS_PREFIX


class DeploymentCatalog:
    """Which deployments exist: the `ferry.requests.*` topics, from a cached admin lookup.

    A name found is trusted for `ttl_s`; a name not found triggers a fresh listing, at most
    one per `min_refresh_s`, so unknown names cost one metadata request, not a timeout.
    """

    def __init__(self, bootstrap: str, ttl_s: float = 30.0, min_refresh_s: float = 0.5) -> None:
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        self._ttl_s, self._min_refresh_s = ttl_s, min_refresh_s
        self._names: set[str] = set()
        self._listed_at = float("-inf")
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self._admin.start()

    async def close(self) -> None:
        await self._admin.close()

    async def names(self, max_age_s: float = 0.0) -> set[str]:
        async with self._lock:
            if time.monotonic() - self._listed_at > max_age_s:
                topics = await self._admin.list_topics()
                self._names = {t[len(REQUESTS_PREFIX):] for t in topics
                               if t.startswith(REQUESTS_PREFIX)}
                self._listed_at = time.monotonic()
            return set(self._names)

    async def exists(self, deployment: str) -> bool:
        if deployment in await self.names(max_age_s=self._ttl_s):
            return True
        return deployment in await self.names(max_age_s=self._min_refresh_s)
