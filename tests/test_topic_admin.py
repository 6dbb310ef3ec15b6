"""Topics Ferry creates follow the cluster's replication (the 3-node row of the fault suite
checks RF 3 from `default.replication.factor`; here, one broker)."""

from __future__ import annotations

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from edge.topic_admin import TopicCreationError, ensure_topics


async def replicas(bootstrap: str, topic: str) -> list[int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
        return [len(p["replicas"]) for p in described["partitions"]]
    finally:
        await admin.close()


async def test_replication_factor_is_the_clusters_unless_set(kafka_bootstrap, unique,
                                                             monkeypatch) -> None:
    monkeypatch.delenv("FERRY_KAFKA_REPLICATION_FACTOR", raising=False)
    default = unique("rf-default")
    await ensure_topics(kafka_bootstrap, {default: 2})
    assert await replicas(kafka_bootstrap, default) == [1, 1]  # one broker: its default is 1
    monkeypatch.setenv("FERRY_KAFKA_REPLICATION_FACTOR", "2")
    with pytest.raises(TopicCreationError, match="(?i)replication"):
        await ensure_topics(kafka_bootstrap, {unique("rf-two"): 1})  # more than one broker has
