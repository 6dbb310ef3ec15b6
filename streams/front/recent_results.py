"""Results that arrive on a shared results topic, kept a while and awaitable by request id.

This is how any gateway instance answers `GET /v1/requests/{id}` for a request it did not
accept itself: producers that posted straight to Kafka with `reply_to = ferry.results`, and
async calls accepted by another gateway (which copies their final result there, with the
caller's tenant in a header so only that tenant can read it). Reading starts at the end of
the topic when the gateway starts; results are kept `retention_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from aiokafka import ConsumerRecord

from edge.reader import TopicReader
from edge.topic_admin import ensure_topics
from schemas import RESULTS_TOPIC, Result, SchemaError, decode_result
from schemas.topics import CHAT_HEADER, DEFAULT_PARTITIONS, TENANT_HEADER

log = logging.getLogger("ferry.results")


@dataclass(frozen=True)
class Seen:
    result: Result
    tenant: str | None  # None: anyone with the id may read it
    chat: bool
    at: float


class RecentResults:
    def __init__(self, bootstrap: str, topic: str = RESULTS_TOPIC,
                 retention_s: float = 600.0) -> None:
        self.bootstrap, self.topic, self.retention_s = bootstrap, topic, retention_s
        self._seen: dict[str, Seen] = {}
        self._waiters: dict[str, list[asyncio.Future[Seen]]] = {}
        self.reader = TopicReader(bootstrap, topic, self._handle, at="end")
        self.reader.on_failure.append(self._failed)

    async def start(self, partitions: int = DEFAULT_PARTITIONS) -> None:
        await ensure_topics(self.bootstrap, {self.topic: partitions})  # workers' default count
        await self.reader.start(f"recent results on {self.topic}")

    @property
    def healthy(self) -> bool:
        return self.reader.healthy

    @property
    def failure(self) -> BaseException | None:
        return self.reader.failure

    def _failed(self, exc: BaseException) -> None:
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(exc)

    async def close(self) -> None:
        await self.reader.close()

    async def wait(self, request_id: str, timeout_s: float) -> Seen | None:
        """The result for `request_id`, waiting up to `timeout_s` for it to arrive."""
        if (seen := self._seen.get(request_id)) is not None:
            return seen
        future: asyncio.Future[Seen] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(request_id, []).append(future)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except asyncio.TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(request_id, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(request_id, None)

    def _handle(self, message: ConsumerRecord) -> None:
        try:
            result = decode_result(message.value)
        except SchemaError as exc:
            log.warning("unreadable result at %s@%d: %s", message.topic, message.offset, exc)
            return
        headers = dict(message.headers or ())
        tenant = headers.get(TENANT_HEADER)
        try:
            name = tenant.decode() if tenant else None
        except UnicodeDecodeError:  # anyone can write here: say why the record is skipped
            log.warning("result at %s@%d: %s header is not UTF-8; ignored", message.topic,
                        message.offset, TENANT_HEADER)
            return
        seen = Seen(result, name, headers.get(CHAT_HEADER) == b"1", time.monotonic())
        self._seen[result.id] = seen
        for future in self._waiters.pop(result.id, []):
            if not future.done():
                future.set_result(seen)
        self._expire()

    def _expire(self) -> None:
        # dicts keep insertion order: the oldest entries are first.
        cutoff = time.monotonic() - self.retention_s
        while self._seen:
            oldest = next(iter(self._seen))
            if self._seen[oldest].at >= cutoff:
                break
            del self._seen[oldest]
