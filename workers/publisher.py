"""Publishing answers: a result on its reply topic (and copies), a dead letter, or both.

A reply topic the broker refuses, or one that does not answer in time, turns the result into
a dead letter with the reason, so no reply topic can stop the worker or hold its partition;
a result over the message limit becomes a `result_too_large` error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from edge.topic_admin import ensure_topics
from schemas import DLQ_TOPIC, DeadLetter, Delta, ErrorCode, Result, encode
from workers.config import WorkerConfig
from workers.metrics import WorkerMetrics

log = logging.getLogger("ferry.worker")

# Longest one result may take to reach its reply topic (creating it included) before it is
# dead-lettered instead.
_REPLY_TIMEOUT_S = 10.0
# A stream topic that failed is not tried again for this long (its deltas are dropped).
_BAD_STREAM_S = 60.0


@dataclass(frozen=True)
class Destination:
    """Where a request's result goes: its reply topic, copies, and the headers they carry."""

    reply_to: str | None
    also: tuple[str, ...] = ()
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass
class Answer:
    """What one consumed message becomes: a result, a dead letter, or both."""

    tp: TopicPartition
    offset: int
    result: Result | None = None
    dest: Destination = Destination(None)
    dead_letter: DeadLetter | None = None
    created: float | None = None  # unix seconds the request was made, for telemetry


class Publisher:
    """Sends answers with the worker's producer; `send` returns the acks to wait for."""

    def __init__(self, producer: AIOKafkaProducer, config: WorkerConfig,
                 metrics: WorkerMetrics, topics_ready: set[str]) -> None:
        self.producer, self.config, self.metrics = producer, config, metrics
        self.topics_ready = topics_ready  # reply topics known to exist
        self._bad_streams: dict[str, float] = {}  # stream topic -> monotonic time to retry

    async def send(self, answer: Answer, txn: AIOKafkaProducer | None = None
                   ) -> list[asyncio.Future]:
        """Publish an answer; the acks to wait for. With `txn` (a transactional producer in a
        transaction) nothing is caught: a failure must abort the whole transaction, and the
        caller retries the answer alone, then `degrade`s it (see `workers/transactions.py`)."""
        producer = txn or self.producer
        acks = []
        if answer.dead_letter is not None:
            acks.append(await producer.send(DLQ_TOPIC, encode(answer.dead_letter)))
        if answer.result is not None and answer.dest.reply_to is not None:
            for topic in (answer.dest.reply_to, *answer.dest.also):
                acks.append(asyncio.ensure_future(
                    self._send_result(answer, topic) if txn is None
                    else self._publish_result(answer, topic, txn)))
        return acks

    async def prepare(self, answers: list[Answer]) -> None:
        """Before a transaction: create the reply topics its answers need (an answer whose
        topic cannot be made becomes a dead letter), outside it."""
        for answer in answers:
            if answer.result is None or answer.dest.reply_to is None:
                continue
            for topic in (answer.dest.reply_to, *answer.dest.also):
                if topic in self.topics_ready:
                    continue
                try:
                    async with asyncio.timeout(_REPLY_TIMEOUT_S):
                        await ensure_topics(self.config.bootstrap,
                                            {topic: self.config.partitions})
                    self.topics_ready.add(topic)
                except (KafkaError, TimeoutError) as exc:
                    self.degrade(answer, topic, exc)
                    break

    def degrade(self, answer: Answer, reply_to: str, exc: BaseException) -> None:
        """Turn an answer whose result cannot be delivered into a dead letter saying why."""
        if answer.result is None:
            return
        answer.dead_letter = self._letter(answer, reply_to, exc)
        answer.result, answer.dest = None, Destination(None)

    async def _send_result(self, answer: Answer, reply_to: str) -> None:
        """Publish the answer's result, or a dead letter saying why it could not be: a reply
        topic that the broker refuses must not stop the worker nor hold its partition."""
        try:
            async with asyncio.timeout(_REPLY_TIMEOUT_S):
                await self._publish_result(answer, reply_to)
        except (KafkaError, TimeoutError) as exc:
            await self._undeliverable(answer, reply_to, exc)

    async def _undeliverable(self, answer: Answer, reply_to: str, exc: BaseException) -> None:
        letter = self._letter(answer, reply_to, exc)
        # A DLQ that cannot be written is the broker's failure, not the input's: raise.
        await (await self.producer.send(DLQ_TOPIC, encode(letter)))

    def _letter(self, answer: Answer, reply_to: str, exc: BaseException) -> DeadLetter:
        assert answer.result is not None
        reason = f"reply_to: result not delivered to {reply_to!r}: {exc!r}"
        log.warning("dead letter from %s[%d]@%d: %s", answer.tp.topic, answer.tp.partition,
                    answer.offset, reason)
        self.metrics.dead_letters.labels(self.config.deployment, "reply_to").inc()
        return DeadLetter(
            reason=reason, bad_field="reply_to", source_topic=answer.tp.topic,
            partition=answer.tp.partition, offset=answer.offset,
            component=f"worker:{self.config.deployment}", key=answer.result.id,
            value=encode(answer.result).decode(), timestamp=time.time())

    async def _publish_result(self, answer: Answer, reply_to: str,
                              txn: AIOKafkaProducer | None = None) -> None:
        """Publish the answer's result; one replaced as too large is kept on the answer, so
        telemetry reports what was sent."""
        assert answer.result is not None
        producer = txn or self.producer
        result = answer.result
        if reply_to not in self.topics_ready:
            # Create a new reply topic and wait for its leaders: a record sent to a topic
            # that the broker auto-creates can sit leaderless until it expires.
            await ensure_topics(self.config.bootstrap, {reply_to: self.config.partitions})
            self.topics_ready.add(reply_to)
        value, key = encode(result), result.id.encode()
        # Error results are small and bounded, so only a success can be over the limit.
        if result.error is None and len(value) + len(key) > self.config.max_message_bytes:
            result = answer.result = self.too_large(result, len(value))
            value = encode(result)
        headers = list(answer.dest.headers) or None
        try:
            await (await producer.send(reply_to, value, key=key, headers=headers))
        except MessageSizeTooLargeError:  # the topic's own limit is below ours
            if txn is not None:
                raise  # the transaction is spoilt: the caller retries this answer alone
            result = answer.result = self.too_large(result, len(value))
            await (await producer.send(reply_to, encode(result), key=key, headers=headers))
        if reply_to == answer.dest.reply_to:  # copies are not counted twice
            self._count(result)

    async def send_delta(self, topic: str, delta: Delta | None) -> bool:
        """Enqueue a delta (not waiting for its ack); False if it could not be. Deltas are a
        courtesy: a stream topic that fails loses them, never the result. `None` only
        prepares the topic (created, its partitions known to the producer), so a stream's
        first delta does not wait for metadata."""
        if self._bad_streams.get(topic, 0.0) > time.monotonic():
            return False
        try:
            async with asyncio.timeout(_REPLY_TIMEOUT_S):
                if topic not in self.topics_ready:
                    await ensure_topics(self.config.bootstrap, {topic: self.config.partitions})
                    await self.producer.partitions_for(topic)
                    self.topics_ready.add(topic)
                if delta is None:
                    return False
                ack = await self.producer.send(topic, encode(delta.to_dict()),
                                               key=delta.id.encode())
        except (KafkaError, TimeoutError) as exc:
            log.warning("deltas to %r dropped for %gs: %r", topic, _BAD_STREAM_S, exc)
            self._bad_streams[topic] = time.monotonic() + _BAD_STREAM_S
            return False
        ack.add_done_callback(_log_lost_delta)
        return True

    def too_large(self, result: Result, size: int) -> Result:
        log.warning("result %s is %d bytes, over the message limit", result.id, size)
        return Result.failure(
            result.id, result.model, ErrorCode.RESULT_TOO_LARGE,
            f"result: {size} bytes exceed the message limit of {self.config.max_message_bytes}; "
            "lower max_new_tokens")

    def _count(self, result: Result) -> None:
        dep = self.config.deployment
        self.metrics.results.labels(dep, result.finish_reason).inc()
        if result.error is not None:
            self.metrics.errors.labels(dep, result.error.code.value).inc()


def _log_lost_delta(ack: asyncio.Future) -> None:
    if not ack.cancelled() and ack.exception() is not None:
        log.warning("a delta was not delivered: %r", ack.exception())
