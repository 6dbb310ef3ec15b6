"""Fault suite (`make test-faults`; marker `faults`, not in the default run): worker processes
are killed, frozen and churned under load, and an independent checker (librdkafka, through
confluent-kafka, reading `read_committed` as every Ferry reader does) counts the answers per
request id on the reply topic. Every row must show lost 0 and duplicated 0, and every
partition that had requests waiting at a fault must be answering again within the bound.

Each scenario prints one row: N, lost, duplicated, errors by code, recovery time (the
slowest partition's wait, after the fault, for its next answer). Every worker row serves at
least 1,000 requests (issue 14 item 6): worker SIGKILL x3, a SIGSTOPped zombie, rebalance
churn, broker kill in a 3-node cluster, network partition, transaction over its timeout,
poison with a kill, TP rank kill, static membership. They run on brokers started here (never
the shared dev broker), so they can be killed, cut off and configured for the fault (3 s
sessions); each fault must strike while every partition has requests waiting, and rows that
strike three times post their requests in waves, one per fault. The router rows (1,200
requests each) and the gateway retry row (1,000 calls) run on the session's broker. The worker
SIGKILL case at one kill also runs in the default suite (tests/test_crash.py), and what a
rebalance keeps in tests/test_rebalance.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
import pytest
from aiokafka.partitioner import murmur2

from schemas import Request
from streams.front.client import FerryClient

if TYPE_CHECKING:
    from ferry.cluster import ClusterNode

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

PARTITIONS = 4
# Measured (shared 2-core box): 2.7-7.5 s on the suite's brokers with 3 s sessions (the
# session, then one eager rebalance, fencing); 5.7-13.7 s with the default broker's 6 s
# floor. The bounds leave room for a loaded machine; the goal (issue 14) is ~5 s.
RECOVERY_BOUND_S = 45.0


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
    started: float = field(default_factory=time.monotonic)
    waves: list[Callable[[], Awaitable[None]]] = field(default_factory=list)  # yet to post

    def answered(self) -> int:
        return len(self.answered_at)

    def waiting_partitions(self) -> set[int]:
        return {self.partition_of[r] for r in self.futures if r not in self.answered_at}

    async def next_wave(self) -> None:
        """Post the next wave of requests (see `serve_row`)."""
        await self.waves.pop(0)()

    def recovery(self, fault_at: float, partitions: set[int]) -> float:
        """Per partition waiting at the fault: its first answer after it; the slowest."""
        waits = []
        for p in partitions:
            after = [t for r, t in self.answered_at.items()
                     if self.partition_of[r] == p and t > fault_at]
            waits.append(min(after) - fault_at if after else float("inf"))
        return max(waits, default=0.0)


def key_for(partition: int) -> str:
    """A batch key the default partitioner puts on `partition`."""
    for i in range(10_000):
        key = f"fault-{partition}-{i}"
        if (murmur2(key.encode()) & 0x7FFFFFFF) % PARTITIONS == partition:
            return key
    raise AssertionError("no key found")


async def post(client: FerryClient, deployment: str, n: int, tokens: int = 24,
               load: Load | None = None, first: int = 0) -> Load:
    """Requests first..first+n-1 (added to `load` when given)."""
    load = load if load is not None else Load()
    keys = [key_for(p) for p in range(PARTITIONS)]
    for i in range(first, first + n):
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


def check(row: Row) -> None:
    assert row.lost == 0 and row.duplicated == 0, str(row)
    assert not row.errors, str(row)
    assert row.recovery_s <= RECOVERY_BOUND_S, str(row)


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

    from edge.topic_admin import ensure_topics
    from schemas.topics import worker_group
    from streams.front.gateway import GATEWAY
    from streams.routing.keys import add_key
    from streams.routing.routes import set_route
    from tests.router_load import committed_records

    late, live, alias = unique("late"), unique("live"), unique("alias")
    await ensure_topics(kafka_bootstrap, {f"ferry.requests.{late}": 1})
    await start_worker(live)
    await set_route(kafka_bootstrap, alias, {late: 50, live: 50})
    tenant = unique("retry")
    api_key = await add_key(kafka_bootstrap, tenant)
    gw = await start_gateway(auth=True, ingress=router.ingress, attempt_timeout_s=3.0)
    n = 1000
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


# ---- rows of issue 14 item 6: >= 1,000 requests each, on brokers of the suite's own --------
# Each runs on brokers started for it (never the dev broker), so they may be killed, cut off
# and configured for the fault: a 3-node cluster (RF 3, min ISR 2), and one node whose
# EXTERNAL listener is advertised through a TCP proxy the test cuts.

BIG = 1000          # good requests per row
BIG_TOKENS = 4      # tokens each: rows are about faults, not decode speed
# Shorter than the broker default's floor: these brokers allow it (group.min.session...).
FAST_SESSION_MS = 3000
FAST_RECOVERY_BOUND_S = 30.0


@dataclass
class Fleet:
    """The worker processes of one deployment. One that exits by itself is started again,
    as a supervisor would (the deployer's local launcher, Kubernetes), and counted; one the
    test kills is restarted by the test. Logs go to `logs/worker-N.log`."""

    model: Path
    dep: str
    logs: Path
    slots: list[list[str]]  # per worker: its flags (--bootstrap, ...)
    procs: list[subprocess.Popen | None] = field(default_factory=list)
    restarts: int = 0
    exits: list[tuple[int, int]] = field(default_factory=list)  # (slot, return code)
    exited_at: list[float] = field(default_factory=list)   # monotonic time of each exit
    then: dict[int, list[str]] = field(default_factory=dict)  # slot -> flags once restarted
    _watch: asyncio.Task | None = None

    def start(self, slot: int, flags: list[str] | None = None) -> None:
        if flags is not None:
            self.slots[slot] = flags
        while len(self.procs) <= slot:
            self.procs.append(None)
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"worker-{slot}.log").open("ab") as out:
            self.procs[slot] = subprocess.Popen(
                [sys.executable, "-m", "ferry.cli", "worker", "--model", str(self.model),
                 "--deployment", self.dep, "--max-num-seqs", "16", "--metrics-port", "off",
                 *self.slots[slot]],
                stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})

    def __enter__(self) -> Fleet:
        for slot in range(len(self.slots)):
            self.start(slot)
        self._watch = asyncio.create_task(self._supervise())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kill(self, slot: int) -> None:
        """SIGKILL worker `slot` and start its replacement at once (not counted)."""
        proc = self.procs[slot]
        assert proc is not None and proc.poll() is None, f"worker {slot} is not running"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        self.start(slot)

    def add(self, flags: list[str]) -> int:
        """Start one more worker, in a slot (and log) of its own; its slot."""
        self.slots.append(flags)
        self.start(len(self.slots) - 1)
        return len(self.slots) - 1

    async def stop(self, slot: int, timeout: float = 60) -> int:
        """SIGTERM worker `slot` (a graceful leave), not restarted; its return code. Waited
        for in a thread: the event loop goes on timing the answers meanwhile."""
        proc, self.procs[slot] = self.procs[slot], None  # out of the supervisor's sight first
        assert proc is not None and proc.poll() is None, f"worker {slot} is not running"
        proc.terminate()
        return await asyncio.to_thread(proc.wait, timeout)

    def log(self, slot: int) -> str:
        return (self.logs / f"worker-{slot}.log").read_text(errors="replace")

    def joins(self, slot: int) -> int:
        """How many times worker `slot` (its replacements included: one log per slot) has
        been assigned partitions, as its log says."""
        return len(re.findall(r"assigned partitions \[\d", self.log(slot)))

    def partitions(self, slot: int) -> set[int]:
        """The partitions worker `slot` was last assigned, as its log says."""
        found = re.findall(r"assigned partitions \[([\d, ]*)\]", self.log(slot))
        return {int(p) for p in found[-1].split(",") if p.strip()} if found else set()

    def joined(self, slot: int) -> bool:
        """Whether worker `slot` has been assigned partitions (its log says so)."""
        return self.joins(slot) > 0

    async def _supervise(self) -> None:
        while True:  # polls exit codes, as a supervisor does; no test condition waits on it
            for slot, proc in enumerate(self.procs):
                if proc is not None and proc.poll() is not None:
                    self.exits.append((slot, proc.returncode))
                    self.exited_at.append(time.monotonic())
                    self.restarts += 1
                    self.start(slot, self.then.get(slot))
            await asyncio.sleep(0.2)


def read_committed(bootstrap: str, topic: str, timeout: float = 90.0) -> list:
    """Every record of `topic` visible read_committed, to its end (confluent-kafka)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"checker-{uuid.uuid4()}",
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "auto.offset.reset": "earliest"})
    try:
        parts = list(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in parts}
        records, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            positions = {tp.partition: tp.offset for tp in consumer.position(
                [TopicPartition(topic, p) for p in parts])}
            if all(positions[p] >= ends[p] for p in parts):
                break
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                records.append(msg)
        return records
    finally:
        consumer.close()


async def serve_row(name: str, bootstrap: str, fleet: Fleet,
                    fault: Callable[[Load], Awaitable[list[float]]], replies: str,
                    n: int = BIG, extra: Callable[[FerryClient], Awaitable[None]] | None = None,
                    ready: Callable[[], bool] | None = None,
                    waves: int = 1) -> tuple[Row, Load, Counter]:
    """The fleet serves n requests (spread over the partitions, once `ready()`) while
    `fault` strikes; then the checker counts the answers on `replies`. The requests are
    posted at once, or in `waves`: the first at once, each next one when `fault` calls
    `load.next_wave()` (any left when it returns are posted then). Waves are for faults
    struck again and again: each strikes its own wave, where one deep backlog would be half
    drained by the first fault and make recovery the time to drain it (after a hand-over a
    worker reads its old partitions' backlog before the new ones')."""
    with fleet:
        if ready is not None:
            await until(ready, 300, "the fleet to be ready")
        async with FerryClient(bootstrap, reply_to=replies) as client:
            load, size = Load(), n // waves

            def wave(first: int) -> Callable[[], Awaitable[None]]:
                count = size if first + 2 * size <= n else n - first  # the last takes the rest
                return lambda: post(client, fleet.dep, count, tokens=BIG_TOKENS, load=load,
                                    first=first)

            load.waves = [wave(k * size) for k in range(1, waves)]
            await post(client, fleet.dep, size, tokens=BIG_TOKENS, load=load)
            faulting = asyncio.create_task(fault(load))
            if extra is not None:
                await extra(client)
            recoveries = await faulting
            while load.waves:
                await load.next_wave()
            await asyncio.wait_for(asyncio.gather(*load.futures.values()), 400)
    ids, errors = await asyncio.to_thread(count_answers, bootstrap, replies)
    row = Row(name, n, lost=sum(1 for r in load.futures if ids[r] == 0),
              duplicated=sum(c - 1 for c in ids.values() if c > 1), errors=errors,
              recoveries=recoveries)
    served_s = max(load.answered_at.values()) - load.started
    print(f"\n[faults] {row} served in {served_s:.1f}s, worker restarts={fleet.restarts} "
          f"exits={fleet.exits} logs={fleet.logs}")
    if row.duplicated:  # where the second answers are: which partitions, when
        twice = {r for r, c in ids.items() if c > 1}
        copies = [(orjson.loads(m.value())["id"], m.partition(), m.offset(),
                   m.timestamp()[1] / 1000) for m in
                  await asyncio.to_thread(read_committed, bootstrap, replies)
                  if orjson.loads(m.value())["id"] in twice]
        for copy in sorted(copies)[:20]:
            print(f"[faults]   twice: {copy[0]} partition {copy[1]} offset {copy[2]} "
                  f"at {time.strftime('%H:%M:%S', time.localtime(copy[3]))}"
                  f".{int(copy[3] * 1000) % 1000:03d}")
    return row, load, ids


async def strike(load: Load, fault: Callable[[], None], after: int = 100
                 ) -> tuple[float, set[int]]:
    """Once `after` answers are in, run `fault`; (its time, the partitions then waiting)."""
    await until(lambda: load.answered() >= after, 240, f"{after} answers before the fault")
    waiting, fault_at = load.waiting_partitions(), time.monotonic()
    assert waiting, "the fault came too late to test anything"
    fault()
    print(f"\n[faults]   fault at {fault_at - load.started:.1f}s, {load.answered()}/"
          f"{len(load.futures)} answered, partitions {sorted(waiting)} waiting")
    return fault_at, waiting


async def recovered(load: Load, fault_at: float, waiting: set[int],
                    timeout: float = 180) -> float:
    await until(lambda: load.recovery(fault_at, waiting) < float("inf"), timeout,
                "every waiting partition to answer again")
    return load.recovery(fault_at, waiting)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    from ferry.cluster import LocalCluster

    nodes = LocalCluster(tmp_path_factory.mktemp("cluster"), size=3)
    nodes.up()
    yield nodes
    nodes.down()


@pytest.fixture(scope="module")
def fault_node(tmp_path_factory: pytest.TempPathFactory):
    """One node with a proxied EXTERNAL listener, short session timeouts allowed and timed-out
    transactions aborted within 0.2 s (the default scan is every 10 s)."""
    from ferry.broker import free_port
    from ferry.cluster import LocalCluster

    proxy_port = free_port()
    node = LocalCluster(tmp_path_factory.mktemp("faultnode"), size=1,
                        external={1: f"127.0.0.1:{proxy_port}"},
                        extra="group.min.session.timeout.ms=1000\n"
                              "transaction.abort.timed.out.transaction.cleanup.interval.ms=200\n")
    node.up()
    node.proxy_port = proxy_port  # type: ignore[attr-defined]
    yield node
    node.down()


def fast_flags(node: ClusterNode) -> list[str]:
    """A worker on the suite's node, with the short session: a dead or frozen member is
    found out after 3 s, not the default's 6."""
    return ["--bootstrap", node.bootstrap, "--session-timeout-ms", str(FAST_SESSION_MS)]


def all_waiting(waiting: set[int], what: str) -> None:
    """The fault must strike while every partition (the victim's too) has requests waiting:
    one after the load would pass without testing anything."""
    assert waiting == set(range(PARTITIONS)), f"{what} came with only {sorted(waiting)} waiting"


async def test_worker_sigkill_three_times(fault_node, tiny_model, unique, tmp_path) -> None:
    """Three SIGKILLs under load, each worker's replacement started at once: the other
    worker takes the killed one's partitions when its 3 s session expires, the replacement
    joins, and the next kill strikes the next wave of requests (one wave of 800 each)."""
    fleet = Fleet(tiny_model, unique("fault-kill3"), tmp_path / "logs",
                  [fast_flags(fault_node.node(1)) for _ in range(2)])

    async def kill_three(load: Load) -> list[float]:
        recoveries = []
        for round_ in range(3):
            before = load.answered()
            if round_:
                await load.next_wave()
            slot, joins = round_ % 2, fleet.joins(round_ % 2)
            fault_at, waiting = await strike(load, lambda: fleet.kill(slot), after=before + 50)
            all_waiting(waiting, f"kill {round_ + 1}")
            recoveries.append(await recovered(load, fault_at, waiting))
            await until(lambda: fleet.joins(slot) > joins, 120, "the replacement to join")
        return recoveries

    row, _, _ = await serve_row("worker SIGKILL x3", fault_node.node(1).bootstrap, fleet,
                                kill_three, unique("fault-replies"), n=3 * 800, waves=3,
                                ready=lambda: fleet.joined(0) and fleet.joined(1))
    check(row)
    assert len(row.recoveries) == 3 and fleet.restarts == 0, str(row)


FENCED = re.compile(r"ProducerFenced|InvalidProducerEpoch")
# What it held, as the revoke (when it gets that far before the fence stops it) or the
# hand-over after it says.
HELD = re.compile(r"\(rebalance\), (\d+) requests held|moved away, (\d+) unanswered")


async def test_sigstopped_zombie_answers_nothing_twice(fault_node, tiny_model, unique,
                                                       tmp_path) -> None:
    """A worker frozen (SIGSTOP) with work in hand loses its partitions when its 3 s session
    expires; the other serves them. Woken (SIGCONT) once the others have answered what it
    held, the zombie finds its transactional producers fenced (their next owner started
    producers with the same ids): it publishes nothing, so nothing is answered twice."""
    fleet = Fleet(tiny_model, unique("fault-zombie"), tmp_path / "logs",
                  [fast_flags(fault_node.node(1)) for _ in range(2)])
    fenced: list[str] = []
    held: list[int] = []  # requests the zombie still held when it woke (its log says)

    async def freeze(load: Load) -> list[float]:
        zombie = fleet.procs[0]
        assert zombie is not None
        fault_at, waiting = await strike(load, lambda: zombie.send_signal(signal.SIGSTOP))
        all_waiting(waiting, "the freeze")
        recovery = await recovered(load, fault_at, waiting)
        # What it held were among the first requests waiting at the freeze: answered by now.
        await until(lambda: load.answered() >= len(load.futures) - 20, 300, "most answers")
        mark = len(fleet.log(0))

        def fenced_and_gave_up() -> bool:
            woken = fleet.log(0)[mark:]
            return FENCED.search(woken) is not None and HELD.search(woken) is not None

        zombie.send_signal(signal.SIGCONT)
        await until(fenced_and_gave_up, 120,
                    "the woken zombie to find itself fenced and give up what it held")
        woken = fleet.log(0)[mark:]
        fenced.extend(FENCED.findall(woken))
        held.append(max(int(n or 0) for m in HELD.findall(woken) for n in m))
        return [recovery]

    row, _, _ = await serve_row("SIGSTOP zombie", fault_node.node(1).bootstrap, fleet, freeze,
                                unique("fault-replies"),
                                ready=lambda: fleet.joined(0) and fleet.joined(1))
    print(f"[faults]   the zombie, woken: {Counter(fenced)}, holding {held[0]} requests")
    check(row)
    assert held[0] > 0, "the zombie woke with no work in hand: nothing it could publish twice"


async def test_rebalance_churn(fault_node, tiny_model, unique, tmp_path) -> None:
    """Three times an extra member joins while the group serves (its wave of requests is
    posted as it starts, so it is assigned partitions with requests waiting, and 20 answers
    come in with it), then leaves gracefully under load (SIGTERM: it delivers or hands back
    what it holds and leaves the group) while its partitions have requests waiting: every
    partition waiting at a leave answers again within the bound. The first wave (of 1,000,
    like each) is served before any churn."""
    node = fault_node.node(1)
    fleet = Fleet(tiny_model, unique("fault-churn"), tmp_path / "logs",
                  [fast_flags(node) for _ in range(2)])
    at_join: list[int] = []  # requests waiting as each extra member joined

    async def churn(load: Load) -> list[float]:
        recoveries = []
        for round_ in range(3):
            slot = fleet.add(fast_flags(node))
            await until(lambda: "worker starting" in fleet.log(slot), 120,
                        "the extra member to start")
            await load.next_wave()
            await until(lambda: fleet.joined(slot), 120, "the extra member to join")
            at_join.append(len(load.futures) - load.answered())
            joined = load.answered()
            await until(lambda: load.answered() >= joined + 20, 120,
                        "answers with the extra member")
            waiting, fault_at = load.waiting_partitions(), time.monotonic()
            owned = fleet.partitions(slot)
            print(f"\n[faults]   leave at {fault_at - load.started:.1f}s, {load.answered()}/"
                  f"{len(load.futures)} answered, partitions {sorted(waiting)} waiting, the "
                  f"leaving member's {sorted(owned)}")
            # What a leave moves must have requests waiting, or it tests nothing.
            assert owned and owned <= waiting, f"leave {round_ + 1}: {owned} not all waiting"
            assert await fleet.stop(slot) == 0, f"extra member {slot} did not stop cleanly"
            recoveries.append(await recovered(load, fault_at, waiting))
        return recoveries

    row, _, _ = await serve_row("rebalance churn", node.bootstrap, fleet, churn,
                                unique("fault-replies"), n=4 * 1000, waves=4,
                                ready=lambda: fleet.joined(0) and fleet.joined(1))
    print(f"[faults]   requests waiting as each extra member joined: {at_join}")
    check(row)
    assert len(row.recoveries) == 3 and fleet.restarts == 0, str(row)
    assert all(at_join), f"an extra member joined with nothing waiting: {at_join}"


async def test_broker_sigkill_in_a_three_node_cluster(cluster, tiny_model, unique,
                                                      tmp_path) -> None:
    """RF 3, min ISR 2: the node coordinating the workers' group is killed -9 mid-load and
    restarted once every partition answers again. Leaders, the group and the transaction
    coordinators move; acks=all writes go on with two replicas."""
    from aiokafka.admin import AIOKafkaAdminClient

    bootstrap = cluster.bootstrap
    fleet = Fleet(tiny_model, unique("fault-rf3"), tmp_path / "logs",
                  [["--bootstrap", bootstrap] for _ in range(2)])

    async def kill_coordinator(load: Load) -> list[float]:
        await until(lambda: load.answered() >= 50, 240, "answers before the kill")
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            victim = await admin.find_coordinator(f"ferry.workers.{fleet.dep}")
            [topic] = await admin.describe_topics([f"ferry.requests.{fleet.dep}"])
        finally:
            await admin.close()
        assert all(len(p["replicas"]) == 3 for p in topic["partitions"]), topic
        fault_at, waiting = await strike(load, lambda: cluster.kill(victim), after=0)
        recovery = await recovered(load, fault_at, waiting)
        cluster.start(victim)
        await cluster.wait_ready(node_id=victim)
        print(f"\n[faults] killed node {victim}, restarted after {time.monotonic() - fault_at:.1f}s")
        return [recovery]

    row, _, _ = await serve_row("broker SIGKILL, RF 3", bootstrap, fleet, kill_coordinator,
                                unique("fault-replies"))
    check(row)


async def test_network_partition_fences_the_cut_off_worker(fault_node, tiny_model, unique,
                                                            tmp_path) -> None:
    """Worker 0 reaches the broker only through a proxy; the proxy is cut for longer than
    the session timeout (its partitions move to worker 1), then healed: the cut-off worker
    comes back fenced (its transactions can commit nothing) and nothing is answered twice."""
    from tests.tcp_proxy import TcpProxy

    node = fault_node.node(1)
    proxy = TcpProxy("127.0.0.1", node.external_port, fault_node.proxy_port)
    await proxy.start()
    session_ms = FAST_SESSION_MS
    flags = ["--session-timeout-ms", str(session_ms)]
    fleet = Fleet(tiny_model, unique("fault-cut"), tmp_path / "logs",
                  [["--bootstrap", f"127.0.0.1:{fault_node.proxy_port}", *flags],
                   ["--bootstrap", node.bootstrap, *flags]])

    async def cut(load: Load) -> list[float]:
        fault_at, waiting = await strike(load, proxy.cut)
        recovery = await recovered(load, fault_at, waiting)
        cut_for = session_ms / 1000 + 4
        await until(lambda: time.monotonic() - fault_at > cut_for, cut_for + 5,
                    "the cut to outlast the session timeout")
        proxy.heal()
        return [recovery]

    try:
        row, _, _ = await serve_row("network partition", node.bootstrap, fleet, cut,
                                    unique("fault-replies"))
    finally:
        await proxy.close()
    check(row)


async def test_transaction_over_its_timeout(fault_node, tiny_model, unique, tmp_path) -> None:
    """Worker 0's transactions may stay open 5 ms (the broker aborts any open longer, every
    0.2 s): one is aborted under load, its producer fenced, the worker stops (it cannot tell
    a timeout from a new owner) and is restarted; worker 1 has the default 60 s."""
    node = fault_node.node(1)
    base = ["--bootstrap", node.bootstrap, "--session-timeout-ms", str(FAST_SESSION_MS)]
    fleet = Fleet(tiny_model, unique("fault-txn"), tmp_path / "logs",
                  [[*base, "--transaction-timeout-ms", "5"], base])

    fleet.then[0] = base  # restarted with the default timeout

    async def time_out(load: Load) -> list[float]:
        await until(lambda: load.answered() >= 50, 240, "answers before the timeout")
        await until(lambda: fleet.restarts >= 1, 120, "a transaction over its timeout")
        fault_at, waiting = fleet.exited_at[0], load.waiting_partitions()
        return [await recovered(load, fault_at, waiting)] if waiting else []

    row, _, _ = await serve_row("transaction over timeout", node.bootstrap, fleet, time_out,
                                unique("fault-replies"))
    assert fleet.restarts >= 1 and "ProducerFenced" in (
        tmp_path / "logs" / "worker-0.log").read_text(errors="replace")
    check(row)


async def test_worker_sigkill_static_membership(fault_node, tiny_model, unique,
                                                tmp_path) -> None:
    """Fast failover: each worker has a static group instance id and a 3 s session; a
    replacement started with the killed worker's id takes its partitions back with no
    rebalance (the other worker never stops), or, if it is slower than the session, the
    other worker takes them over after 3 s."""
    node = fault_node.node(1)
    fleet = Fleet(tiny_model, unique("fault-static"), tmp_path / "logs",
                  [["--bootstrap", node.bootstrap, "--session-timeout-ms", str(FAST_SESSION_MS),
                    "--group-instance-id", f"w{i}"] for i in range(2)])

    async def kill_three(load: Load) -> list[float]:
        recoveries = []
        for round_ in range(3):
            start = load.answered()
            await until(lambda: load.answered() >= min(start + 50, len(load.futures)), 240,
                        "answers before a kill")
            if len(load.waiting_partitions()) < PARTITIONS:
                break  # too late for a kill that tests anything
            fault_at, waiting = await strike(load, lambda: fleet.kill(round_ % 2), after=0)
            recoveries.append(await recovered(load, fault_at, waiting))
        return recoveries

    row, _, _ = await serve_row("worker SIGKILL, static ids", node.bootstrap, fleet, kill_three,
                                unique("fault-replies"))
    check(row)
    assert row.recovery_s <= FAST_RECOVERY_BOUND_S, str(row)


async def test_tp_rank_sigkill(fault_node, tiny_model, unique, tmp_path) -> None:
    """A TP=2 replica loses its rank 1 to SIGKILL: the replica stops (rank 0 sees the broken
    process group within --tp-timeout) unanswered, the plain replica takes its partitions,
    and the replica is restarted; every request is answered once."""
    from tests.test_tp_serving import rank_pids

    node = fault_node.node(1)
    base = ["--bootstrap", node.bootstrap, "--session-timeout-ms", str(FAST_SESSION_MS)]
    fleet = Fleet(tiny_model, unique("fault-tp"), tmp_path / "logs",
                  [[*base, "--tp", "2", "--tp-timeout", "10"], base])

    async def kill_rank(load: Load) -> list[float]:
        ranks = rank_pids(fleet.procs[0])  # type: ignore[arg-type]
        assert len(ranks) == 2, ranks
        fault_at, waiting = await strike(load, lambda: os.kill(ranks[1], signal.SIGKILL),
                                         after=20)
        recovery = await recovered(load, fault_at, waiting)
        await until(lambda: fleet.restarts >= 1, 60, "the broken replica to stop")
        return [recovery]

    row, _, _ = await serve_row("TP rank SIGKILL", node.bootstrap, fleet, kill_rank,
                                unique("fault-replies"),
                                ready=lambda: fleet.joined(0) and fleet.joined(1))
    assert fleet.exits and fleet.exits[0][0] == 0 and fleet.exits[0][1] != 0, fleet.exits
    check(row)


def poison(dep: str, replies: str, taken: str) -> list[tuple[str, dict | bytes | None, dict]]:
    """Every kind of hostile record the fault report found, as (kind, value, how it must
    end): `answer` (an error code, or None for a normal answer) and/or `dlq`."""
    def req(**fields: object) -> dict:
        return {"id": f"poison-{uuid.uuid4().hex[:12]}", "model": dep, "prompt": "poison",
                "max_new_tokens": BIG_TOKENS, "reply_to": replies, **fields}

    return [
        ("not JSON", b"{not json", {"dlq": True}),
        ("empty value", None, {"dlq": True}),
        ("not an object", b"[1, 2, 3]", {"dlq": True}),
        ("no id", {"model": dep, "prompt": "x", "reply_to": replies}, {"dlq": True}),
        ("wrong field type", req(max_new_tokens="many"),
         {"dlq": True, "answer": "invalid_request"}),
        ("negative max_new_tokens", req(max_new_tokens=-1),
         {"dlq": True, "answer": "invalid_request"}),
        ("control-table reply_to", req(reply_to="ferry.keys"), {"dlq": True}),
        ("control reply_to with _", req(reply_to="ferry_routes"), {"dlq": True}),
        ("Kafka-internal reply_to", req(reply_to="__consumer_offsets"), {"dlq": True}),
        ("request-topic reply_to", req(reply_to=f"ferry.requests.{dep}"), {"dlq": True}),
        ("illegal reply_to", req(reply_to="a b/c"), {"dlq": True}),
        ("colliding reply_to", req(reply_to=f"{taken}_replies"), {"dlq": True}),
        ("stream_to = reply_to", req(stream_to=replies),
         {"dlq": True, "answer": "invalid_request"}),
        ("temperature 1e-300", req(temperature=1e-300), {"answer": None}),
        ("temperature 100", req(temperature=100.0, seed=1), {"answer": None}),
        ("top_p 1e-300", req(temperature=1.0, top_p=1e-300), {"answer": None}),
        ("non-UTF-8 headers", req(), {"answer": None,
                                      "headers": [("ferry-mirrored", b"\xff\xfe"),
                                                  ("ferry-primary", b"\xc3\x28"),
                                                  ("x-\u00e9", b"\x80")]}),
        ("non-UTF-8 key", req(), {"answer": None, "key": b"\xff\xfe\xfd"}),
        ("unknown model", req(model=f"{dep}-nobody"), {"answer": "unknown_model"}),
        ("prompt too long", req(prompt="word " * 4000), {"answer": "prompt_too_long"}),
        ("deadline passed", req(deadline=time.time() - 60), {"answer": "deadline_exceeded"}),
    ]


async def test_poison_mixed_into_load_with_a_sigkill(fault_node, tiny_model, unique,
                                                     tmp_path) -> None:
    """1,000 good requests with every kind of poison among them (3 of each), and a worker
    SIGKILLed mid-way: every good request answered once without error, every poison answered
    with its error (or normally, for odd but valid values) and/or dead-lettered, once."""
    from aiokafka import AIOKafkaProducer

    from edge.topic_admin import ensure_topics
    from schemas import DLQ_TOPIC, encode, requests_topic

    node = fault_node.node(1)
    bootstrap = node.bootstrap
    dep, replies, taken = unique("fault-poison"), unique("fault-replies"), unique("fault-taken")
    await ensure_topics(bootstrap, {f"{taken}.replies": 1})
    fleet = Fleet(tiny_model, dep, tmp_path / "logs",
                  [["--bootstrap", bootstrap, "--session-timeout-ms", str(FAST_SESSION_MS)]
                   for _ in range(2)])
    posted: list[tuple[str, dict | bytes | None, dict, int, int]] = []  # + partition, offset

    async def post_poison() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for copy in range(3):
                for i, (kind, value, fate) in enumerate(poison(dep, replies, taken)):
                    raw = value if value is None or isinstance(value, bytes) else encode(value)
                    key = fate.get("key", key_for((copy + i) % PARTITIONS).encode())
                    meta = await producer.send_and_wait(requests_topic(dep), raw, key=key,
                                                        headers=fate.get("headers"))
                    posted.append((kind, value, fate, meta.partition, meta.offset))
        finally:
            await producer.stop()

    good = BIG
    with fleet:
        async with FerryClient(bootstrap, reply_to=replies) as client:
            load = await post(client, dep, good // 2, tokens=BIG_TOKENS)
            await post_poison()
            await post(client, dep, good - good // 2, tokens=BIG_TOKENS, load=load,
                       first=good // 2)
            fault_at, waiting = await strike(load, lambda: fleet.kill(0), after=150)
            recovery = await recovered(load, fault_at, waiting)
            await asyncio.wait_for(asyncio.gather(*load.futures.values()), 400)
    ids, errors = await asyncio.to_thread(count_answers, bootstrap, replies)
    results = {orjson.loads(m.value())["id"]: orjson.loads(m.value()) for m in
               await asyncio.to_thread(read_committed, bootstrap, replies)}
    letters = Counter(
        (letter["partition"], letter["offset"]) for letter in
        (orjson.loads(m.value()) for m in await asyncio.to_thread(read_committed, bootstrap,
                                                                   DLQ_TOPIC))
        if letter.get("source_topic") == requests_topic(dep))
    wrong = []
    for kind, value, fate, partition, offset in posted:
        rid = value.get("id") if isinstance(value, dict) else None
        answers = ids[rid] if rid else 0
        want_answers = 1 if "answer" in fate else 0
        code = ((results.get(rid) or {}).get("error") or {}).get("code") if rid else None
        if (answers != want_answers or letters[(partition, offset)] != int("dlq" in fate)
                or ("answer" in fate and code != fate["answer"])):
            wrong.append((kind, answers, letters[(partition, offset)], code))
    good_errors = sum(1 for r in load.futures if (results.get(r) or {}).get("error"))
    row = Row("poison + worker SIGKILL", good + len(posted),
              lost=sum(1 for r in load.futures if ids[r] == 0),
              duplicated=sum(c - 1 for c in ids.values() if c > 1), errors=errors,
              recoveries=[recovery])
    print(f"\n[faults] {row} poison={len(posted)} dead-lettered={sum(letters.values())} "
          f"worker restarts={fleet.restarts}")
    assert row.lost == 0 and row.duplicated == 0 and good_errors == 0, str(row)
    assert not wrong, f"poison that did not end as it must: {wrong}"
    assert sum(letters.values()) == sum(1 for p in posted if "dlq" in p[2])
    assert row.recovery_s <= RECOVERY_BOUND_S, str(row)
