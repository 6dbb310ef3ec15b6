"""The front door on the real broker: router process + gateway + workers.

Producers post to the router's ingress with an API key; the gateway authenticates HTTP
callers and goes through the same router. Every test uses its own aliases and tenants.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import openai
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from edge.topic_admin import ensure_topics
from ferry.broker import free_port
from schemas import ErrorCode, Request, Result, decode, decode_request, requests_topic
from schemas.tables import QuotaState
from schemas.topics import API_KEY_HEADER
from streams.front.client import FerryClient
from streams.front.gateway import GATEWAY
from streams.routing.keys import KeyRing, Tenant, add_key, revoke_key
from streams.routing.quota import REST_OF_CONTEXT_CHARGE, admit, estimate_tokens
from streams.routing.routes import parse_weights, pick, set_route
from streams.routing.transactions import Sink, TransactionalIngress
from tests.conftest import own_engine, wait_for
from tests.harness import RouterProcess, post
from tests.router_load import committed_records, router_killed_mid_load
from workers.config import WorkerConfig
from workers.engine import GenerationInput, SamplingParams
from workers.worker import Worker


def expected_text(engine, prompt: str, max_new_tokens: int) -> str:
    [out] = engine.generate([GenerationInput(engine.encode(prompt),
                                             SamplingParams(max_new_tokens=max_new_tokens))])
    return out.text


async def post_ingress(client: FerryClient, ingress: str, api_key: str, model: str,
                       key: bytes | None, **fields: object) -> asyncio.Future[Result]:
    request = Request(id=uuid.uuid4().hex, model=model, **{"prompt": "hi", **fields})
    return await client.submit(request, ingress, key=key,
                               headers=[(API_KEY_HEADER, api_key.encode())])


async def count_forwarded(bootstrap: str, topics: list[str], n: int,
                          timeout: float = 30.0) -> dict[str, list[Request]]:
    """Read requests from deployment topics until `n` in all (or the timeout)."""
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                isolation_level="read_committed")
    await consumer.start()
    seen: dict[str, list[Request]] = {t: [] for t in topics}
    try:
        deadline = time.monotonic() + timeout
        while sum(map(len, seen.values())) < n and time.monotonic() < deadline:
            for tp, msgs in (await consumer.getmany(timeout_ms=200)).items():
                seen[tp.topic] += [decode_request(m.value) for m in msgs]
    finally:
        await consumer.stop()
    return seen


# ---- units: the routing core, quotas, keys --------------------------------------------

def test_pick_is_weighted_deterministic_and_excludes() -> None:
    weights = {"a": 90, "b": 10}
    ids = [uuid.uuid4().hex for _ in range(4000)]
    share_b = sum(pick(weights, i) == "b" for i in ids) / len(ids)
    assert 0.08 < share_b < 0.12
    assert all(pick(weights, i) == pick(dict(reversed(weights.items())), i) for i in ids[:50])
    assert {pick(weights, i, exclude={"a"}) for i in ids[:50]} == {"b"}
    assert pick(weights, "x", exclude={"a", "b"}) is None
    assert pick({"a": 0, "b": 5}, "x") == "b"


def test_parse_weights_names_the_bad_part() -> None:
    assert parse_weights(["a=90", "b=10", "c"]) == {"a": 90, "b": 10, "c": 100}
    for bad, word in ((["a=x"], "weight of a"), (["a=-1"], "weight of a"),
                      (["bad name=1"], "deployment"), (["a=0"], "weights")):
        with pytest.raises(ValueError, match=word):
            parse_weights(bad)


def test_token_buckets() -> None:
    tenant = Tenant("t", rpm=3, tpm=100)
    state: QuotaState | None = None
    for _ in range(3):
        verdict = admit(state, tenant, 10, now=1000.0)
        assert verdict.allowed
        state = verdict.state
    refused = admit(state, tenant, 10, now=1000.0)
    assert not refused.allowed and "rpm" in refused.reason
    assert refused.retry_after_s == pytest.approx(20.0)  # one request refills in 60/3 s
    assert admit(state, tenant, 10, now=1020.0).allowed
    assert state == QuotaState(at=1000.0, r=0.0, t=70.0)  # what the quota table stores
    assert not admit(None, tenant, 101, now=0.0).allowed  # can never fit
    assert admit(None, Tenant("free", None, None), 10**9, now=0.0).allowed
    assert estimate_tokens(None, [1, 2, 3], 5) == 8 and estimate_tokens("abcdefgh", None, 1) == 3
    # No max_tokens (the rest of the context): charged as a long answer, never as none.
    assert estimate_tokens(None, [1, 2, 3], 0) == 3 + REST_OF_CONTEXT_CHARGE


def test_keys_authenticate_only_the_whole_key() -> None:
    ring = KeyRing("unused:9092")  # not started: the table is filled by hand
    api_key = "fk_0123456789ab_" + "A" * 32
    ring.view.values["key:0123456789ab"] = {"tenant": "acme", "sha256": __import__(
        "hashlib").sha256(api_key.encode()).hexdigest()}
    ring.view.values["tenant:acme"] = {"rpm": 5, "tpm": None}
    assert ring.authenticate(api_key) == Tenant("acme", 5, None)
    for wrong in (api_key[:-1] + "B", "", None, "fk_0123456789ab", "Bearer " + api_key):
        assert ring.authenticate(wrong) is None


# ---- on the broker -------------------------------------------------------------------

async def test_openai_client_through_gateway_router_and_worker(
        router, start_worker, start_gateway, http, engine, unique, kafka_bootstrap) -> None:
    model, alias = unique("llama"), unique("chat")
    await start_worker(f"{model}-v1")
    await start_worker(f"{model}-v2")
    await set_route(kafka_bootstrap, alias, {f"{model}-v1": 100})
    api_key = await add_key(kafka_bootstrap, unique("acme"))
    gw = await start_gateway(auth=True, ingress=router.ingress,
                             host_routes={"llama.example": alias})
    async with gw.openai(api_key) as api:
        completion = await api.completions.create(model=alias, prompt="hello", max_tokens=5)
        chat = await api.chat.completions.create(
            model=alias, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        chunks = [c async for c in await api.chat.completions.create(
            model=alias, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            stream=True)]
    assert completion.choices[0].text == expected_text(engine, "hello", 5)
    assert completion.model == f"{model}-v1"  # the deployment that answered
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        chat.choices[0].message.content

    # A version path pins its deployment; a Host entry names the alias.
    auth = {"Authorization": f"Bearer {api_key}"}
    status, obj = await post(http, f"{gw.url}/v1/models/{model}/versions/v2/completions",
                             {"prompt": "hello", "max_tokens": 2}, headers=auth)
    assert status == 200 and obj["model"] == f"{model}-v2"
    status, obj = await post(http, f"{gw.url}/v1/completions", {"prompt": "hi", "max_tokens": 2},
                             headers={**auth, "Host": "llama.example"})
    assert status == 200 and obj["model"] == f"{model}-v1"

    # Async: 202 at once, then long poll; another tenant cannot read it.
    status, accepted = await post(http, f"{gw.url}/v1/completions",
                                  {"model": alias, "prompt": "hello", "max_tokens": 5,
                                   "async": True}, headers=auth)
    assert status == 202
    async with http.get(f"{gw.url}/v1/requests/{accepted['id']}?wait=30",
                        headers=auth) as resp:
        assert resp.status == 200
        assert (await resp.json())["choices"][0]["text"] == expected_text(engine, "hello", 5)
    other = await add_key(kafka_bootstrap, unique("other"))
    keys = gw.app[GATEWAY].keys
    await wait_for(lambda: keys is not None and keys.authenticate(other) is not None,
                   what="the gateway to see the new key")
    async with http.get(f"{gw.url}/v1/requests/{accepted['id']}",
                        headers={"Authorization": f"Bearer {other}"}) as resp:
        assert resp.status == 404

    # A bad key is refused at the gateway; a revoked one within a second or so.
    async with gw.openai("fk_000000000000_" + "x" * 32) as stranger:
        with pytest.raises(openai.AuthenticationError):
            await stranger.completions.create(model=alias, prompt="hi")
    await revoke_key(kafka_bootstrap, api_key)
    deadline = time.monotonic() + 10
    while True:
        status, obj = await post(http, f"{gw.url}/v1/completions",
                                 {"model": alias, "prompt": "hi", "max_tokens": 1}, headers=auth)
        if status == 401:
            break
        assert time.monotonic() < deadline, "revoked key still accepted after 10s"
    assert obj["error"]["code"] == "unauthenticated"  # from the gateway or the router
    assert gw.registry.get_sample_value("ferry_gateway_rejections_total",
                                        {"reason": "unauthenticated"}) >= 1
    # Observed when a stream's first text is sent (the chat stream above), not at results.
    assert gw.registry.get_sample_value("ferry_gateway_time_to_first_token_seconds_count",
                                        {"route": "/v1/chat/completions"}) >= 1


async def test_split_lands_within_bounds_and_route_changes_live(
        router, client, unique, kafka_bootstrap) -> None:
    a, b, alias = unique("dep-a"), unique("dep-b"), unique("alias")
    await ensure_topics(kafka_bootstrap, {requests_topic(a): 2, requests_topic(b): 2})
    await set_route(kafka_bootstrap, alias, {a: 90, b: 10})
    tenant = unique("split")
    api_key = await add_key(kafka_bootstrap, tenant)
    n = 400
    for _ in range(n):  # no workers: the requests stay on the deployment topics to be counted
        await post_ingress(client, router.ingress, api_key, alias, tenant.encode())
    seen = await count_forwarded(kafka_bootstrap, [requests_topic(a), requests_topic(b)], n)
    assert sum(map(len, seen.values())) == n
    # Binomial(400, 0.1): mean 40, sd 6; +-4 sd.
    assert 16 <= len(seen[requests_topic(b)]) <= 64, {t: len(v) for t, v in seen.items()}
    assert all(r.model == a for r in seen[requests_topic(a)])

    # Route change: every router sees it without a restart.
    await set_route(kafka_bootstrap, alias, {b: 100})
    changed = time.monotonic()
    consumer = AIOKafkaConsumer(requests_topic(b), bootstrap_servers=kafka_bootstrap,
                                auto_offset_reset="latest", enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.seek_to_end()
        arrived = False
        while not arrived:  # a probe every 100 ms until one is forwarded to b
            assert time.monotonic() - changed < 10, "route change not applied within 10s"
            await post_ingress(client, router.ingress, api_key, alias, tenant.encode())
            for msgs in (await consumer.getmany(timeout_ms=100)).values():
                arrived = arrived or any(decode(m.value)["model"] == b for m in msgs)
        print(f"route change seen by the router within {time.monotonic() - changed:.2f}s")
    finally:
        await consumer.stop()


async def test_quotas_reject_exactly_what_exceeds_them(
        router, client, unique, kafka_bootstrap, read_topic) -> None:
    dep = unique("quota")
    await ensure_topics(kafka_bootstrap, {requests_topic(dep): 1})
    tenant = unique("rpm")
    api_key = await add_key(kafka_bootstrap, tenant, rpm=5)
    # Half keyed by tenant, half not (the router re-keys those first): the count is exact.
    futures = [await post_ingress(client, router.ingress, api_key, dep,
                                  tenant.encode() if i % 2 else None) for i in range(8)]
    await wait_for(lambda: sum(f.done() for f in futures) >= 3, what="3 refusals")
    forwarded = await read_topic(requests_topic(dep), 6, timeout=3)
    assert len(forwarded) == 5  # nobody serves dep: the 5 admitted stay unanswered
    results = [f.result() for f in futures if f.done()]
    assert len(results) == 3
    assert {r.id for r in results}.isdisjoint(decode(m.value)["id"] for m in forwarded)
    assert all(r.error and r.error.code is ErrorCode.QUOTA_EXCEEDED for r in results)
    assert all(r.error and r.error.retry_after_s and 0 < r.error.retry_after_s <= 12
               for r in results)

    tenant2 = unique("tpm")
    key2 = await add_key(kafka_bootstrap, tenant2, tpm=100)
    futures = [await post_ingress(client, router.ingress, key2, dep, tenant2.encode(),
                                  prompt=None, input_ids=[1] * 10, max_new_tokens=10)
               for _ in range(6)]  # 20 tokens each: 5 fit in 100
    too_big = await post_ingress(client, router.ingress, key2, dep, tenant2.encode(),
                                 max_new_tokens=200)
    # No limit (the rest of the context): charged as 2,048 tokens, not as none.
    unbounded = await post_ingress(client, router.ingress, key2, dep, tenant2.encode(),
                                   prompt=None, input_ids=[1] * 10, max_new_tokens=0)
    sixth, big, unbounded = await asyncio.wait_for(
        asyncio.gather(futures[5], too_big, unbounded), 30)
    assert sixth.error and sixth.error.code is ErrorCode.QUOTA_EXCEEDED
    assert "tpm" in sixth.error.message
    assert big.error and "exceed the quota of 100" in big.error.message
    assert big.error.retry_after_s is None
    assert unbounded.error and "2058 tokens exceed the quota of 100" in unbounded.error.message
    assert all(not f.done() for f in futures[:5])

    letters = await read_topic("ferry.dlq", 1, where=lambda m: tenant2 in (m.key or b"").decode()
                               and b'"quota"' in m.value)
    assert decode(letters[0].value)["component"] == "router"
    assert router.metric("ferry_router_rejected_total", {"reason": "quota_exceeded"}) >= 5
    assert router.metric("ferry_router_rekeyed_total") >= 4


async def test_unknown_key_and_model_get_error_results(router, client, unique,
                                                      kafka_bootstrap) -> None:
    api_key = await add_key(kafka_bootstrap, unique("t"))
    bad = await post_ingress(client, router.ingress, "fk_000000000000_" + "z" * 32, "m", b"x")
    unknown = await post_ingress(client, router.ingress, api_key, unique("nobody"), None)
    bad, unknown = await asyncio.wait_for(asyncio.gather(bad, unknown), 30)
    assert bad.error and bad.error.code is ErrorCode.UNAUTHENTICATED
    assert unknown.error and unknown.error.code is ErrorCode.UNKNOWN_MODEL


async def test_quota_state_survives_a_router_restart(client, unique, kafka_bootstrap,
                                                    tmp_path) -> None:
    tag = uuid.uuid4().hex[:8]
    proc = RouterProcess(f"ferry-router-restart-{tag}", f"ferry.ingress.restart-{tag}",
                         free_port(), tmp_path / "router.log")
    dep, tenant = unique("dep"), unique("restart")
    await ensure_topics(kafka_bootstrap, {requests_topic(dep): 1})
    api_key = await add_key(kafka_bootstrap, tenant, rpm=3)  # refills one per 20 s
    await asyncio.to_thread(proc.start, kafka_bootstrap)
    try:
        for _ in range(3):
            await post_ingress(client, proc.ingress, api_key, dep, tenant.encode())
        probe = await post_ingress(client, proc.ingress, api_key, dep, tenant.encode())
        assert (await asyncio.wait_for(probe, 30)).error.code is ErrorCode.QUOTA_EXCEEDED
        await asyncio.to_thread(proc.stop)
        await asyncio.to_thread(proc.start, kafka_bootstrap)
        after = await post_ingress(client, proc.ingress, api_key, dep, tenant.encode())
        result = await asyncio.wait_for(after, 30)
        assert result.error and result.error.code is ErrorCode.QUOTA_EXCEEDED
    finally:
        await asyncio.to_thread(proc.stop)


async def test_killed_backend_is_retried_on_another(router, start_worker, start_gateway,
                                                    unique, engine, kafka_bootstrap,
                                                    tiny_model) -> None:
    a, b, alias = unique("a"), unique("b"), unique("alias")
    config = WorkerConfig(model_dir=tiny_model, deployment=a, bootstrap=kafka_bootstrap)
    doomed = Worker(config, own_engine(engine, config))
    task = asyncio.create_task(doomed.run())
    await asyncio.wait_for(doomed.ready.wait(), 60)
    await start_worker(b)
    await set_route(kafka_bootstrap, alias, {a: 50, b: 50})
    api_key = await add_key(kafka_bootstrap, unique("t"))
    gw = await start_gateway(auth=True, ingress=router.ingress, attempt_timeout_s=1.5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    async with gw.openai(api_key) as api:
        answers = await asyncio.gather(*[api.completions.create(
            model=alias, prompt="hello", max_tokens=3) for _ in range(12)])
    assert {c.model for c in answers} == {b}
    assert all(c.choices[0].text == expected_text(engine, "hello", 3) for c in answers)
    assert gw.registry.get_sample_value("ferry_gateway_retries_total", {"alias": alias}) >= 1


async def test_busy_deployment_gets_503_with_retry_after(start_gateway, http, unique,
                                                        kafka_bootstrap) -> None:
    dep = unique("busy")  # a topic, no worker: every accepted request adds to the lag
    await ensure_topics(kafka_bootstrap, {requests_topic(dep): 1})
    gw = await start_gateway(max_lag=3)
    accepted = 0
    deadline = time.monotonic() + 20
    while True:
        async with http.post(f"{gw.url}/v1/completions",
                             json={"model": dep, "prompt": "x", "async": True}) as resp:
            if resp.status == 503:
                assert int(resp.headers["Retry-After"]) >= 1
                assert (await resp.json())["error"]["code"] == "overloaded"
                break
            assert resp.status == 202
            accepted += 1
        assert time.monotonic() < deadline, "never reported busy"
    assert accepted >= 3
    assert gw.registry.get_sample_value("ferry_gateway_rejections_total",
                                        {"reason": "overloaded"}) == 1



# ---- exactly once, fail-over, graceful stop --------------------------------------------

async def _read(bootstrap: str, topic: str, isolation: str, window_s: float, *,
                quiet_s: float | None = None) -> list[bytes]:
    """The values of `topic` a reader with `isolation` sees within `window_s`: the first
    ones fetched, or (`quiet_s`) all until nothing new comes for that long."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, isolation_level=isolation,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    values: list[bytes] = []
    try:
        deadline = last = time.monotonic()
        deadline += window_s
        while time.monotonic() < deadline:
            if values and (quiet_s is None or time.monotonic() - last >= quiet_s):
                break
            for msgs in (await consumer.getmany(timeout_ms=100)).values():
                values += [m.value for m in msgs]
                last = time.monotonic()
    finally:
        await consumer.stop()
    return values


async def test_forwarded_records_are_visible_only_once_committed(kafka_bootstrap,
                                                                 unique) -> None:
    """What the router writes for an ingress record is visible to read_committed readers
    only when the record's transaction commits, and its commit point moves with it."""
    source, out, group = unique("ingress"), unique("out"), unique("router")
    await ensure_topics(kafka_bootstrap, {source: 1, out: 1})
    handled, release = asyncio.Event(), asyncio.Event()

    async def handle(record, sink: Sink) -> None:
        await sink.send(out, record.key, record.value)
        handled.set()
        await release.wait()  # the transaction stays open until the test says

    ingress = TransactionalIngress(kafka_bootstrap, group, source, handle, writes_to=(out,))
    task = asyncio.create_task(ingress.run())
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    await admin.start()
    try:
        await producer.send_and_wait(source, b"one", key=b"k")
        await asyncio.wait_for(handled.wait(), 30)
        assert await _read(kafka_bootstrap, out, "read_uncommitted", 10) == [b"one"]
        assert await _read(kafka_bootstrap, out, "read_committed", 1) == []
        assert not await admin.list_consumer_group_offsets(group)
        release.set()
        assert await _read(kafka_bootstrap, out, "read_committed", 10) == [b"one"]
        committed = await admin.list_consumer_group_offsets(group)
        assert committed[TopicPartition(source, 0)].offset == 1
    finally:
        release.set()
        ingress.stop()
        await asyncio.wait_for(task, 30)
        await producer.stop()
        await admin.close()


async def test_a_transaction_left_open_is_aborted_by_its_timeout(kafka_bootstrap,
                                                                unique) -> None:
    """A forwarding transaction that stays open (a router stuck, or killed with no
    successor to fence it) holds read_committed readers of its output only until its
    timeout: the broker aborts it and later records become visible. The stuck router, once
    it moves again, finds itself fenced and stops without committing (aiokafka cannot tell
    a timed-out transaction from a zombie's); its successor forwards the record once."""
    source, out, group = unique("ingress"), unique("out"), unique("router")
    await ensure_topics(kafka_bootstrap, {source: 1, out: 1})
    handled, release = asyncio.Event(), asyncio.Event()

    async def handle(record, sink: Sink) -> None:
        await sink.send(out, record.key, record.value)
        await sink.acks[-1]  # in the log: what follows it waits for the transaction
        handled.set()
        await release.wait()

    ingress = TransactionalIngress(kafka_bootstrap, group, source, handle, writes_to=(out,),
                                   transaction_timeout_ms=1_500)
    task = asyncio.create_task(ingress.run())
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    successor = None
    try:
        await producer.send_and_wait(source, b"one", key=b"k")
        await asyncio.wait_for(handled.wait(), 30)
        await producer.send_and_wait(out, b"later")  # behind the open transaction
        assert await _read(kafka_bootstrap, out, "read_committed", 1) == []
        # The broker looks for timed-out transactions every 10 s by default.
        assert await _read(kafka_bootstrap, out, "read_committed", 30) == [b"later"]
        release.set()
        with pytest.raises(KafkaError):
            await asyncio.wait_for(task, 30)

        async def forward(record, sink: Sink) -> None:
            await sink.send(out, record.key, record.value)

        successor = TransactionalIngress(kafka_bootstrap, group, source, forward,
                                         writes_to=(out,))
        successor_task = asyncio.create_task(successor.run())
        deadline, seen = time.monotonic() + 30, []
        while b"one" not in seen and time.monotonic() < deadline:
            seen = await _read(kafka_bootstrap, out, "read_committed", 10, quiet_s=2)
        assert sorted(seen) == [b"later", b"one"]
        successor.stop()
        await asyncio.wait_for(successor_task, 30)
    finally:
        release.set()
        ingress.stop()
        if successor is not None:
            successor.stop()
        await producer.stop()


async def test_router_killed_mid_load_forwards_each_request_once(kafka_bootstrap, unique,
                                                                 tmp_path) -> None:
    """SIGKILL mid-load, restarted at once (the fault suite's row, smaller)."""
    row = await router_killed_mid_load(kafka_bootstrap, tmp_path, unique, n=400,
                                       name="router SIGKILL (small)")
    assert row.lost == 0 and row.duplicated == 0, str(row)
    assert row.quota_lost == 0 and row.quota_duplicated == 0, str(row)
    assert row.recovery_s <= 15, str(row)


async def test_sigterm_commits_and_leaves_the_group_at_once(client, unique, kafka_bootstrap,
                                                          tmp_path) -> None:
    from confluent_kafka.admin import AdminClient

    tag = uuid.uuid4().hex[:8]
    proc = RouterProcess(f"ferry-router-term-{tag}", f"ferry.ingress.term-{tag}", free_port(),
                         tmp_path / "router.log")
    dep, tenant = unique("dep"), unique("term")
    await ensure_topics(kafka_bootstrap, {requests_topic(dep): 1})
    api_key = await add_key(kafka_bootstrap, tenant)
    await asyncio.to_thread(proc.start, kafka_bootstrap)
    try:
        for _ in range(20):
            await post_ingress(client, proc.ingress, api_key, dep, tenant.encode())
        seen = await count_forwarded(kafka_bootstrap, [requests_topic(dep)], 20)
        assert len(seen[requests_topic(dep)]) == 20
        assert proc.process is not None
        stopping = time.monotonic()
        proc.process.terminate()
        assert await asyncio.to_thread(proc.process.wait, 20) == 0
        stopped_in = time.monotonic() - stopping
    finally:
        await asyncio.to_thread(proc.stop)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    group = admin.describe_consumer_groups([proc.app_id])[proc.app_id].result(timeout=10)
    assert not group.members, "the stopped router is still a member"  # left, not expired
    assert str(group.state).endswith("EMPTY"), group.state
    ends = {p: o + 1 for _, _, p, o in await asyncio.to_thread(
        committed_records, kafka_bootstrap, proc.ingress)}
    committed_at = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await committed_at.start()
    try:
        points = await committed_at.list_consumer_group_offsets(proc.app_id)
    finally:
        await committed_at.close()
    assert {tp.partition: m.offset for tp, m in points.items()} == ends
    print(f"router stopped {stopped_in:.2f}s after SIGTERM, group empty, all committed")


async def test_a_request_no_topic_accepts_is_dead_lettered_and_the_partition_moves_on(
        router, client, unique, kafka_bootstrap, read_topic) -> None:
    """A forwarded request its requests topic refuses (here: over the topic's size limit)
    fails its transaction every time: it becomes a dead letter and an error result, and the
    requests after it on the same partition are forwarded."""
    dep, tenant = unique("small"), unique("big")
    await ensure_topics(kafka_bootstrap, {requests_topic(dep): 1},
                        configs={"max.message.bytes": "4000"})
    api_key = await add_key(kafka_bootstrap, tenant)
    big = await post_ingress(client, router.ingress, api_key, dep, tenant.encode(),
                             prompt="x" * 6000)
    after = [await post_ingress(client, router.ingress, api_key, dep, tenant.encode())
             for _ in range(3)]
    seen = await count_forwarded(kafka_bootstrap, [requests_topic(dep)], 3)
    assert len(seen[requests_topic(dep)]) == 3
    letters = await read_topic("ferry.dlq", 1, where=lambda m: m.key == tenant.encode()
                               and b"not deliverable" in m.value)
    letter = decode(letters[0].value)
    assert letter["component"] == "router" and letter["source_topic"] == router.ingress
    assert "MessageSizeTooLarge" in letter["reason"]
    answer = await asyncio.wait_for(big, 30)
    assert answer.error and answer.error.code is ErrorCode.REQUEST_TOO_LARGE
    assert not any(f.done() for f in after)  # forwarded; no worker serves them
