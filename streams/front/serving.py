"""Which deployments have a worker now: their worker group has members, from a cached admin
lookup. `/v1/models` lists only what can be served; a deployment the deployer manages is
judged by its registry status, one started by hand (`ferry worker`) by its group."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.admin import DescribeGroupsRequest_v2
from aiokafka.protocol.api import Request

from edge.kafka_clients import client_options
from schemas.topics import worker_group


class _DescribeGroups(Request[DescribeGroupsRequest_v2]):
    """DescribeGroups pinned to v2: aiokafka 0.14 decodes v3 answers with the v2 layout and
    fails (AIOKafkaAdminClient.describe_consumer_groups breaks the connection)."""

    API_KEY = 15

    def __init__(self, groups: list[str]) -> None:
        self._groups = groups

    def build(self, request_struct_class: type[DescribeGroupsRequest_v2]
              ) -> DescribeGroupsRequest_v2:
        return request_struct_class(self._groups)


class WorkerGroups:
    """`staffed(deployments)`: those whose worker group has at least one member, as of at
    most `ttl_s` ago (one DescribeGroups per coordinator per interval)."""

    def __init__(self, bootstrap: str, ttl_s: float = 2.0) -> None:
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_options())
        self._ttl_s = ttl_s
        self._members: dict[str, tuple[int, float]] = {}  # group -> (members, monotonic at)
        self._coordinators: dict[str, int] = {}
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self._admin.start()

    async def close(self) -> None:
        await self._admin.close()

    async def staffed(self, deployments: Iterable[str]) -> set[str]:
        groups = {worker_group(d): d for d in deployments}
        async with self._lock:
            now = time.monotonic()
            stale = [g for g in groups if now - self._members.get(g, (0, -1e18))[1] > self._ttl_s]
            if stale:
                await self._describe(stale, now)
            return {d for g, d in groups.items() if self._members[g][0] > 0}

    async def _describe(self, groups: list[str], now: float) -> None:
        by_node: dict[int, list[str]] = {}
        for group in groups:
            if group not in self._coordinators:
                self._coordinators[group] = await self._admin.find_coordinator(group)
            by_node.setdefault(self._coordinators[group], []).append(group)
        for node, names in by_node.items():
            response = await self._admin._client.send(node, _DescribeGroups(names))
            # (error_code, group, state, protocol_type, protocol, members)
            for error, group, _state, _ptype, _protocol, members, *_ in response.groups:
                self._members[group] = (len(members) if error == 0 else 0, now)
                if error != 0:  # e.g. the coordinator moved: look it up again next time
                    self._coordinators.pop(group, None)
        for group in groups:  # a group the answer left out has no members we know of
            self._members.setdefault(group, (0, now))
