"""Fault suite (`make test-faults`; marker `faults`, not in the default run): worker processes
are killed, frozen and churned under load, and an independent checker (librdkafka, through
confluent-kafka, reading `read_committed` as every Ferry reader does) counts the answers per
request id on the reply topic. Every row must show lost 0 and duplicated 0, and every
partition that had requests waiting at a fault must be answering again within the bound.

Each scenario prints one row: N, lost, duplicated, errors by code, recovery time (the
slowest partition's wait, after the fault, for its next answer). The worker SIGKILL case at
one kill also runs in the default suite (tests/test_crash.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from aiokafka.partitioner import murmur2

from schemas import Request
from streams.client import FerryClient

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

PARTITIONS = 4
# Enforced today: the session timeout (6 s), eager rebalances as replacements join, fencing
# and a model load, on a shared 2-core box. The goal (issue 14) is ~5 s.
RECOVERY_BOUND_S = 90.0


@dataclass
class Row:
    scenario: str
    n: int
    lost: int
    duplicated: int
    errors: Counter
    recoveries: list[float]

    @property
    def recovery_s(self) -> float:
        return max(self.recoveries, default=0.0)

    def __str__(self) -> str:
        each = ", ".join(f"{r:.1f}" for r in self.recoveries)
        return (f"{self.scenario:<28} N={self.n:<4} lost={self.lost:<3} "
                f"duplicated={self.duplicated:<3} errors={dict(self.errors)} "
                f"recovery={self.recovery_s:.1f}s ({each})")


@dataclass
class Load:
    """N requests spread over the partitions; when each partition last got an answer."""

    futures: dict[str, asyncio.Future] = field(default_factory=dict)
    partition_of: dict[str, int] = field(default_factory=dict)
    answered_at: dict[str, float] = field(default_factory=dict)

    def answered(self) -> int:
        return len(self.answered_at)

    def waiting_partitions(self) -> set[int]:
        return {self.partition_of[r] for r in self.futures if r not in self.answered_at}

    def recovery(self, fault_at: float, partitions: set[int]) -> float:
        """Per partition waiting at the fault: its first answer after it; the slowest."""
        waits = []
        for p in partitions:
            after = [t for r, t in self.answered_at.items()
                     if self.partition_of[r] == p and t > fault_at]
            waits.append(min(after) - fault_at if after else float("inf"))
        return max(waits, default=0.0)


def spawn(model: Path, deployment: str, bootstrap: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ferry.cli", "worker", "--model", str(model), "--deployment",
         deployment, "--bootstrap", bootstrap, "--max-num-seqs", "4", "--metrics-port", "off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"})


def key_for(partition: int) -> str:
    """A batch key the default partitioner puts on `partition`."""
    for i in range(10_000):
        key = f"fault-{partition}-{i}"
        if (murmur2(key.encode()) & 0x7FFFFFFF) % PARTITIONS == partition:
            return key
    raise AssertionError("no key found")


async def post(client: FerryClient, deployment: str, n: int, tokens: int = 24) -> Load:
    load = Load()
    keys = [key_for(p) for p in range(PARTITIONS)]
    for i in range(n):
        rid = f"{deployment}-{i}"
        load.partition_of[rid] = i % PARTITIONS
        future = await client.submit(Request(id=rid, model=deployment, prompt=f"request {i}",
                                             max_new_tokens=tokens,
                                             batch_key=keys[i % PARTITIONS]))
        future.add_done_callback(lambda _f, rid=rid: load.answered_at.setdefault(
            rid, time.monotonic()))
        load.futures[rid] = future
    return load


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def count_answers(bootstrap: str, topic: str, timeout: float = 90.0) -> tuple[Counter, Counter]:
    """Results per id and errors per code on `topic`, read committed, to its end."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"checker-{uuid.uuid4()}",
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "auto.offset.reset": "earliest"})
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in range(PARTITIONS)}
        ids, errors = Counter(), Counter()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            positions = {tp.partition: tp.offset for tp in consumer.position(
                [TopicPartition(topic, p) for p in range(PARTITIONS)])}
            if all(positions[p] >= ends[p] for p in ends):
                break
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            result = orjson.loads(msg.value())
            ids[result["id"]] += 1
            if result.get("error"):
                errors[result["error"]["code"]] += 1
        return ids, errors
    finally:
        consumer.close()


async def run(name: str, bootstrap: str, model: Path, unique: Callable[[str], str],
              fault: Callable[[str, list[subprocess.Popen], Load], Awaitable[list[float]]],
              n: int = 60) -> Row:
    """Two workers serve n requests while `fault` strikes; the checker counts the answers."""
    dep, replies = unique("fault"), unique("fault-replies")
    workers = [spawn(model, dep, bootstrap) for _ in range(2)]
    try:
        async with FerryClient(bootstrap, reply_to=replies) as client:
            load = await post(client, dep, n)
            recoveries = await fault(dep, workers, load)
            await asyncio.wait_for(asyncio.gather(*load.futures.values()), 300)
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in workers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    ids, errors = await asyncio.to_thread(count_answers, bootstrap, replies)
    row = Row(name, n, lost=sum(1 for r in load.futures if ids[r] == 0),
              duplicated=sum(c - 1 for c in ids.values() if c > 1), errors=errors,
              recoveries=recoveries)
    print(f"\n[faults] {row}")
    return row


def check(row: Row) -> None:
    assert row.lost == 0 and row.duplicated == 0, str(row)
    assert not row.errors, str(row)
    assert row.recovery_s <= RECOVERY_BOUND_S, str(row)


async def test_worker_sigkill_three_times(kafka_bootstrap, tiny_model, unique) -> None:
    async def kill_three(dep: str, workers: list[subprocess.Popen], load: Load) -> list[float]:
        recoveries = []
        for round_ in range(3):
            start = load.answered()
            await until(lambda: load.answered() >= start + 3, 180, "answers before a kill")
            if not load.waiting_partitions():
                break
            victim = workers[round_ % 2]
            waiting, fault_at = load.waiting_partitions(), time.monotonic()
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)
            workers[round_ % 2] = spawn(tiny_model, dep, kafka_bootstrap)
            await until(lambda: load.recovery(fault_at, waiting) < float("inf"), 180,
                        "every waiting partition to answer again")
            recoveries.append(load.recovery(fault_at, waiting))
        return recoveries

    check(await run("worker SIGKILL x3", kafka_bootstrap, tiny_model, unique, kill_three,
                    n=90))


async def test_sigstopped_zombie_answers_nothing_twice(kafka_bootstrap, tiny_model,
                                                       unique) -> None:
    """A frozen worker loses its partitions when its session expires; woken up after the
    others have served them, its transactions are fenced: it publishes nothing more."""
    async def freeze(dep: str, workers: list[subprocess.Popen], load: Load) -> list[float]:
        await until(lambda: load.answered() >= 4, 180, "answers before the freeze")
        waiting, fault_at = load.waiting_partitions(), time.monotonic()
        workers[0].send_signal(signal.SIGSTOP)
        await until(lambda: load.recovery(fault_at, waiting) < float("inf"), 180,
                    "every waiting partition to answer again")
        recovery = load.recovery(fault_at, waiting)
        await until(lambda: load.answered() >= len(load.futures) - 4, 240, "most answers")
        workers[0].send_signal(signal.SIGCONT)  # the zombie wakes with work in hand
        return [recovery]

    check(await run("SIGSTOP zombie", kafka_bootstrap, tiny_model, unique, freeze))


async def test_rebalance_churn(kafka_bootstrap, tiny_model, unique) -> None:
    """Members join and leave (gracefully) while the group serves."""
    async def churn(dep: str, workers: list[subprocess.Popen], load: Load) -> list[float]:
        for _ in range(3):
            start = load.answered()
            await until(lambda: load.answered() >= start + 3, 180, "answers between churns")
            extra = spawn(tiny_model, dep, kafka_bootstrap)
            await until(lambda: load.answered() >= start + 6 or not load.waiting_partitions(),
                        180, "answers with the extra member")
            extra.terminate()
            extra.wait(timeout=60)
        return []

    check(await run("rebalance churn", kafka_bootstrap, tiny_model, unique, churn, n=90))


# ---- router (its own rows: no workers, the forwarded requests are counted) -------------

ROUTER_RECOVERY_BOUND_S = 15.0  # goal ~10 s: the broker's 6 s session timeout + a restart


async def test_router_sigkill(kafka_bootstrap, unique, tmp_path) -> None:
    """A router killed with SIGKILL mid-load and restarted at once: every request forwarded
    exactly once (as a read_committed reader of the requests topic counts them), each charged
    to its tenant's quota exactly once, and forwarding again within the bound."""
    from tests.router_load import router_killed_mid_load

    row = await router_killed_mid_load(kafka_bootstrap, tmp_path, unique, n=1200)
    assert row.lost == 0 and row.duplicated == 0, str(row)
    assert row.quota_lost == 0 and row.quota_duplicated == 0, str(row)
    assert row.recovery_s <= ROUTER_RECOVERY_BOUND_S, str(row)


async def test_router_sigkill_static_member(kafka_bootstrap, unique, tmp_path) -> None:
    """The same with `--instance-id`: the restart is the same static member, so it takes its
    partitions back without waiting for the killed one's session to expire."""
    from tests.router_load import router_killed_mid_load

    row = await router_killed_mid_load(kafka_bootstrap, tmp_path, unique, n=1200,
                                       name="router SIGKILL (static)",
                                       instance_id="router-0")
    assert row.lost == 0 and row.duplicated == 0, str(row)
    assert row.quota_lost == 0 and row.quota_duplicated == 0, str(row)
    assert row.recovery_s <= ROUTER_RECOVERY_BOUND_S, str(row)


async def test_gateway_retries_same_id(router, start_worker, start_gateway, http, unique,
                                       kafka_bootstrap) -> None:
    """Half the calls go first to a backend with no worker yet: the gateway times the attempt
    out and retries the same request id on the other backend. Every caller gets exactly one
    answer and every request is charged once (a retry is not charged again). On the raw reply
    topic an id can still carry two results: the late backend's worker, started afterwards,
    answers the first attempt too (its cancel was published before that worker read
    `ferry.cancels`). The row counts them; they must be exactly the retries."""
    from aiokafka import TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    from schemas.topics import worker_group
    from streams.gateway import GATEWAY
    from streams.keys import add_key
    from streams.routes import set_route
    from tests.router_load import committed_records
    from workers.topic_admin import ensure_topics

    late, live, alias = unique("late"), unique("live"), unique("alias")
    await ensure_topics(kafka_bootstrap, {f"ferry.requests.{late}": 1})
    await start_worker(live)
    await set_route(kafka_bootstrap, alias, {late: 50, live: 50})
    tenant = unique("retry")
    api_key = await add_key(kafka_bootstrap, tenant)
    gw = await start_gateway(auth=True, ingress=router.ingress, attempt_timeout_s=3.0)
    n = 24
    auth = {"Authorization": f"Bearer {api_key}"}

    async def call(i: int) -> dict:
        async with http.post(f"{gw.url}/v1/completions", headers=auth,
                             json={"model": alias, "prompt": f"call {i}",
                                   "max_tokens": 3}) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    answers = await asyncio.gather(*(call(i) for i in range(n)))
    assert {a["model"] for a in answers} == {live}
    retries = gw.registry.get_sample_value("ferry_gateway_retries_total", {"alias": alias})
    assert retries and retries >= 1
    await start_worker(late)  # serves the first attempts still queued for it
    records = await asyncio.to_thread(committed_records, kafka_bootstrap,
                                      f"ferry.requests.{late}")
    ends = {TopicPartition(f"ferry.requests.{late}", p): max(
        o for _, _, q, o in records if q == p) + 1 for _, _, p, _ in records}
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + 120
        while True:  # until the late worker has answered its whole queue (and committed)
            done = await admin.list_consumer_group_offsets(worker_group(late))
            if all(tp in done and done[tp].offset >= end for tp, end in ends.items()):
                break
            assert time.monotonic() < deadline, "the late worker never answered its queue"
            await asyncio.sleep(0.2)
    finally:
        await admin.close()
    replies = Counter(orjson.loads(v)["id"] for _, v, _, _ in await asyncio.to_thread(
        committed_records, kafka_bootstrap, gw.app[GATEWAY].reply_to))
    charges = sum(1 for k, _, _, _ in await asyncio.to_thread(
        committed_records, kafka_bootstrap, f"{router.app_id}.quotas") if k == tenant.encode())
    twice = sum(1 for c in replies.values() if c > 1)
    print(f"\n[faults] {'gateway retries same id':<28} N={n:<4} answers={len(answers)} "
          f"retries={retries:.0f} charged={charges} ids with 2 results on the reply topic="
          f"{twice} (max {max(replies.values())})")
    assert len(replies) == n and charges == n
    assert twice == retries and max(replies.values()) == 2
