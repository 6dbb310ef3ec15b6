"""The reader base (edge/reader.py) on the real broker: a record that cannot be handled is
skipped, and a reader that dies is heard of by its owner (client, recent results)."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer, ConsumerRecord

from edge.reader import TopicReader
from edge.topic_admin import ensure_topics
from schemas import Request, Result, encode
from streams.front.client import FerryClient
from streams.front.recent_results import RecentResults
from tests.conftest import wait_for


async def broken(*_: object, **__: object) -> dict:
    raise RuntimeError("broker gone")


async def send(bootstrap: str, topic: str, *values: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()


async def test_reader_skips_a_record_it_cannot_handle_and_reports_its_death(
        kafka_bootstrap, unique) -> None:
    topic = unique("reader")
    await ensure_topics(kafka_bootstrap, {topic: 1})
    seen: list[bytes] = []

    def handle(record: ConsumerRecord) -> None:
        if record.value == b"boom":
            raise ValueError("handler bug")
        seen.append(record.value)

    reader = TopicReader(kafka_bootstrap, topic, handle, at="end")
    deaths: list[BaseException] = []
    reader.on_failure.append(deaths.append)
    await send(kafka_bootstrap, topic, b"before")  # written before start: not read
    await reader.start("test reader")
    try:
        await send(kafka_bootstrap, topic, b"one", b"boom", b"two")
        await wait_for(lambda: seen == [b"one", b"two"], 20, "the records around a bad one")
        assert reader.healthy and not deaths
        reader.consumer.getmany = broken  # type: ignore[union-attr,method-assign]
        await wait_for(lambda: bool(deaths), 20, "the reader's death to be reported")
        assert not reader.healthy and "broker gone" in repr(reader.failure)
    finally:
        await reader.close()


async def test_client_fails_waiting_requests_when_its_result_reader_dies(
        kafka_bootstrap, unique) -> None:
    async with FerryClient(kafka_bootstrap, reply_to=unique("replies")) as client:
        waiting = await client.submit(Request(id="w1", model=unique("nobody"), prompt="x"))
        client._results.consumer.getmany = broken  # type: ignore[union-attr,method-assign]
        async with asyncio.timeout(20):
            try:
                await waiting
                raise AssertionError("a request outlived its dead result reader")
            except RuntimeError as exc:
                assert "broker gone" in str(exc)
        assert not client.healthy
        try:
            await client.submit(Request(id="w2", model="m", prompt="x"))
            raise AssertionError("a client with a dead reader took a request")
        except RuntimeError as exc:
            assert "died" in str(exc)


async def test_recent_results_fail_their_waiters_when_the_reader_dies(
        kafka_bootstrap, unique) -> None:
    topic = unique("results")
    recent = RecentResults(kafka_bootstrap, topic=topic)
    await recent.start(partitions=1)
    try:
        await send(kafka_bootstrap, topic, encode(Result(id="r1", model="m")))
        seen = await recent.wait("r1", 20)
        assert seen is not None and seen.result.id == "r1"
        waiter = asyncio.ensure_future(recent.wait("r2", 60))
        await wait_for(lambda: "r2" in recent._waiters, 10, "the waiter to register")
        recent.reader.consumer.getmany = broken  # type: ignore[union-attr,method-assign]
        async with asyncio.timeout(20):
            try:
                await waiter
                raise AssertionError("a waiter outlived the dead reader")
            except RuntimeError as exc:
                assert "broker gone" in str(exc)
        assert not recent.healthy
    finally:
        await recent.close()
