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

from schemas import DLQ_TOPIC, DeadLetter, ErrorCode, Result, encode
from workers.config import WorkerConfig
from workers.metrics import WorkerMetrics
from workers.topic_admin import ensure_topics

log = logging.getLogger("ferry.worker")

# Longest one result may take to reach its reply topic (creating it included) before it is
# dead-lettered instead.
_REPLY_TIMEOUT_S = 10.0


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

    async def send(self, answer: Answer) -> list[asyncio.Future]:
        acks = []
        if answer.dead_letter is not None:
            acks.append(await self.producer.send(DLQ_TOPIC, encode(answer.dead_letter)))
        if answer.result is not None and answer.dest.reply_to is not None:
            for topic in (answer.dest.reply_to, *answer.dest.also):
                acks.append(asyncio.ensure_future(self._send_result(answer, topic)))
        return acks

    async def _send_result(self, answer: Answer, reply_to: str) -> None:
        """Publish the answer's result, or a dead letter saying why it could not be: a reply
        topic that the broker refuses must not stop the worker nor hold its partition."""
        try:
            async with asyncio.timeout(_REPLY_TIMEOUT_S):
                await self._publish_result(answer, reply_to)
        except (KafkaError, TimeoutError) as exc:
            await self._undeliverable(answer, reply_to, exc)

    async def _undeliverable(self, answer: Answer, reply_to: str, exc: BaseException) -> None:
        assert answer.result is not None
        reason = f"reply_to: result not delivered to {reply_to!r}: {exc!r}"
        log.warning("dead letter from %s[%d]@%d: %s", answer.tp.topic, answer.tp.partition,
                    answer.offset, reason)
        self.metrics.dead_letters.labels(self.config.deployment, "reply_to").inc()
        letter = DeadLetter(
            reason=reason, bad_field="reply_to", source_topic=answer.tp.topic,
            partition=answer.tp.partition, offset=answer.offset,
            component=f"worker:{self.config.deployment}", key=answer.result.id,
            value=encode(answer.result).decode(), timestamp=time.time())
        # A DLQ that cannot be written is the broker's failure, not the input's: raise.
        await (await self.producer.send(DLQ_TOPIC, encode(letter)))

    async def _publish_result(self, answer: Answer, reply_to: str) -> None:
        """Publish the answer's result; one replaced as too large is kept on the answer, so
        telemetry reports what was sent."""
        assert answer.result is not None
        result = answer.result
        if reply_to not in self.topics_ready:
            # Create a new reply topic and wait for its leaders: a record sent to a topic
            # that the broker auto-creates can sit leaderless until it expires.
            await ensure_topics(self.config.bootstrap, {reply_to: self.config.partitions})
            self.topics_ready.add(reply_to)
        value, key = encode(result), result.id.encode()
        # Error results are small and bounded, so only a success can be over the limit.
        if result.error is None and len(value) + len(key) > self.config.max_message_bytes:
            result = answer.result = self._too_large(result, len(value))
            value = encode(result)
        headers = list(answer.dest.headers) or None
        try:
            await (await self.producer.send(reply_to, value, key=key, headers=headers))
        except MessageSizeTooLargeError:  # the topic's own limit is below ours
            result = answer.result = self._too_large(result, len(value))
            await (await self.producer.send(reply_to, encode(result), key=key, headers=headers))
        if reply_to == answer.dest.reply_to:  # copies are not counted twice
            self._count(result)

    def _too_large(self, result: Result, size: int) -> Result:
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
