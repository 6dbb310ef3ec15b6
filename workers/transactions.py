"""Exactly-once answers: each input partition's answers and its commit point in one transaction.

One transactional producer per owned input partition, its id derived from the group, topic
and partition (aiokafka has no KIP-447, so this is what fences a zombie: the partition's
next owner starts a producer with the same id, and the old one can commit nothing more).
A batch of a partition's answers (results, copies, dead letters) is published in one
transaction together with the partition's commit point, whose metadata names the offsets
above it that are answered already (`OffsetTracker.commit_metadata`): requests finish out
of order, and the next owner skips those instead of answering them twice. A consumer that
reads results `read_committed` sees every request answered exactly once, whatever crashed.
Deltas and telemetry are not part of it (they go through the worker's plain producer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from aiokafka.structs import OffsetAndMetadata
from prometheus_client import Histogram

from edge.kafka_clients import client_options
from edge.topic_admin import start_producer
from edge.transactional import FATAL as _FATAL
from edge.transactional import transactional_id
from schemas import encode
from workers.config import WorkerConfig
from workers.offsets import OffsetTracker, answered_above
from workers.publisher import Answer, Publisher

log = logging.getLogger("ferry.worker")


@dataclass
class _Batch:
    """Answers of a partition waiting for its transaction in flight, to go in the next."""

    answers: list[Answer]
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class Answered:
    """What a partition's previous owners answered: everything below `point`, and `above`."""

    point: int
    above: set[int]

    def __contains__(self, offset: int) -> bool:
        return offset < self.point or offset in self.above


class PartitionTransactions:
    """The transactional producers of the partitions this worker owns."""

    def __init__(self, config: WorkerConfig, publisher: Publisher, offsets: OffsetTracker,
                 record_overhead: int, commit_latency: Histogram | None = None) -> None:
        self.config, self.publisher, self.offsets = config, publisher, offsets
        self._commit_latency = commit_latency  # the commit point and the commit, per transaction
        self._max_request = config.max_message_bytes + record_overhead
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}
        # Revoked in a rebalance still under way: kept for a partition that comes straight
        # back (nobody else can have held it in between), stopped otherwise.
        self._parked: dict[TopicPartition, AIOKafkaProducer] = {}
        self._locks: dict[TopicPartition, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._forming: dict[TopicPartition, _Batch] = {}
        self._admin = AIOKafkaAdminClient(bootstrap_servers=config.bootstrap, **client_options())

    async def start(self) -> None:
        await self._admin.start()

    async def close(self) -> None:
        await asyncio.gather(*(p.stop() for p in [*self._producers.values(),
                                                  *self._parked.values()]),
                             return_exceptions=True)
        self._producers.clear()
        self._parked.clear()
        await self._admin.close()

    def revoke(self, revoked: set[TopicPartition]) -> None:
        """No more transactions on `revoked` (called once their last answers are in)."""
        for tp in revoked & set(self._producers):
            self._parked[tp] = self._producers.pop(tp)

    async def adopt(self, assigned: set[TopicPartition], keep_parked: bool = True
                    ) -> dict[TopicPartition, Answered]:
        """Take over `assigned` (this member's whole new assignment): fence earlier owners
        of the partitions new to it, then read what they committed. The consumer may
        already be reading from an older commit point (it reads them before the fence), so
        the caller skips what is `Answered`. `keep_parked`: the revoked partitions' producers
        serve those that came straight back (False when another member may have owned them
        in between: their producers may be fenced)."""
        for tp in set(self._parked):
            producer = self._parked.pop(tp)
            if tp in assigned and keep_parked:
                self._producers[tp] = producer
            else:
                await producer.stop()
        new = assigned - set(self._producers)
        producers = {tp: AIOKafkaProducer(
            bootstrap_servers=self.config.bootstrap, **client_options(),
            acks="all", enable_idempotence=True,
            transactional_id=transactional_id(self.config.group, tp),
            transaction_timeout_ms=self.config.transaction_timeout_ms,
            max_request_size=self._max_request, linger_ms=2) for tp in new}
        # Starting one fences its id's previous holder and ends that one's open transaction,
        # so the commit points read below are final.
        await asyncio.gather(*(start_producer(p, self.publisher.topics_ready)
                               for p in producers.values()))
        self._producers.update(producers)
        if not assigned:
            return {}
        committed = await self._admin.list_consumer_group_offsets(
            self.config.group, partitions=sorted(assigned))
        skip = {}
        for tp in assigned:
            point = committed.get(tp)
            if point is not None and point.offset >= 0:
                skip[tp] = Answered(point.offset,
                                    answered_above(point.offset, point.metadata))
        if any(a.above for a in skip.values()):
            log.info("skipping offsets answered by the previous owner: %s",
                     {tp.partition: len(a.above) for tp, a in skip.items() if a.above})
        return skip

    async def deliver(self, answers: list[Answer]) -> None:
        """Publish answers, one transaction per partition; answers of partitions no longer
        owned are dropped (their next owner serves them)."""
        by_tp: dict[TopicPartition, list[Answer]] = defaultdict(list)
        for answer in answers:
            by_tp[answer.tp].append(answer)
        await asyncio.gather(*(self._deliver(tp, batch) for tp, batch in by_tp.items()))

    async def _deliver(self, tp: TopicPartition, answers: list[Answer]) -> None:
        """Group commit: one transaction of a partition at a time, and the answers that
        arrive while it runs all go into the next one (a transaction costs several round
        trips, so one per engine step would cap a busy partition's throughput)."""
        forming = self._forming.get(tp)
        if forming is not None:  # a batch is waiting for the transaction in flight: join it
            forming.answers.extend(answers)
            await asyncio.shield(forming.done)
            return
        batch = self._forming[tp] = _Batch(list(answers))
        try:
            async with self._locks[tp]:
                del self._forming[tp]  # closed: what arrives from now on forms the next one
                await self._flush(tp, batch.answers)
            batch.done.set_result(None)
        except BaseException as exc:
            if self._forming.get(tp) is batch:
                del self._forming[tp]
            if isinstance(exc, asyncio.CancelledError):
                batch.done.cancel()
            else:
                batch.done.set_exception(exc)
                batch.done.exception()  # the joiners (if any) see it; the leader raises it
            raise

    async def _flush(self, tp: TopicPartition, answers: list[Answer]) -> None:
        """The answers' transaction (the partition's lock held)."""
        producer = self._producers.get(tp)
        if producer is None:
            return
        await self.publisher.prepare(answers)
        try:
            await self._transaction(producer, tp, answers)
            return
        except _FATAL:
            raise  # another owner has the partition now: stop, never publish twice
        except KafkaError as exc:
            log.warning("transaction of %d answers on %s[%d] failed (%r): one by one",
                        len(answers), tp.topic, tp.partition, exc)
        # One answer can spoil a transaction (a record its topic refuses): each alone,
        # and one that still fails is replaced (too large, then undeliverable).
        for answer in answers:
            await self._alone(producer, tp, answer)

    async def _alone(self, producer: AIOKafkaProducer, tp: TopicPartition,
                     answer: Answer) -> None:
        for attempt in range(3):
            try:
                await self._transaction(producer, tp, [answer])
                return
            except _FATAL:
                raise
            except KafkaError as exc:
                if attempt == 2:
                    raise  # not this answer's fault: the broker's
                if answer.result is None or attempt == 0 and not isinstance(
                        exc, MessageSizeTooLargeError):
                    continue  # once more as it is: the failure may have been passing
                if isinstance(exc, MessageSizeTooLargeError) and answer.result.error is None:
                    answer.result = self.publisher.too_large(
                        answer.result, len(encode(answer.result)))
                else:
                    self.publisher.degrade(answer, answer.dest.reply_to or "?", exc)

    async def _transaction(self, producer: AIOKafkaProducer, tp: TopicPartition,
                           answers: list[Answer]) -> None:
        await producer.begin_transaction()
        try:
            acks = [ack for a in answers for ack in await self.publisher.send(a, producer)]
            await asyncio.gather(*acks)
            for answer in answers:
                self.offsets.finished(tp, answer.offset)
            point, metadata = self.offsets.commit_metadata(tp)
            started = time.perf_counter()
            await producer.send_offsets_to_transaction(
                {tp: OffsetAndMetadata(point, metadata)}, self.config.group)
            await producer.commit_transaction()
            if self._commit_latency is not None:
                self._commit_latency.observe(time.perf_counter() - started)
        except BaseException:
            for answer in answers:
                self.offsets.started(tp, answer.offset)  # not answered after all
            try:
                await producer.abort_transaction()
            except Exception as exc:  # fenced or broken: the caller's error says why
                log.warning("abort on %s[%d] failed: %r", tp.topic, tp.partition, exc)
            raise
        self.offsets.committed({tp: point})
