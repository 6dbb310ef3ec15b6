"""One Kafka broker per test session (or $KAFKA_BOOTSTRAP), one tiny model, factories."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from prometheus_client import CollectorRegistry

from ferry.broker import LocalBroker, free_port
from models.factory import build_tiny_checkpoint
from streams.front.client import FerryClient
from tests.harness import http, router, start_gateway  # noqa: F401  (fixtures for all modules)
from workers.config import WorkerConfig
from workers.engine import Engine
from workers.worker import Worker


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> str:
    if env := os.environ.get("KAFKA_BOOTSTRAP"):
        yield env
        return
    broker = LocalBroker(tmp_path_factory.mktemp("kafka"), port=free_port())
    yield broker.up()
    broker.down()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny", seed=0)


@pytest.fixture(scope="session")
def engine(tiny_model: Path) -> Engine:
    return Engine.from_dir(tiny_model)


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Unique names, so every test has its own topics and groups on the shared broker."""
    return lambda prefix: f"{prefix}-{uuid.uuid4().hex[:10]}"


async def wait_for(condition: Callable[[], bool], timeout: float = 30.0,
                   what: str = "condition") -> None:
    """Poll `condition` until true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def own_engine(engine: Engine, config: WorkerConfig) -> Engine:
    """An engine over `engine`'s weights with state of its own: an engine is stepped by one
    worker only."""
    return Engine(engine.model, engine.config, engine.tokenizer, engine.device,
                  config.engine_config())


WorkerFactory = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def start_worker(kafka_bootstrap: str, tiny_model: Path,
                       engine: Engine) -> AsyncIterator[WorkerFactory]:
    """Start in-process workers (sharing the session's weights, each with its own engine
    state: scheduler and KV cache); all stopped at teardown."""
    tasks: list[asyncio.Task] = []

    async def start(deployment: str, **settings: object) -> Worker:
        config = WorkerConfig(model_dir=tiny_model, deployment=deployment,
                              bootstrap=kafka_bootstrap, **settings)  # type: ignore[arg-type]
        worker = Worker(config, own_engine(engine, config), registry=CollectorRegistry())
        tasks.append(asyncio.create_task(worker.run()))
        ready = asyncio.create_task(worker.ready.wait())
        done, _ = await asyncio.wait([ready, tasks[-1]], timeout=60,
                                     return_when=asyncio.FIRST_COMPLETED)
        if tasks[-1] in done:
            tasks[-1].result()  # the worker died while starting: show why
        assert ready in done, "worker did not join its group within 60s"
        return worker

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
async def client(kafka_bootstrap: str, unique: Callable[[str], str]) -> AsyncIterator[FerryClient]:
    async with FerryClient(kafka_bootstrap, reply_to=unique("replies")) as c:
        yield c


@pytest.fixture
async def read_topic(kafka_bootstrap: str) -> AsyncIterator[Callable[..., Awaitable[list]]]:
    """read_topic(topic, n, timeout) -> the first n records of a topic, from the beginning."""
    consumers: list[AIOKafkaConsumer] = []

    async def read(topic: str, n: int, timeout: float = 30.0,
                   where: Callable[[object], bool] = lambda m: True) -> list:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap,
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        consumers.append(consumer)
        await consumer.start()
        records: list = []
        deadline = time.monotonic() + timeout
        while len(records) < n and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            records += [m for msgs in batch.values() for m in msgs if where(m)]
        return records

    yield read
    for consumer in consumers:
        await consumer.stop()
