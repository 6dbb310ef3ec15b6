"""A deployment's backlog: the Kafka lag of its worker group, for the gateway's busy check.

Lag = end offset - committed offset, summed over the deployment's request partitions
(from the log start where the group has committed nothing yet). Workers commit only once
a request is answered, so the lag counts what is queued and what is running. Samples are
cached for `ttl_s` so a busy gateway costs the broker two small requests per deployment per
interval, and two samples give the drain rate used for `Retry-After`.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from edge.kafka_clients import client_options
from edge.topic_admin import topic_partitions
from schemas.topics import requests_topic, worker_group


@dataclass
class Sample:
    lag: int
    committed: int  # total committed offset, to measure the drain rate
    at: float
    drain_per_s: float | None = None


class BacklogProbe:
    def __init__(self, bootstrap: str, ttl_s: float = 0.5) -> None:
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_options())
        self._offsets = AIOKafkaConsumer(bootstrap_servers=bootstrap, **client_options(),
                                         enable_auto_commit=False)
        self._ttl_s = ttl_s
        self._samples: dict[str, Sample] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def start(self) -> None:
        await self._admin.start()
        await self._offsets.start()

    async def close(self) -> None:
        await self._offsets.stop()
        await self._admin.close()

    async def sample(self, deployment: str) -> Sample:
        lock = self._locks.setdefault(deployment, asyncio.Lock())
        async with lock:  # one broker round trip per deployment per interval, however busy
            last = self._samples.get(deployment)
            if last is not None and time.monotonic() - last.at < self._ttl_s:
                return last
            sample = await self._measure(deployment, last)
            self._samples[deployment] = sample
            return sample

    async def _measure(self, deployment: str, last: Sample | None) -> Sample:
        tps = await topic_partitions(self._offsets, requests_topic(deployment))
        if not tps:
            return Sample(0, 0, time.monotonic())
        ends = await self._offsets.end_offsets(tps)
        starts = await self._offsets.beginning_offsets(tps)
        committed = await self._admin.list_consumer_group_offsets(worker_group(deployment),
                                                                  partitions=tps)
        positions = {tp: max(meta.offset, starts[tp]) if meta is not None and meta.offset >= 0
                     else starts[tp] for tp in tps for meta in [committed.get(tp)]}
        now = time.monotonic()
        total = sum(positions.values())
        sample = Sample(sum(max(0, ends[tp] - positions[tp]) for tp in tps), total, now)
        if last is not None and now > last.at:
            rate = (total - last.committed) / (now - last.at)
            # Keep the last known rate through idle samples: an idle queue says nothing of speed.
            sample.drain_per_s = rate if rate > 0 else last.drain_per_s
        return sample


def retry_after_s(sample: Sample, max_lag: int) -> int:
    """Seconds until the backlog is likely under the threshold again (1..60)."""
    excess = sample.lag - max_lag + 1
    if not sample.drain_per_s:
        return 1
    return max(1, min(60, math.ceil(excess / sample.drain_per_s)))
