"""The local broker: Kafka 4.x, and aiokafka's transactional API works against it
(exactly-once in a later issue depends on send_offsets_to_transaction)."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from edge.topic_admin import ensure_topics, start_producer
from ferry.broker import kafka_version


def test_broker_is_kafka_4() -> None:
    assert kafka_version().startswith("4.")


async def test_transaction_commits_output_and_offsets(kafka_bootstrap, unique) -> None:
    source, sink, group = unique("tx-in"), unique("tx-out"), unique("tx-group")
    await ensure_topics(kafka_bootstrap, {source: 1, sink: 1})
    plain = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await plain.start()
    await plain.send_and_wait(source, b"question")
    await plain.stop()

    consumer = AIOKafkaConsumer(source, bootstrap_servers=kafka_bootstrap, group_id=group,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                isolation_level="read_committed")
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap,
                                transactional_id=unique("tx"))
    await consumer.start()
    await producer.start()
    try:
        fetched: list = []
        deadline = asyncio.get_running_loop().time() + 60  # the group join comes first
        while not fetched and asyncio.get_running_loop().time() < deadline:
            records = await consumer.getmany(timeout_ms=1_000)
            fetched = records.get(TopicPartition(source, 0), [])
        [msg] = fetched
        async with producer.transaction():
            await producer.send(sink, b"answer")
            await producer.send_offsets_to_transaction(
                {TopicPartition(source, 0): msg.offset + 1}, group)
    finally:
        await producer.stop()
        await consumer.stop()

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    offsets = await admin.list_consumer_group_offsets(group)
    await admin.close()
    assert offsets[TopicPartition(source, 0)].offset == 1
    reader = AIOKafkaConsumer(sink, bootstrap_servers=kafka_bootstrap,
                              auto_offset_reset="earliest", isolation_level="read_committed")
    await reader.start()
    try:
        got = await reader.getmany(timeout_ms=10_000)
    finally:
        await reader.stop()
    assert [m.value for m in got[TopicPartition(sink, 0)]] == [b"answer"]



async def test_producer_keeps_metadata_of_topics_known_at_start(kafka_bootstrap, unique) -> None:
    """aiokafka refreshes metadata only for the topics a producer tracks, or all topics while
    it tracks none; a topic learnt from such a refresh is not tracked: after a send to a newer
    topic the next refresh dropped it, and a batch for it waited for a leader for ever (a
    transaction writing a result copy and a reply never finished: the demo's first routed
    call on a fresh broker)."""
    known, new = unique("known"), unique("new")
    await ensure_topics(kafka_bootstrap, {known: 4})
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap,
                                transactional_id=unique("tx"))
    await start_producer(producer, [known])
    try:
        # What aiokafka does itself when, e.g., the transaction coordinator is not ready yet
        # (a fresh broker): a refresh that, with no tracked topics, fetches all of them.
        await producer.client.force_metadata_update()
        await ensure_topics(kafka_bootstrap, {new: 4})  # e.g. a caller's new reply topic
        async with asyncio.timeout(20):
            async with producer.transaction():
                acks = [await producer.send(known, b"copy", partition=3),
                        await producer.send(new, b"answer", partition=3)]
                await asyncio.gather(*acks)
            await producer.client.force_metadata_update()
        assert producer.client.cluster.partitions_for_topic(known) == {0, 1, 2, 3}
        assert producer.client.cluster.partitions_for_topic(new) == {0, 1, 2, 3}
    finally:
        await producer.stop()
