"""Control state in compacted topics: every router and gateway reads it whole and follows it.

A compacted topic keeps the last value per key, so it is a small replicated table: writers
(`ferry route set`, `ferry keys add`) put one record, every reader sees it within its next
fetch (well under a second), and a restarted reader rebuilds the table from the topic.
A record with no value (a tombstone) deletes its key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Self

from aiokafka import AIOKafkaProducer, TopicPartition

from edge.kafka_clients import client_options
from edge.reader import TopicReader
from edge.topic_admin import ensure_topics
from schemas import SchemaError, decode, encode
from schemas.topics import CONTROL_PARTITIONS

log = logging.getLogger("ferry.control")

COMPACTED = {"cleanup.policy": "compact", "min.compaction.lag.ms": "0",
             "segment.ms": "3600000"}


async def ensure_control_topic(bootstrap: str, topic: str) -> None:
    await ensure_topics(bootstrap, {topic: CONTROL_PARTITIONS}, configs=COMPACTED)


async def put(bootstrap: str, topic: str, key: str, value: Any | None) -> None:
    """Write (or, with None, delete) one key of a control table and wait for the ack; `value`
    is a record of `schemas.tables` (a plain dict for tables without one)."""
    await ensure_control_topic(bootstrap, topic)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **client_options(), acks="all")
    try:  # start() inside: a write cancelled while connecting still closes its producer
        await producer.start()
        await producer.send_and_wait(topic, None if value is None else encode(value),
                                     key=key.encode())
    finally:
        await producer.stop()


class CompactedView:
    """The latest value per key of a compacted topic, kept current by a background reader.

    `start()` returns once everything written before it has been read, so a component never
    serves with an empty route or key table after a restart. `on_change` callbacks run after
    each record applied. A record that cannot be applied is logged and skipped; a reader
    that dies anyway (the broker, a bug) is logged, `failure` says why, and `on_failure`
    callbacks tell the owner, which stops or reports unhealthy: a table that silently
    stopped following would serve stale routes and revoked keys.
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.values: dict[str, dict[str, Any]] = {}
        self.on_change: list[Callable[[str, dict[str, Any] | None], None]] = []
        self.reader = TopicReader(bootstrap, topic, lambda r: self._apply(r.key, r.value),
                                  at="beginning", after_batch=self._after_batch,
                                  fetch_max_wait_ms=100)
        self._caught_up = asyncio.Event()
        self._targets: dict[TopicPartition, int] = {}
        self._waiters: list[tuple[dict[TopicPartition, int], asyncio.Future[None]]] = []

    @property
    def on_failure(self) -> list[Callable[[BaseException], None]]:
        return self.reader.on_failure

    @property
    def failure(self) -> BaseException | None:
        return self.reader.failure

    @property
    def healthy(self) -> bool:
        return self.reader.healthy

    async def start(self, timeout_s: float = 30.0) -> None:
        await ensure_control_topic(self.bootstrap, self.topic)
        reader = self.reader
        await reader.open()
        assert reader.consumer is not None
        ends = await reader.consumer.end_offsets(reader.partitions)
        self._targets = {tp: off for tp, off in ends.items() if off > 0}
        if not self._targets:
            self._caught_up.set()
        reader.run(f"control table {self.topic}")
        assert reader.task is not None
        caught_up = asyncio.ensure_future(self._caught_up.wait())
        await asyncio.wait([caught_up, reader.task], timeout=timeout_s,
                           return_when=asyncio.FIRST_COMPLETED)
        if not caught_up.done():
            caught_up.cancel()
            if reader.failure is not None:
                raise reader.failure
            raise TimeoutError(f"{self.topic}: not read up to its end within {timeout_s:g}s")

    async def sync(self, timeout_s: float = 30.0) -> None:
        """Return once everything committed to the topic before this call has been read
        (the router calls it after fencing a partition's previous owner)."""
        consumer = self.reader.consumer
        assert consumer is not None, "start() first"
        ends = await consumer.end_offsets(self.reader.partitions)
        if await self._read_up_to(ends):
            return
        waiter: tuple[dict[TopicPartition, int], asyncio.Future[None]] = (
            ends, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter[1]), timeout_s)
        finally:
            self._waiters.remove(waiter)

    async def close(self) -> None:
        await self.reader.close()

    async def _after_batch(self) -> None:
        consumer = self.reader.consumer
        assert consumer is not None
        # By position, not by record offsets: transaction markers take offsets too, and
        # the last one written is never a record.
        for tp, target in list(self._targets.items()):
            if await consumer.position(tp) >= target:
                del self._targets[tp]
        if not self._targets and not self._caught_up.is_set():
            self._caught_up.set()
        for ends, reached in list(self._waiters):
            if not reached.done() and await self._read_up_to(ends):
                reached.set_result(None)

    async def _read_up_to(self, ends: dict[TopicPartition, int]) -> bool:
        consumer = self.reader.consumer
        assert consumer is not None
        for tp, end in ends.items():
            if await consumer.position(tp) < end:
                return False
        return True

    def _apply(self, raw_key: bytes | None, raw_value: bytes | None) -> None:
        if raw_key is None:
            return
        key = raw_key.decode(errors="replace")
        value: dict[str, Any] | None = None
        if raw_value is not None:
            try:
                decoded = decode(raw_value)
            except SchemaError as exc:
                log.warning("%s: unreadable record for %r ignored: %s", self.topic, key, exc)
                return
            if not isinstance(decoded, dict):
                log.warning("%s: record for %r is not an object; ignored", self.topic, key)
                return
            value = decoded
        if value is None:
            self.values.pop(key, None)
        else:
            self.values[key] = value
        for callback in self.on_change:
            callback(key, value)


class ControlTable:
    """A typed reading of one compacted control topic; subclasses interpret `view.values`."""

    topic: ClassVar[str]

    def __init__(self, bootstrap: str) -> None:
        self.view = CompactedView(bootstrap, self.topic)

    @property
    def healthy(self) -> bool:
        return self.view.healthy

    @property
    def failure(self) -> BaseException | None:
        return self.view.failure

    async def start(self) -> None:
        await self.view.start()

    async def close(self) -> None:
        await self.view.close()

    @classmethod
    @asynccontextmanager
    async def snapshot(cls, bootstrap: str) -> AsyncIterator[Self]:
        """The table read up to now, for a one-off look (the CLI, a canary's start)."""
        table = cls(bootstrap)
        await table.start()
        try:
            yield table
        finally:
            await table.close()
