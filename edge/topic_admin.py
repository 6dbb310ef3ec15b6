"""Create the topics a component needs before it uses them (idempotent)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from edge.kafka_clients import client_options

log = logging.getLogger("ferry.topics")


class TopicCreationError(KafkaError):
    """The broker refused to create a topic (an illegal or colliding name, a bad config)."""


async def ensure_topics(bootstrap: str, partitions: dict[str, int],
                        configs: dict[str, str] | None = None) -> None:
    """Create each missing topic with the given partition count (and topic `configs`, e.g.
    compaction); existing ones are left as they are. Replicas: FERRY_KAFKA_REPLICATION_FACTOR,
    else the cluster's `default.replication.factor` (min.insync.replicas is the cluster's too)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_options())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        names = [name for name in partitions if name not in existing]
        if names:
            replicas = await replication_factor(admin)
            missing = [NewTopic(name, partitions[name], replicas,
                                topic_configs=dict(configs or {})) for name in names]
            try:
                response = await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                response = None  # another member created it between listing and request
            for name, code, *message in getattr(response, "topic_errors", ()):
                # Per-topic refusals come back in the response, not as an exception.
                if code not in (0, TopicAlreadyExistsError.errno):
                    detail = message[0] if message and message[0] else for_code(code).__name__
                    raise TopicCreationError(f"topic {name!r} not created: {detail}")
            log.info("created topics %s (replication factor %d)",
                     ", ".join(t.name for t in missing), replicas)
            await _wait_for_leaders(admin, [t.name for t in missing])
    finally:
        await admin.close()


async def replication_factor(admin: AIOKafkaAdminClient) -> int:
    """FERRY_KAFKA_REPLICATION_FACTOR, else the broker's `default.replication.factor`.
    (aiokafka's CreateTopics predates KIP-464's -1 for "the broker's default": ask for it.)"""
    if env := os.environ.get("FERRY_KAFKA_REPLICATION_FACTOR"):
        return int(env)
    metadata = await admin.describe_cluster()
    broker = ConfigResource(ConfigResourceType.BROKER, str(metadata["brokers"][0]["node_id"]),
                            configs={"default.replication.factor": None})
    [response] = await admin.describe_configs([broker])
    for resource in response.resources:
        for name, value, *_ in resource[4]:
            if name == "default.replication.factor":
                return int(value)
    return 1


async def list_topics(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_options())
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def _wait_for_leaders(admin: AIOKafkaAdminClient, topics: list[str],
                            timeout: float = 15.0) -> None:
    """A new topic's partitions have no leader for a moment; using them then fails."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        described = await admin.describe_topics(topics)
        if all(t["error_code"] == 0 and t["partitions"]
               and all(p["leader"] >= 0 for p in t["partitions"]) for t in described):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"topics {topics} have no leaders after {timeout}s")


async def start_producer(producer: AIOKafkaProducer, topics: Iterable[str]) -> None:
    """Start a producer that keeps the metadata of every topic it writes to (`topics`, and
    any it sends to later).

    aiokafka refreshes metadata for the topics a producer tracks, or for all topics while it
    tracks none (which it does after, e.g., waiting for a transaction coordinator), and a
    topic learnt from an all-topics refresh is not tracked: once a send adds another topic,
    the next refresh drops it, and a batch for it waits for a leader for ever. A transaction
    writing a result copy and a reply to a new topic never finished that way. Tracking from
    the start means every topic written to is tracked."""
    await producer.start()
    await producer.client.set_topics(sorted(set(topics)))


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Every partition of `topic` as a started consumer knows it, refreshing the metadata once
    for a topic created just now; [] when the topic does not exist."""
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        await consumer._client.force_metadata_update()  # no public call does this
        partitions = consumer.partitions_for_topic(topic) or set()
    return [TopicPartition(topic, p) for p in sorted(partitions)]


async def pin_to_end(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> None:
    """Move assigned partitions to their end and fix the positions before returning, so no
    record appended after this call is missed (seek_to_end alone resolves lazily)."""
    await consumer.seek_to_end(*tps)
    for tp in tps:
        await consumer.position(tp)


def watch_reader(coro: Coroutine[Any, Any, None], what: str,
                 on_failure: Callable[[BaseException], None]) -> asyncio.Task[None]:
    """Run a background reader that fails loudly: if it ends other than by cancellation, the
    death is logged and `on_failure` tells its owner (which stops or reports unhealthy)."""
    task = asyncio.create_task(coro, name=what)

    def ended(done: asyncio.Task[None]) -> None:
        if done.cancelled():
            return
        exc = done.exception() or RuntimeError(f"{what}: reader ended")
        log.error("%s: reader died: %r", what, exc)
        on_failure(exc)

    task.add_done_callback(ended)
    return task
