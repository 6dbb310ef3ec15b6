"""A producer-side client: post requests on Kafka, get each one's result from its reply topic
(and, for a streaming request, its token deltas from the stream topic beside it).

Producers in other languages do the same with the JSON Schemas in `schemas/json/`; this is
the Python one, used by the demo, the benchmark and the tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable

from aiokafka import AIOKafkaProducer, ConsumerRecord

from edge.kafka_clients import client_options
from edge.reader import TopicReader
from edge.topic_admin import ensure_topics, start_producer
from schemas import (
    RESULTS_TOPIC, Cancel, Delta, ErrorCode, Request, Result, SchemaError, batch_key, decode_delta,
    decode_result, encode, requests_topic,
)
from schemas.topics import (CANCELS_PARTITIONS, CANCELS_TOPIC, DEFAULT_PARTITIONS, DELTAS_TOPIC,
                            MAX_MESSAGE_BYTES)
from streams.front.deltas import MergedStream

log = logging.getLogger("ferry.client")

REQUEST_TIMEOUT_S = 60.0  # how long a caller waits for a result by default


class FerryClient:
    """Posts requests to `ferry.requests.<model>` and resolves them from `reply_to`."""

    def __init__(self, bootstrap: str, reply_to: str = RESULTS_TOPIC,
                 max_message_bytes: int = MAX_MESSAGE_BYTES,
                 partitions: int = DEFAULT_PARTITIONS,
                 stream_to: str | None = None, streaming: bool = False) -> None:
        self.bootstrap = bootstrap
        self.reply_to = reply_to
        # Deltas beside the results, never on the reply topic itself (see Request.stream_to).
        self.stream_to = stream_to or (DELTAS_TOPIC if reply_to == RESULTS_TOPIC
                                       else f"{reply_to}.deltas")
        self.max_message_bytes = max_message_bytes
        self._partitions = partitions
        self._waiting: dict[str, asyncio.Future[Result]] = {}
        # Idempotent: a send retried after a lost ack is written once, so a network blip
        # never posts a request (or a cancel) twice.
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **client_options(),
                                          acks="all", linger_ms=1, enable_idempotence=True,
                                          max_request_size=max_message_bytes * 2)
        # Results may be written in transactions: only committed ones are answers.
        self._results = TopicReader(bootstrap, reply_to, self._on_result, at="end")
        self._results.on_failure.append(self._failed)
        self.failure: BaseException | None = None  # why the result (or delta) reader died
        self._topics_ready: set[str] = {reply_to}
        self._listeners: dict[str, Callable[[Delta], None]] = {}  # request id -> on_delta
        # Deltas are never in transactions (an open one must not hold them back).
        self._deltas = TopicReader(bootstrap, self.stream_to, self._on_delta, at="end",
                                   read_committed=False)
        self._deltas.on_failure.append(self._failed)
        self._deltas_started = False  # by the first streaming submit
        self._deltas_lock = asyncio.Lock()
        self._streaming = streaming  # read deltas from start() on, not from the first stream

    async def __aenter__(self) -> FerryClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        # The cancels topic too: the producer tracks it from the start, and a tracked topic
        # that does not exist yet logs an ERROR at every metadata refresh.
        await ensure_topics(self.bootstrap, {self.reply_to: self._partitions,
                                             CANCELS_TOPIC: CANCELS_PARTITIONS})
        self._topics_ready.add(CANCELS_TOPIC)
        await start_producer(self._producer, [CANCELS_TOPIC])
        # Positioned before start() returns: no result sent after it is missed.
        await self._results.start(f"client results on {self.reply_to}")
        if self._streaming:
            await self._start_deltas()

    async def close(self) -> None:
        await self._deltas.close()
        await self._results.close()
        await self._producer.stop()

    async def _start_deltas(self) -> None:
        async with self._deltas_lock:
            if self._deltas_started:
                return
            await ensure_topics(self.bootstrap, {self.stream_to: self._partitions})
            await self._deltas.start(f"client deltas on {self.stream_to}")
            self._deltas_started = True

    async def submit(self, request: Request, topic: str | None = None, *,
                     key: bytes | None = None, headers: list[tuple[str, bytes]] | None = None,
                     on_delta: Callable[[Delta], None] | None = None) -> asyncio.Future[Result]:
        """Post a request; the future resolves with its result, or fails if it can't be posted.

        By default it goes to its deployment's topic keyed by batch key; through the router
        it goes to `ferry.ingress` (`topic`) keyed by tenant (`key`) with the API key in
        `headers`. With `on_delta` the request streams: each delta of it that arrives before
        its result is passed to `on_delta` (see `stream` for deltas merged and completed)."""
        if request.reply_to != self.reply_to:
            request = dataclasses.replace(request, reply_to=self.reply_to)
        if on_delta is not None:
            await self._start_deltas()
            request = dataclasses.replace(request, stream_to=self.stream_to)
            self._listeners[request.id] = on_delta
        elif request.stream_to is not None:
            request = dataclasses.replace(request, stream_to=None)
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

    async def cancel(self, request_id: str, model: str | None = None,
                     reason: str = "cancelled by the caller") -> None:
        """Ask the worker running a request (on `model`, or any deployment) to drop it; it is
        still answered, with a `cancelled` error. Stops waiting for it here."""
        self.forget(request_id)
        if CANCELS_TOPIC not in self._topics_ready:
            await ensure_topics(self.bootstrap, {CANCELS_TOPIC: CANCELS_PARTITIONS})
            self._topics_ready.add(CANCELS_TOPIC)
        await self._producer.send_and_wait(CANCELS_TOPIC, encode(Cancel(request_id, model,
                                                                        reason[:256])),
                                           key=request_id.encode())

    async def stream(self, request: Request, timeout: float = REQUEST_TIMEOUT_S
                     ) -> AsyncIterator[Delta | Result]:
        """Post a streaming request: yields its text as it is generated (deltas merged across
        re-runs, the last ones completed from the result; with n > 1 each piece names its
        `choice`), then the result. Raises
        `streams.front.deltas.Diverged` if a re-run contradicts what was already yielded."""
        events: asyncio.Queue[Delta | asyncio.Future[Result]] = asyncio.Queue()
        future = await self.submit(request, on_delta=events.put_nowait)
        future.add_done_callback(events.put_nowait)
        merged = MergedStream(request.id)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = await events.get()
                    if isinstance(event, Delta):
                        if (piece := merged.add(event)) is not None:
                            yield piece
                        continue
                    result = event.result()
                    for piece in merged.finish(result) if result.error is None else ():
                        yield piece
                    yield result
                    return
        finally:
            self.forget(request.id)

    def forget(self, request_id: str) -> None:
        """Stop waiting for a request (given up on, or about to be retried)."""
        self._listeners.pop(request_id, None)
        future = self._waiting.pop(request_id, None)
        if future is not None and not future.done():
            future.cancel()

    async def request(self, request: Request, timeout: float = REQUEST_TIMEOUT_S) -> Result:
        try:
            return await asyncio.wait_for(await self.submit(request), timeout)
        finally:
            self._waiting.pop(request.id, None)  # a timed-out call leaves nothing waiting

    def _on_result(self, msg: ConsumerRecord) -> None:
        try:
            result = decode_result(msg.value)
        except SchemaError as exc:
            log.warning("unreadable result at %s@%d: %s", msg.topic, msg.offset, exc)
            return
        self._listeners.pop(result.id, None)
        future = self._waiting.pop(result.id, None)
        if future is not None and not future.done():
            future.set_result(result)

    def _on_delta(self, msg: ConsumerRecord) -> None:
        try:
            delta = decode_delta(msg.value)
        except SchemaError as exc:
            log.warning("unreadable delta at %s@%d: %s", msg.topic, msg.offset, exc)
            return
        if (listener := self._listeners.get(delta.id)) is not None:
            listener(delta)

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
        self._listeners.clear()
