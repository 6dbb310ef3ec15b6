"""Exactly-once forwarding: what the router writes for ingress records, and the commit point
after them, in one transaction per ingress partition.

The router reads ingress with a plain aiokafka consumer (group = the router's app id,
`read_committed`, no auto commit) and owns one transactional producer per assigned
partition, its id derived from the group, topic and partition (`edge/transactional.py`:
aiokafka has no KIP-447, so the partition's next owner starting a producer with that id is
what fences a zombie router). A partition is processed in order, so its commit point is
simply the offset after the last record handled; everything one getmany fetched for a
partition (bounded) goes into one transaction, since each costs several round trips.

On assignment the new partitions' producers are started first (that fences their previous
owner and ends its open transaction), then the committed offsets are read and the consumer
is moved to them: records fetched from an older commit point are skipped by offset. A
transaction that fails on a record (a topic that refuses it) is redone record by record,
then without the record's best-effort writes (error replies), then as the record's dead
letter alone (`undeliverable`); what still fails is the broker's fault and stops the router,
which loses nothing: nothing of it was committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from edge.kafka_clients import client_options
from edge.reader import fair_getmany
from edge.topic_admin import start_producer
from edge.transactional import FATAL, transactional_id
from schemas.tables import QuotaState

log = logging.getLogger("ferry.router")

# Records of all partitions per getmany, so one transaction is bounded.
MAX_BATCH = 500
# Session (the broker's minimum by default) and heartbeat: a killed router's partitions move
# after 6 s. Static membership (`instance_id`) lets its restart take them back at once.
SESSION_TIMEOUT_MS = 6_000
HEARTBEAT_INTERVAL_MS = 1_000
REBALANCE_TIMEOUT_MS = 10_000
# The broker aborts a transaction open this long (aiokafka's default is 60 s): all a killed
# router with no successor can hold read_committed readers of its output, plus the broker's
# abort check interval (transaction.abort.timed.out.transaction.cleanup.interval.ms, 10 s).
TRANSACTION_TIMEOUT_MS = 10_000
# Longest a stopping router waits on the broker for each shutdown step.
_SHUTDOWN_STEP_S = 15.0


class Sink:
    """What the router writes for the records of one transaction, and what it does once
    that transaction is committed (counters, state kept in memory)."""

    def __init__(self, producer: AIOKafkaProducer, best_effort: bool = True) -> None:
        self._producer, self._best_effort = producer, best_effort
        self.acks: list[asyncio.Future[Any]] = []
        self.staged: dict[str, QuotaState] = {}  # state written in this transaction, not yet committed
        self._effects: list[Callable[[], object]] = []

    async def send(self, topic: str, key: bytes | None, value: bytes | None,
                   headers: list[tuple[str, bytes]] | None = None, *,
                   best_effort: bool = False) -> None:
        """Write one record in the transaction; a `best_effort` one (an error reply) is left
        out when the transaction is redone without them."""
        if best_effort and not self._best_effort:
            return
        self.acks.append(await self._producer.send(topic, value, key=key, headers=headers))

    def on_commit(self, effect: Callable[[], object]) -> None:
        self._effects.append(effect)

    def committed(self) -> None:
        for effect in self._effects:
            effect()


Handler = Callable[[ConsumerRecord, Sink], Awaitable[None]]
Undeliverable = Callable[[ConsumerRecord, BaseException, Sink], Awaitable[None]]


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, ingress: TransactionalIngress) -> None:
        self._ingress = ingress

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._ingress._revoke(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._ingress._assign(set(assigned))


class TransactionalIngress:
    """Reads `topic` in `group` and hands each record to `handle` with the sink of its
    partition's transaction; `on_assigned` runs after a new assignment is fenced (before any
    of its records), `on_revoked` after the revoked partitions' last transactions."""

    def __init__(self, bootstrap: str, group: str, topic: str, handle: Handler, *,
                 undeliverable: Undeliverable | None = None,
                 instance_id: str | None = None, writes_to: tuple[str, ...] = (),
                 on_assigned: Callable[[set[TopicPartition]], Awaitable[None]] | None = None,
                 on_revoked: Callable[[set[TopicPartition]], None] | None = None,
                 transaction_timeout_ms: int = TRANSACTION_TIMEOUT_MS) -> None:
        self.bootstrap, self.group, self.topic = bootstrap, group, topic
        self._transaction_timeout_ms = transaction_timeout_ms
        self._handle, self._undeliverable, self._writes_to = handle, undeliverable, writes_to
        self._on_assigned, self._on_revoked = on_assigned, on_revoked
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group, group_instance_id=instance_id,
            isolation_level="read_committed", enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
            rebalance_timeout_ms=REBALANCE_TIMEOUT_MS, **client_options())
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_options())
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}
        # Revoked in a rebalance still under way: kept for a partition that comes straight
        # back (nobody else can have held it in between), stopped otherwise.
        self._parked: dict[TopicPartition, AIOKafkaProducer] = {}
        self._next: dict[TopicPartition, int] = {}  # the next offset to handle, per partition
        self._lock = asyncio.Lock()  # a batch's transactions, or a rebalance step
        # Records are handled only once the current assignment is fenced (aiokafka fetches
        # before the rebalance listener has run).
        self._adopted = asyncio.Event()
        self._adopt_error: BaseException | None = None
        self.ready = asyncio.Event()  # the first assignment is adopted
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Finish the transaction under way, then leave the group (`run` returns)."""
        self._stop.set()

    async def run(self) -> None:
        try:
            await self._admin.start()
            self._consumer.subscribe([self.topic], listener=_Rebalance(self))
            await self._consumer.start()
            while not self._stop.is_set():
                if self._adopt_error is not None:
                    raise self._adopt_error  # not fenced: forwarding could duplicate
                batch = await fair_getmany(self._consumer, MAX_BATCH, timeout_ms=100)
                if batch:
                    await self._process(batch)
        finally:
            await self._shutdown()

    async def _process(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        await self._adopted.wait()
        async with self._lock:
            if self._adopt_error is not None:
                raise self._adopt_error  # not fenced: forwarding could duplicate
            if not self._adopted.is_set():
                return  # a rebalance began: its assignment seeks back to the commit points
            await asyncio.gather(*(self._partition(tp, records)
                                   for tp, records in batch.items() if tp in self._producers))

    async def _partition(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        records = [r for r in records if r.offset >= self._next.get(tp, 0)]
        if not records:
            return
        try:
            await self._transaction(self._producers[tp], tp, records)
        except FATAL:
            raise  # another router owns the partition now: stop, never forward twice
        except KafkaError as exc:
            log.warning("transaction of %d records of %s[%d] failed (%r): one by one",
                        len(records), tp.topic, tp.partition, exc)
            await self._renew(tp)
            for record in records:
                await self._alone(tp, record)
        self._next[tp] = records[-1].offset + 1

    async def _renew(self, tp: TopicPartition) -> None:
        """A new producer for the same id after a failed transaction: aiokafka counted the
        sequence numbers of the batches the broker refused, so the old one's next batch to
        those partitions would be refused as out of order. (Its epoch is fenced by this.)"""
        await self._producers.pop(tp).stop()
        producer = self._producer(tp)
        await start_producer(producer, self._writes_to)
        self._producers[tp] = producer

    def _producer(self, tp: TopicPartition) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True,
            transactional_id=transactional_id(self.group, tp),
            transaction_timeout_ms=self._transaction_timeout_ms, **client_options())

    async def _alone(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        """One record's transaction: as handled, then without its error reply; one that
        fails every time would stop its partition for good, so then its dead letter (with,
        then without, its error reply) is its answer. What fails after that is the broker."""
        failure: BaseException | None = None

        async def dead_letter(r: ConsumerRecord, sink: Sink) -> None:
            assert self._undeliverable is not None and failure is not None
            await self._undeliverable(r, failure, sink)

        steps: list[tuple[Handler, bool]] = [(self._handle, True), (self._handle, False)]
        if self._undeliverable is not None:
            steps += [(dead_letter, True), (dead_letter, False)]
        for i, (handle, best_effort) in enumerate(steps):
            try:
                await self._transaction(self._producers[tp], tp, [record], best_effort,
                                        handle)
                return
            except FATAL:
                raise
            except KafkaError as exc:
                if i == len(steps) - 1:
                    raise
                await self._renew(tp)
                if handle is self._handle:
                    failure = exc
                log.warning("%s[%d]@%d: its transaction failed (%r); %s", tp.topic,
                            tp.partition, record.offset, exc,
                            "again without its error reply" if best_effort else
                            "its dead letter instead")

    async def _transaction(self, producer: AIOKafkaProducer, tp: TopicPartition,
                           records: list[ConsumerRecord], best_effort: bool = True,
                           handle: Handler | None = None) -> None:
        sink = Sink(producer, best_effort)
        handle = handle or self._handle
        await producer.begin_transaction()
        try:
            for record in records:
                await handle(record, sink)
            # The commit point goes in while the records are still being acknowledged (one
            # round trip less); every ack is awaited before the commit: aiokafka would
            # commit a transaction whose send failed.
            outcomes = await asyncio.gather(*sink.acks, producer.send_offsets_to_transaction(
                {tp: OffsetAndMetadata(records[-1].offset + 1, "")}, self.group),
                return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            await producer.commit_transaction()
        except BaseException:
            try:
                await producer.abort_transaction()
            except Exception as exc:  # fenced or broken: the caller's error says why
                log.warning("abort on %s[%d] failed: %r", tp.topic, tp.partition, exc)
            raise
        sink.committed()

    # ---- rebalances ------------------------------------------------------------------

    async def _revoke(self, revoked: set[TopicPartition]) -> None:
        self._adopted.clear()
        async with self._lock:  # after the transactions under way
            for tp in revoked:
                if tp in self._producers:
                    self._parked[tp] = self._producers.pop(tp)
                self._next.pop(tp, None)
            if self._on_revoked is not None:
                self._on_revoked(revoked)

    async def _assign(self, assigned: set[TopicPartition]) -> None:
        """Fence the previous owners of partitions new to this router, then start each
        partition from its commit point (final now). aiokafka logs and swallows a listener's
        exception: it is kept for the loop to raise."""
        try:
            async with self._lock:
                await self._adopt(assigned)
        except Exception as exc:
            log.error("router: taking over partitions %s failed: %r",
                      sorted(tp.partition for tp in assigned), exc)
            self._adopt_error = exc
        self._adopted.set()
        if not self.ready.is_set():
            self.ready.set()

    async def _adopt(self, assigned: set[TopicPartition]) -> None:
        for tp in set(self._parked):
            producer = self._parked.pop(tp)
            if tp in assigned:
                self._producers[tp] = producer
            else:
                await producer.stop()
        new = {tp: self._producer(tp) for tp in assigned - set(self._producers)}
        # Starting one fences its id's previous holder and ends that one's open transaction.
        await asyncio.gather(*(start_producer(p, self._writes_to) for p in new.values()))
        self._producers.update(new)
        if assigned:
            committed = await self._admin.list_consumer_group_offsets(
                self.group, partitions=sorted(assigned))
            for tp in assigned:
                point = committed.get(tp)
                if point is not None and point.offset >= 0:
                    self._next[tp] = point.offset
                    self._consumer.seek(tp, point.offset)
                else:  # nothing committed: from the start (out of range: the earliest)
                    self._next[tp] = 0
                    self._consumer.seek(tp, 0)
        if self._on_assigned is not None:
            await self._on_assigned(assigned)
        log.info("router owns ingress partitions %s (%d fenced and taken over)",
                 sorted(tp.partition for tp in assigned), len(new))

    async def _shutdown(self) -> None:
        """Leave the group at once (no transaction is open: the loop ended between two),
        then stop the producers."""
        try:
            async with asyncio.timeout(_SHUTDOWN_STEP_S):
                await self._consumer.stop()
        except TimeoutError:
            log.warning("router: leaving the group took over %gs; the broker expires this "
                        "member instead", _SHUTDOWN_STEP_S)
        await asyncio.gather(*(p.stop() for p in [*self._producers.values(),
                                                  *self._parked.values()]),
                             return_exceptions=True)
        self._producers.clear()
        self._parked.clear()
        await self._admin.close()
