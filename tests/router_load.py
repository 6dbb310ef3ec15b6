"""A `ferry router` process under load, killed with SIGKILL and restarted, and what an
independent reader (librdkafka through confluent-kafka, `read_committed` as every Ferry
reader) then finds: each request forwarded exactly once, its quota charged exactly once.

Used by the router fault row (tests/test_faults.py) and the default suite's smaller run
(tests/test_router.py).
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import murmur2

from edge.topic_admin import ensure_topics
from ferry.broker import free_port
from schemas import Request, requests_topic
from schemas.topics import API_KEY_HEADER, INGRESS_PARTITIONS
from streams.front.client import FerryClient
from streams.routing.keys import add_key
from tests.harness import RouterProcess

DEP_PARTITIONS = 4


@dataclass
class RouterRow:
    scenario: str
    n: int
    lost: int
    duplicated: int
    quota_lost: int          # forwarded requests whose charge is not on the quota topic
    quota_duplicated: int    # charges on the quota topic beyond one per forwarded request
    recovery_s: float        # SIGKILL -> the first request posted after it is forwarded
    restart_ready_s: float   # restarted process -> "router ready"

    def __str__(self) -> str:
        return (f"{self.scenario:<28} N={self.n:<5} lost={self.lost:<3} "
                f"duplicated={self.duplicated:<3} quota lost={self.quota_lost} "
                f"duplicated={self.quota_duplicated} recovery={self.recovery_s:.1f}s "
                f"(restart ready in {self.restart_ready_s:.1f}s)")


@dataclass
class _Seen:
    """When each request id first became visible (read_committed) on the requests topic."""

    first: dict[str, float] = field(default_factory=dict)


def tenant_for(partition: int, prefix: str) -> str:
    """A tenant name the default partitioner puts on ingress `partition`."""
    for i in range(10_000):
        name = f"{prefix}-{partition}-{i}"
        if (murmur2(name.encode()) & 0x7FFFFFFF) % INGRESS_PARTITIONS == partition:
            return name
    raise AssertionError("no tenant name found")


async def _follow(bootstrap: str, topic: str, seen: _Seen) -> None:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                isolation_level="read_committed", fetch_max_wait_ms=50)
    await consumer.start()
    try:
        while True:
            for msgs in (await consumer.getmany(timeout_ms=100)).values():
                now = time.monotonic()
                for m in msgs:
                    seen.first.setdefault(orjson.loads(m.value)["id"], now)
    finally:
        await consumer.stop()


def committed_records(bootstrap: str, topic: str) -> list[tuple[bytes | None, bytes | None,
                                                                int, int]]:
    """Every committed record of `topic` (key, value, partition, offset), to its end."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"checker-{uuid.uuid4()}",
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "auto.offset.reset": "earliest"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p, 0) for p in partitions]
        consumer.assign(tps)
        marks = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10) for tp in tps}
        records = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            positions = {tp.partition: tp.offset for tp in consumer.position(
                [TopicPartition(topic, p) for p in partitions])}
            # A read_committed position stops at the last stable offset: below the end
            # only while a transaction is still open. Nothing read yet: no position.
            if all(max(positions[p], low) >= end for p, (low, end) in marks.items()):
                break
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            records.append((msg.key(), msg.value(), msg.partition(), msg.offset()))
        else:
            raise AssertionError(f"{topic}: not read to its end within 60s")
        return records
    finally:
        consumer.close()


async def _caught_up(bootstrap: str, group: str, ingress: str) -> bool:
    """Whether the router group's commit points are past every committed ingress record."""
    last: dict[int, int] = {}
    for _, _, partition, offset in await asyncio.to_thread(committed_records, bootstrap,
                                                           ingress):
        last[partition] = max(last.get(partition, -1), offset)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    points = {tp.partition: meta.offset for tp, meta in committed.items() if tp.topic == ingress}
    return all(points.get(p, -1) > offset for p, offset in last.items())


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _start(app_id: str, ingress: str, log: Path, bootstrap: str,
           instance_id: str | None) -> tuple[RouterProcess, float]:
    proc = RouterProcess(app_id, ingress, free_port(), log)  # a fresh log: its own ready line
    if instance_id is not None:
        proc.args += ["--instance-id", instance_id]
    started = time.monotonic()
    proc.start(bootstrap)
    return proc, time.monotonic() - started


async def router_killed_mid_load(bootstrap: str, tmp: Path, unique: Callable[[str], str],
                                 n: int, name: str = "router SIGKILL",
                                 rate: float = 250.0,
                                 instance_id: str | None = None) -> RouterRow:
    """Post n requests (one in eight keyed by nobody, so re-keyed) at `rate` per second
    through a router process; kill it with SIGKILL a third of the way and start a new one at
    once (with `instance_id`: the same static member); then count what was forwarded and
    charged."""
    tag = uuid.uuid4().hex[:8]
    app_id, ingress = f"ferry-router-kill-{tag}", f"ferry.ingress.kill-{tag}"
    dep = unique("routed")
    await ensure_topics(bootstrap, {requests_topic(dep): DEP_PARTITIONS})
    tenants = [tenant_for(p, f"kill{tag}") for p in range(INGRESS_PARTITIONS)]
    keys = {t: await add_key(bootstrap, t, rpm=10 * n) for t in tenants}  # never refused
    seen = _Seen()
    follower = asyncio.create_task(_follow(bootstrap, requests_topic(dep), seen))
    procs: list[RouterProcess] = []
    try:
        proc, _ = await asyncio.to_thread(_start, app_id, ingress, tmp / "router-1.log",
                                          bootstrap, instance_id)
        procs.append(proc)
        tenant_of: dict[str, str] = {}
        posted_at: dict[str, float] = {}
        killed_at: float | None = None
        restart: asyncio.Task | None = None
        async with FerryClient(bootstrap, reply_to=unique("ferry.replies.kill")) as client:
            for i in range(n):
                tenant = tenants[i % len(tenants)]
                request = Request(id=f"{tag}-{i}", model=dep, prompt=f"request {i}",
                                  max_new_tokens=4)
                tenant_of[request.id], posted_at[request.id] = tenant, time.monotonic()
                await client.submit(request, ingress,
                                    key=None if i % 8 == 7 else tenant.encode(),
                                    headers=[(API_KEY_HEADER, keys[tenant].encode())])
                if killed_at is None and len(seen.first) >= n // 3:
                    assert procs[0].process is not None
                    procs[0].process.send_signal(signal.SIGKILL)
                    killed_at = time.monotonic()
                    await asyncio.to_thread(procs[0].process.wait, 10)
                    restart = asyncio.create_task(asyncio.to_thread(
                        _start, app_id, ingress, tmp / "router-2.log", bootstrap, instance_id))
                await asyncio.sleep(1 / rate)  # pacing the load, not waiting for a condition
            assert killed_at is not None and restart is not None, "killed before any load"
            proc, restart_ready = await restart
            procs.append(proc)
            await until(lambda: len(seen.first) >= n, 120, f"all {n} requests forwarded")
        after = [r for r, t in posted_at.items() if t > killed_at]
        recovery = min(seen.first[r] for r in after) - killed_at if after else float("inf")
        deadline = time.monotonic() + 60
        while not await _caught_up(bootstrap, app_id, ingress):  # every re-post handled too
            assert time.monotonic() < deadline, "router group never committed the ingress end"
            await asyncio.sleep(0.2)
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        for proc in procs:
            await asyncio.to_thread(proc.stop)
    forwarded = Counter(orjson.loads(v)["id"] for _, v, _, _ in await asyncio.to_thread(
        committed_records, bootstrap, requests_topic(dep)))
    charges = Counter(k.decode() for k, _, _, _ in await asyncio.to_thread(
        committed_records, bootstrap, f"{app_id}.quotas") if k)
    per_tenant = Counter(tenant_of[r] for r in forwarded if r in tenant_of)
    row = RouterRow(
        name, n, lost=sum(1 for r in tenant_of if forwarded[r] == 0),
        duplicated=sum(c - 1 for c in forwarded.values() if c > 1),
        quota_lost=sum(max(0, per_tenant[t] - charges[t]) for t in tenants),
        quota_duplicated=sum(max(0, charges[t] - per_tenant[t]) for t in tenants),
        recovery_s=recovery, restart_ready_s=restart_ready)
    print(f"\n[faults] {row}")
    return row
