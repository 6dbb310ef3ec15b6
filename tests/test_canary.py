"""Canary rollout: the judging rules, the weight split, and whole canaries on the real broker."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from edge.topic_admin import ensure_topics
from ferry.cli import main
from schemas import Request, decode, encode, requests_topic
from schemas.topics import TELEMETRY_TOPIC
from streams.rollout.canary import (
    CanaryOutcome, CanaryPolicy, WindowStats, judge, parse_seconds, run_canary, split_weights,
)
from streams.routing.routes import RouteTable, pick, read_routes, set_route
from tests.conftest import wait_for
from workers.telemetry import telemetry_record

POLICY = CanaryPolicy(steps=[50, 100], every_s=1.0, min_requests=10)


def stats(n: int, errors: int = 0, latency_ms: float = 10.0) -> WindowStats:
    window = WindowStats()
    for i in range(n):
        window.add(latency_ms, "inference_failed" if i < errors else None)
    return window


# ---- pure parts --------------------------------------------------------------------------

def test_judge_passes_a_healthy_new_side() -> None:
    assert judge(stats(100, errors=1), stats(100, errors=5), POLICY) is None


def test_judge_rolls_back_on_error_rate_over_the_margin() -> None:
    reason = judge(stats(100, errors=1), stats(100, errors=7), POLICY)
    assert reason is not None and "error rate 7.0%" in reason


def test_judge_needs_min_requests_on_the_new_side() -> None:
    assert judge(stats(100), stats(9, errors=9), POLICY) is None
    assert judge(stats(100), stats(10, errors=9), POLICY) is not None


def test_judge_without_old_baseline_uses_zero_errors_and_skips_latency() -> None:
    assert judge(WindowStats(), stats(20, errors=1, latency_ms=1e6), POLICY) is None  # 5%
    assert "error rate" in (judge(WindowStats(), stats(20, errors=2), POLICY) or "")


def test_judge_rolls_back_on_p99() -> None:
    assert judge(stats(50, latency_ms=10), stats(50, latency_ms=15), POLICY) is None
    reason = judge(stats(50, latency_ms=10), stats(50, latency_ms=16), POLICY)
    assert reason is not None and "p99" in reason


def test_window_stats_count_only_server_errors() -> None:
    window = WindowStats()
    for error in (None, "invalid_request", "prompt_too_long", "quota_exceeded",
                  "deadline_exceeded", "overloaded"):
        window.add(5.0, error)
    assert (window.requests, window.errors) == (3, 2)
    window = WindowStats([float(i) for i in range(1, 101)])
    assert window.p99 == 99.0 and WindowStats([1.0, 7.0]).p99 == 7.0


def test_split_weights_keeps_old_proportions() -> None:
    weights = split_weights({"a": 90, "b": 10}, "c", 25)
    assert weights == {"a": 68, "b": 7, "c": 25}  # 67.5 : 7.5, the tie rounds up by name
    assert split_weights({"a": 1, "b": 1, "c": 1}, "n", 1) == {"a": 33, "b": 33, "c": 33, "n": 1}
    assert split_weights({"a": 100, "idle": 0}, "n", 5) == {"a": 95, "idle": 0, "n": 5}
    assert split_weights({"a": 50, "n": 50}, "n", 75) == {"a": 25, "n": 75}
    assert split_weights({"a": 90, "b": 10}, "c", 100) == {"c": 100}
    for percent in range(1, 100):
        split = split_weights({"x": 7, "y": 13, "z": 29}, "n", percent)
        assert sum(split.values()) == 100 and split["n"] == percent


def test_parse_seconds_and_policy_validation() -> None:
    assert [parse_seconds(t) for t in ("60s", "2m", "1.5", "500ms")] == [60, 120, 1.5, 0.5]
    with pytest.raises(ValueError):
        parse_seconds("soon")
    for steps in ([50, 25, 100], [5, 25], [0, 100], [50, 50, 100]):
        with pytest.raises(ValueError):
            CanaryPolicy(steps=steps, every_s=1)


# ---- on the real broker --------------------------------------------------------------------

@pytest.fixture
async def routes(kafka_bootstrap: str) -> AsyncIterator[RouteTable]:
    table = RouteTable(kafka_bootstrap)
    await table.start()
    yield table
    await table.close()


@pytest.fixture
async def telemetry(kafka_bootstrap: str) -> AsyncIterator[Callable[..., Awaitable[None]]]:
    """telemetry(deployment, latencies_ms, errors): send one synthetic batch record."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()

    async def send(deployment: str, latencies_ms: list[float], errors: list[str | None]) -> None:
        record = telemetry_record(deployment, latencies_ms, errors, time.time())
        await producer.send_and_wait(TELEMETRY_TOPIC, encode(record), key=deployment.encode())

    yield send
    await producer.stop()


async def _canary_with(kafka_bootstrap: str, routes: RouteTable, alias: str, to: str,
                       policy: CanaryPolicy, at_first_step: Callable[[], Awaitable[None]]
                       ) -> CanaryOutcome:
    """Run a canary; once its first step is on the route, call `at_first_step`."""
    await ensure_topics(kafka_bootstrap, {requests_topic(to): 1})  # `to` exists, as canaries ask
    canary = asyncio.create_task(run_canary(kafka_bootstrap, alias, to, policy))
    first = policy.steps[0]
    await wait_for(lambda: (r := routes.get(alias)) is not None and r.weights.get(to) == first,
                   timeout=10, what="the first canary step on the route")
    await at_first_step()
    return await asyncio.wait_for(canary, 20)


async def test_canary_rolls_back_on_error_rate(kafka_bootstrap, routes, telemetry,
                                               unique) -> None:
    alias, a, b, new = unique("alias"), unique("a"), unique("b"), unique("new")
    await set_route(kafka_bootstrap, alias, {a: 90, b: 10})

    async def bad_new() -> None:
        await telemetry(a, [10.0] * 20, [None] * 20)
        # 50% server errors; the client errors beside them are not counted at all.
        await telemetry(new, [10.0] * 24, ["inference_failed", None] * 10 + ["invalid_request"] * 4)

    policy = CanaryPolicy(steps=[25, 100], every_s=2.0, min_requests=10)
    outcome = await _canary_with(kafka_bootstrap, routes, alias, new, policy, bad_new)
    assert outcome.status == "rolled_back" and outcome.step == 25
    assert outcome.reason is not None and "error rate 50.0%" in outcome.reason
    assert outcome.steps[0].new.requests == 20 and outcome.steps[0].old.requests == 20
    assert (await read_routes(kafka_bootstrap))[alias].weights == {a: 90, b: 10}


async def test_canary_rolls_back_on_p99(kafka_bootstrap, routes, telemetry, unique) -> None:
    alias, old, new = unique("alias"), unique("old"), unique("new")
    await set_route(kafka_bootstrap, alias, {old: 100})

    async def slow_new() -> None:
        await telemetry(old, [10.0] * 20, [None] * 20)
        await telemetry(new, [100.0] * 20, [None] * 20)

    policy = CanaryPolicy(steps=[10, 100], every_s=2.0, min_requests=10)
    outcome = await _canary_with(kafka_bootstrap, routes, alias, new, policy, slow_new)
    assert outcome.status == "rolled_back" and "p99 latency 100ms" in (outcome.reason or "")
    assert (await read_routes(kafka_bootstrap))[alias].weights == {old: 100}


async def test_canary_completes_on_real_workers(kafka_bootstrap, start_worker, client, routes,
                                                unique) -> None:
    alias, old, new = unique("alias"), unique("old"), unique("new")
    await asyncio.gather(start_worker(old), start_worker(new))
    await set_route(kafka_bootstrap, alias, {old: 100})
    await wait_for(lambda: routes.get(alias) is not None, timeout=10, what="the route")

    async def load() -> None:
        """Closed-loop load on the alias, resolved by the live route as a router would."""
        while True:
            rid = uuid.uuid4().hex
            deployment = pick(routes.get(alias).weights, rid)
            await client.request(Request(id=rid, model=deployment, input_ids=[5, 6, 7],
                                         max_new_tokens=2))

    loaders = [asyncio.create_task(load()) for _ in range(4)]
    try:
        # Two identical deployments: only the wiring is under test here, not latency noise.
        policy = CanaryPolicy(steps=[50, 100], every_s=2.5, min_requests=3, max_p99_ratio=20)
        outcome = await asyncio.wait_for(run_canary(kafka_bootstrap, alias, new, policy), 20)
    finally:
        for task in loaders:
            task.cancel()
        await asyncio.gather(*loaders, return_exceptions=True)
    assert outcome.status == "completed", outcome.reason
    assert outcome.weights == {new: 100}
    half, full = outcome.steps
    assert half.weights == {old: 50, new: 50}
    assert half.old.requests >= 3 and half.new.requests >= 3 and full.new.requests >= 3
    assert half.old.errors == half.new.errors == full.new.errors == 0
    assert (await read_routes(kafka_bootstrap))[alias].weights == {new: 100}


async def test_worker_sends_telemetry_per_batch(kafka_bootstrap, start_worker, client, engine,
                                                unique) -> None:
    dep = unique("tele")
    await start_worker(dep)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(TELEMETRY_TOPIC, 0)  # the worker created it with one partition
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        await consumer.position(tp)
        good, bad = await asyncio.gather(
            client.request(Request(id="good", model=dep, input_ids=[5, 6], max_new_tokens=2)),
            client.request(Request(id="bad", model=dep, input_ids=[engine.config.vocab_size + 5],
                                   max_new_tokens=2)))
        assert good.error is None and bad.error is not None
        records: list[dict] = []
        deadline = time.monotonic() + 10
        while sum(len(r["errors"]) for r in records) < 2 and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            records += [decode(m.value) for ms in batch.values() for m in ms
                        if m.key == dep.encode()]
    finally:
        await consumer.stop()
    # The refusal is answered at admission, the good one from a batch: one record each.
    assert len(records) == 2
    assert sorted((e for r in records for e in r["errors"]), key=str) == [None, "invalid_request"]
    for record in records:
        assert record["deployment"] == dep and abs(record["at"] - time.time()) < 30
        assert len(record["latencies_ms"]) == len(record["errors"])
        assert all(0 <= ms < 30_000 for ms in record["latencies_ms"])


def test_cli_canary_on_idle_alias_completes_and_missing_alias_fails(kafka_bootstrap,
                                                                     unique, capsys) -> None:
    alias, old, new = unique("alias"), unique("old"), unique("new")
    asyncio.run(set_route(kafka_bootstrap, alias, {old: 100}))
    base = ["--to", new, "--steps", "50,100", "--every", "0.3s", "--bootstrap", kafka_bootstrap]
    assert main(["canary", alias, *base]) == 2  # no such deployment: refused, route unchanged
    assert f"no deployment {new!r}" in capsys.readouterr().err
    assert asyncio.run(read_routes(kafka_bootstrap))[alias].weights == {old: 100}
    asyncio.run(ensure_topics(kafka_bootstrap, {requests_topic(new): 1}))
    assert main(["canary", alias, *base]) == 0  # no traffic: steps pass unjudged
    assert asyncio.run(read_routes(kafka_bootstrap))[alias].weights == {new: 100}
    assert "not judged" in capsys.readouterr().out
    assert main(["canary", unique("nothing"), *base]) == 2
    assert "has no route" in capsys.readouterr().err
