"""A producer-side client: post requests on Kafka, get each one's result from its reply topic.

Producers in other languages do the same with the JSON Schemas in `schemas/json/`; this is
the Python one, used by the demo, the benchmark and the tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas import (
    RESULTS_TOPIC, ErrorCode, Request, Result, SchemaError, batch_key, decode_result, encode,
    requests_topic,
)
from workers.topic_admin import ensure_topics, pin_to_end, topic_partitions, watch_reader

log = logging.getLogger("ferry.client")


class FerryClient:
    """Posts requests to `ferry.requests.<model>` and resolves them from `reply_to`."""

    def __init__(self, bootstrap: str, reply_to: str = RESULTS_TOPIC,
                 max_message_bytes: int = 1_048_576, partitions: int = 4) -> None:
        self.bootstrap = bootstrap
        self.reply_to = reply_to
        self.max_message_bytes = max_message_bytes
        self._partitions = partitions
        self._waiting: dict[str, asyncio.Future[Result]] = {}
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=1,
                                          max_request_size=max_message_bytes * 2)
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self._reader: asyncio.Task | None = None
        self.failure: BaseException | None = None  # why the result reader died
        self._topics_ready: set[str] = {reply_to}

    async def __aenter__(self) -> FerryClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        await ensure_topics(self.bootstrap, {self.reply_to: self._partitions})
        await self._producer.start()
        await self._consumer.start()
        tps = await topic_partitions(self._consumer, self.reply_to)
        self._consumer.assign(tps)
        await pin_to_end(self._consumer, tps)  # no result sent after start() is missed
        self._reader = watch_reader(self._read_results(), f"client results on {self.reply_to}",
                                    self._failed)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self._consumer.stop()
        await self._producer.stop()

    async def submit(self, request: Request, topic: str | None = None, *,
                     key: bytes | None = None,
                     headers: list[tuple[str, bytes]] | None = None) -> asyncio.Future[Result]:
        """Post a request; the future resolves with its result, or fails if it can't be posted.

        By default it goes to its deployment's topic keyed by batch key; through the router
        it goes to `ferry.ingress` (`topic`) keyed by tenant (`key`) with the API key in
        `headers`."""
        if request.reply_to != self.reply_to:
            request = dataclasses.replace(request, reply_to=self.reply_to)
        if request.created_at is None:
            request = dataclasses.replace(request, created_at=time.time())
        if self.failure is not None:
            raise RuntimeError(f"result reader of {self.reply_to} died: {self.failure!r}")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting[request.id] = future
        value = encode(request.to_dict())
        if len(value) > self.max_message_bytes:
            # Never let an oversized request hang: answer it, on its reply topic too.
            result = Result.failure(
                request.id, request.model, ErrorCode.REQUEST_TOO_LARGE,
                f"request: {len(value)} bytes exceed the message limit of "
                f"{self.max_message_bytes}")
            await self._producer.send_and_wait(self.reply_to, encode(result),
                                               key=request.id.encode())
            return future
        key = key if key is not None else batch_key(request, request.model).encode()
        topic = topic or requests_topic(request.model)
        if topic not in self._topics_ready:
            # Created here (with the worker's default partitioning) rather than auto-created
            # by the broker, whose new partitions can stay leaderless for the producer.
            await ensure_topics(self.bootstrap, {topic: self._partitions})
            self._topics_ready.add(topic)
        # Only the enqueue is awaited, so many submits share produce requests; a failed
        # delivery fails the request's future instead of leaving it waiting.
        delivery = await self._producer.send(topic, value, key=key, headers=headers)
        delivery.add_done_callback(lambda d: self._delivered(request.id, d))
        return future

    def _delivered(self, request_id: str, delivery: asyncio.Future) -> None:
        if delivery.cancelled() or delivery.exception() is None:
            return
        future = self._waiting.pop(request_id, None)
        if future is not None and not future.done():
            future.set_exception(delivery.exception())  # type: ignore[arg-type]

    async def publish(self, topic: str, result: Result,
                      headers: list[tuple[str, bytes]] | None = None) -> None:
        """Post a result (keyed by its id) to a topic, e.g. a copy for other readers."""
        await self._producer.send_and_wait(topic, encode(result), key=result.id.encode(),
                                           headers=headers)

    def forget(self, request_id: str) -> None:
        """Stop waiting for a request (given up on, or about to be retried)."""
        future = self._waiting.pop(request_id, None)
        if future is not None and not future.done():
            future.cancel()

    async def request(self, request: Request, timeout: float = 60.0) -> Result:
        try:
            return await asyncio.wait_for(await self.submit(request), timeout)
        finally:
            self._waiting.pop(request.id, None)  # a timed-out call leaves nothing waiting

    async def _read_results(self) -> None:
        async for msg in self._consumer:
            try:
                result = decode_result(msg.value)
            except SchemaError as exc:
                log.warning("unreadable result at %s@%d: %s", msg.topic, msg.offset, exc)
                continue
            future = self._waiting.pop(result.id, None)
            if future is not None and not future.done():
                future.set_result(result)

    @property
    def healthy(self) -> bool:
        return self.failure is None

    def _failed(self, exc: BaseException) -> None:
        # Fail every waiting request loudly rather than let it hang.
        self.failure = exc
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(exc)
        self._waiting.clear()
