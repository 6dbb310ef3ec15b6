"""Reading every partition of one topic without a consumer group, as Ferry's readers do.

`assigned_consumer` is the shared start: a consumer with every partition of the topic,
positioned where the reader begins (its end: only what is written from now on; or its
beginning: the whole table). `TopicReader` runs a background task over it that fails
loudly: one record that cannot be handled is logged and skipped, and a reader that dies
anyway (the broker, a bug) is logged, `failure` says why and `on_failure` callbacks tell the
owner, which stops or reports unhealthy. A reader that stopped silently would freeze routes
and keys, or leave callers waiting for answers that already came.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from edge.kafka_clients import client_options
from edge.topic_admin import pin_to_end, topic_partitions, watch_reader

log = logging.getLogger("ferry.reader")

Start = Literal["end", "beginning"]


async def assigned_consumer(bootstrap: str, topic: str, at: Start | None = "end",
                            read_committed: bool = True,
                            **options: Any) -> tuple[AIOKafkaConsumer, list[TopicPartition]]:
    """A started consumer assigned every partition of `topic` (none if it does not exist),
    positioned at `at` (None: the caller seeks); the caller stops it."""
    # read_committed: results and tables may be written in transactions, and a record of
    # an aborted one never happened.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, **client_options(), enable_auto_commit=False,
        isolation_level="read_committed" if read_committed else "read_uncommitted", **options)
    await consumer.start()
    try:
        tps = await topic_partitions(consumer, topic)
        consumer.assign(tps)
        if at == "end":
            await pin_to_end(consumer, tps)  # nothing written after this returns is missed
        elif at == "beginning":
            await consumer.seek_to_beginning(*tps)
    except BaseException:
        await consumer.stop()
        raise
    return consumer, tps


class TopicReader:
    """Every record of `topic` from `at` on, passed to `handle` by a background task.

    `after_batch` (optional) runs after each fetch, handled or empty, for readers that track
    how far they have read. Records of one fetch are handled in order."""

    def __init__(self, bootstrap: str, topic: str, handle: Callable[[ConsumerRecord], None],
                 *, at: Start = "end", read_committed: bool = True,
                 after_batch: Callable[[], Awaitable[None]] | None = None,
                 **options: Any) -> None:
        self.bootstrap, self.topic, self.at = bootstrap, topic, at
        self.handle, self.after_batch = handle, after_batch
        self.read_committed, self.options = read_committed, options
        self.consumer: AIOKafkaConsumer | None = None  # made in start(), on the serving loop
        self.partitions: list[TopicPartition] = []
        self.failure: BaseException | None = None
        self.on_failure: list[Callable[[BaseException], None]] = []
        self.task: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        return self.failure is None

    async def start(self, name: str) -> None:
        """Position the consumer, then start reading; `name` is what logs call this reader."""
        await self.open()
        self.run(name)

    async def open(self) -> None:
        """Only position the consumer (for owners that look at it before reading starts)."""
        self.consumer, self.partitions = await assigned_consumer(
            self.bootstrap, self.topic, self.at, self.read_committed, **self.options)

    def run(self, name: str) -> None:
        self.task = watch_reader(self._read(), name, self._failed)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.consumer is not None:
            await self.consumer.stop()

    def _failed(self, exc: BaseException) -> None:
        self.failure = exc
        for callback in self.on_failure:
            callback(exc)

    async def _read(self) -> None:
        assert self.consumer is not None
        while True:
            batches = await self.consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    try:
                        self.handle(record)
                    except Exception:  # one bad record (or callback) must not stop the reader
                        log.exception("%s: record at %d@%d not handled", self.topic,
                                      record.partition, record.offset)
            if self.after_batch is not None:
                await self.after_batch()


async def fair_getmany(consumer: AIOKafkaConsumer, max_records: int,
                       timeout_ms: int) -> dict[TopicPartition, list[ConsumerRecord]]:
    """Up to `max_records` records, each assigned partition first given an equal share.

    aiokafka hands out one partition's buffered fetch before the next partition's, so with
    a backlog on one partition the others wait until it drains: a worker that took over a
    killed member's partitions served its own backlog first (the fault suite saw 19-29 s).
    Waits up to `timeout_ms` for the first records; the rest is what is already buffered,
    taken without giving up the event loop (a getmany with nothing to wait for does not
    suspend), so no rebalance can fall between the calls: as one getmany."""
    owned = sorted(consumer.assignment())
    share = max(1, max_records // max(1, len(owned)))
    records = await consumer.getmany(timeout_ms=timeout_ms, max_records=share)
    left = max_records - sum(map(len, records.values()))
    for tp in owned:
        if left > 0 and tp not in records:
            _merge(records, await consumer.getmany(tp, timeout_ms=0,
                                                   max_records=min(share, left)))
            left = max_records - sum(map(len, records.values()))
    if left > 0 and records:  # room the others did not need: the backlog may have it
        _merge(records, await consumer.getmany(timeout_ms=0, max_records=left))
    return records


def _merge(into: dict[TopicPartition, list[ConsumerRecord]],
           more: dict[TopicPartition, list[ConsumerRecord]]) -> None:
    for tp, batch in more.items():
        into.setdefault(tp, []).extend(batch)
