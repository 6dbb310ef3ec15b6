"""Hostile input on the real broker: no record can stop a component or write where it must not.

Each test is one finding of the fault report (issue 14): reply topics a request names are
confined (never a control table, never a name Kafka refuses), a reply that cannot be
delivered becomes a dead letter while the partition moves on, and background readers fail
loudly instead of silently.
"""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from edge.tables import CompactedView, put
from edge.topic_admin import TopicCreationError, ensure_topics
from schemas import DLQ_TOPIC, RESULTS_TOPIC, Request, Result, decode, encode, requests_topic
from schemas.topics import API_KEY_HEADER, reply_topic_problem
from streams.front.client import FerryClient
from streams.front.recent_results import TENANT_HEADER, RecentResults
from streams.routing.keys import add_key
from tests.conftest import own_engine, wait_for


async def end_offset(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or {0}
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in parts])
        return sum(ends.values())
    finally:
        await consumer.stop()


async def post_raw(bootstrap: str, topic: str, value: dict, key: bytes | None = None,
                   headers: list[tuple[str, bytes]] | None = None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, encode(value), key=key, headers=headers)
    finally:
        await producer.stop()


def dead_letters_for(request_id: str):
    return lambda m: request_id in (decode(m.value).get("value") or "") + (
        decode(m.value).get("key") or "")


def test_reply_topic_policy() -> None:
    assert reply_topic_problem(RESULTS_TOPIC) is None
    assert reply_topic_problem("ferry.replies.gateway-1") is None
    assert reply_topic_problem("acme.replies") is None
    for internal in ("ferry.keys", "ferry.routes", "ferry_keys", "ferry.requests.x",
                     "__consumer_offsets", "ferry.dlq"):
        assert "internal topic" in reply_topic_problem(internal), internal
    for illegal in ("a b", "..", "x" * 250, ""):
        assert "Kafka accepts" in reply_topic_problem(illegal), illegal
    assert "outside this tenant's" in reply_topic_problem("other.x", prefix="acme.")
    assert reply_topic_problem("acme.x", prefix="acme.") is None
    assert reply_topic_problem(RESULTS_TOPIC, prefix="acme.") is None


async def test_topic_creation_refusal_raises(kafka_bootstrap: str, unique) -> None:
    base = unique("coll")
    await ensure_topics(kafka_bootstrap, {f"{base}.x": 1})
    try:
        await ensure_topics(kafka_bootstrap, {f"{base}_x": 1})  # collides once . == _
    except TopicCreationError as exc:
        assert "collides" in str(exc) or "not created" in str(exc)
    else:
        raise AssertionError("a colliding topic name was accepted silently")


async def test_worker_never_answers_on_internal_topics(kafka_bootstrap, start_worker, unique,
                                                       client: FerryClient, read_topic) -> None:
    """A request naming a control table as reply_to is dead-lettered; the table is untouched
    and the worker serves on."""
    dep = unique("dep")
    await start_worker(dep)
    control = f"ferry.{unique('table')}"  # stands for ferry.keys / ferry.routes
    await ensure_topics(kafka_bootstrap, {control: 1})
    rid = f"key:{uuid.uuid4().hex}"
    await post_raw(kafka_bootstrap, requests_topic(dep),
                   {"id": rid, "model": dep, "prompt": "hi", "reply_to": control})
    good = await client.request(Request(id=uuid.uuid4().hex, model=dep, prompt="Hello",
                                        max_new_tokens=3), timeout=60)
    assert good.error is None and len(good.output_ids) == 3
    [letter] = await read_topic(DLQ_TOPIC, 1, where=dead_letters_for(rid))
    assert decode(letter.value)["bad_field"] == "reply_to"
    assert "internal topic" in decode(letter.value)["reason"]
    assert await end_offset(kafka_bootstrap, control) == 0


async def test_undeliverable_reply_is_a_dead_letter_and_the_partition_moves_on(
        kafka_bootstrap, start_worker, unique, client: FerryClient, read_topic) -> None:
    """reply_to collides with an existing topic (Kafka refuses to create it): before, every
    worker reading it died and 45 of 100 later requests were never answered."""
    dep = unique("dep")
    worker = await start_worker(dep, partitions=1)  # everything behind the poison record
    base = unique("taken")
    await ensure_topics(kafka_bootstrap, {f"{base}.replies": 1})
    rid = uuid.uuid4().hex
    await post_raw(kafka_bootstrap, requests_topic(dep),
                   {"id": rid, "model": dep, "prompt": "hi", "reply_to": f"{base}_replies"})
    futures = [await client.submit(Request(id=uuid.uuid4().hex, model=dep, prompt=f"n{i}",
                                           max_new_tokens=2)) for i in range(20)]
    results = await asyncio.wait_for(asyncio.gather(*futures), 90)
    assert all(r.error is None for r in results) and len(results) == 20
    [letter] = await read_topic(DLQ_TOPIC, 1, where=dead_letters_for(rid))
    body = decode(letter.value)
    assert body["bad_field"] == "reply_to" and "not delivered" in body["reason"]
    assert worker.metrics.dead_letters.labels(dep, "reply_to")._value.get() == 1


async def test_router_writes_no_control_table_without_a_key(kafka_bootstrap, router, unique,
                                                            read_topic) -> None:
    """A keyless ingress record whose id is a control key and whose reply_to is a control
    topic: the router's `unauthenticated` answer must not land in that table."""
    control = f"ferry.{unique('table')}"
    await ensure_topics(kafka_bootstrap, {control: 1})
    rid = f"tenant:{unique('victim')}"
    await post_raw(kafka_bootstrap, router.ingress,
                   {"id": rid, "model": "anything", "prompt": "x", "reply_to": control})
    # And with a valid key but an internal reply_to: refused with a dead letter.
    api_key = await add_key(kafka_bootstrap, unique("tenant"))
    rid2 = f"route:{uuid.uuid4().hex}"
    await post_raw(kafka_bootstrap, router.ingress,
                   {"id": rid2, "model": "anything", "prompt": "x", "reply_to": control},
                   headers=[(API_KEY_HEADER, api_key.encode())])
    letters = await read_topic(DLQ_TOPIC, 2, where=lambda m: decode(m.value).get("component")
                               == "router" and (rid in (decode(m.value).get("value") or "")
                                                or rid2 in (decode(m.value).get("value") or "")))
    assert len(letters) == 2
    assert any("internal topic" in decode(m.value)["reason"] for m in letters)
    assert await end_offset(kafka_bootstrap, control) == 0


async def test_router_confines_a_tenant_to_its_reply_prefix(kafka_bootstrap, router, unique,
                                                            read_topic) -> None:
    tenant = unique("tenant")
    api_key = await add_key(kafka_bootstrap, tenant, reply_prefix=f"{tenant}.")
    async with FerryClient(kafka_bootstrap, reply_to=f"{tenant}.replies") as own:
        ok = await own.submit(Request(id=uuid.uuid4().hex, model=unique("nobody"), prompt="x"),
                              router.ingress, key=tenant.encode(),
                              headers=[(API_KEY_HEADER, api_key.encode())])
        refused_for_model = await asyncio.wait_for(ok, 30)  # answered on its own topic
        assert refused_for_model.error is not None
        assert refused_for_model.error.code.value == "unknown_model"
    other = unique("elsewhere")
    rid = uuid.uuid4().hex
    await post_raw(kafka_bootstrap, router.ingress,
                   {"id": rid, "model": "m", "prompt": "x", "reply_to": other},
                   key=tenant.encode(), headers=[(API_KEY_HEADER, api_key.encode())])
    [letter] = await read_topic(DLQ_TOPIC, 1, where=dead_letters_for(rid))
    assert "outside this tenant's reply topics" in decode(letter.value)["reason"]


async def test_recent_results_survive_a_non_utf8_header(kafka_bootstrap, unique) -> None:
    topic = unique("results")
    recent = RecentResults(kafka_bootstrap, topic=topic)
    await recent.start(partitions=1)
    try:
        bad, good = Result(id="bad", model="m"), Result(id="good", model="m")
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        await producer.send_and_wait(topic, encode(bad), key=b"bad",
                                     headers=[(TENANT_HEADER, b"\xff\xfe")])
        await producer.send_and_wait(topic, encode(good), key=b"good")
        await producer.stop()
        seen = await recent.wait("good", 20)
        assert seen is not None and seen.result.id == "good"
        assert recent.healthy
    finally:
        await recent.close()


async def test_control_view_skips_a_failing_callback_and_reports_a_dead_reader(
        kafka_bootstrap, unique) -> None:
    topic = f"test.{unique('table')}"
    view = CompactedView(kafka_bootstrap, topic)
    failures: list[BaseException] = []
    view.on_failure.append(failures.append)

    def flaky(key: str, _value: object) -> None:
        if key == "boom":
            raise ValueError("callback bug")

    view.on_change.append(flaky)
    await view.start()
    try:
        await put(kafka_bootstrap, topic, "boom", {"x": 1})
        await put(kafka_bootstrap, topic, "after", {"x": 2})
        await wait_for(lambda: "after" in view.values, 20, "the record after a failing one")
        assert view.healthy and not failures

        async def broken(*_: object, **__: object) -> dict:
            raise RuntimeError("broker gone")

        view.reader.consumer.getmany = broken  # type: ignore[union-attr,method-assign]
        await wait_for(lambda: bool(failures), 20, "the reader's death to be reported")
        assert not view.healthy and "broker gone" in repr(view.failure)
    finally:
        await view.close()


async def test_gateway_health_names_a_dead_reader(start_gateway, http) -> None:
    from streams.front.gateway import GATEWAY

    gateway = await start_gateway()
    async with http.get(f"{gateway.url}/healthz") as resp:
        assert resp.status == 200
    gateway.app[GATEWAY].routes.view.reader._failed(RuntimeError("reader died"))
    async with http.get(f"{gateway.url}/healthz") as resp:
        assert resp.status == 503
        body = await resp.json()
    assert "routes" in body["dead_readers"]


async def test_gateway_answers_401_to_a_non_ascii_key(start_gateway, http) -> None:
    gateway = await start_gateway(auth=True)
    async with http.post(f"{gateway.url}/v1/completions", data=b'{"model":"m","prompt":"x"}',
                         headers={"Authorization": "Bearer fk_\u00e9\u00e9"}) as resp:
        assert resp.status == 401


async def test_client_request_timeout_leaves_nothing_waiting(client: FerryClient,
                                                             unique) -> None:
    dep = unique("nobody-serves")
    try:
        await client.request(Request(id="t1", model=dep, prompt="x"), timeout=0.5)
    except TimeoutError:
        pass
    assert "t1" not in client._waiting


async def test_worker_stopped_while_starting_leaves_its_group(kafka_bootstrap, tiny_model,
                                                              engine, unique) -> None:
    """Before, a worker cancelled during start-up exited without leaving: its partitions
    stalled until the broker expired the ghost member."""
    from aiokafka.admin import AIOKafkaAdminClient
    from prometheus_client import CollectorRegistry

    from workers.config import WorkerConfig
    from workers.worker import Worker

    config = WorkerConfig(model_dir=tiny_model, deployment=unique("dep"),
                          bootstrap=kafka_bootstrap)
    worker = Worker(config, own_engine(engine, config), registry=CollectorRegistry())
    joined = asyncio.Event()
    start_clients = worker._start_clients

    async def slow_start() -> None:  # joins the group, then is still "starting"
        await start_clients()
        await wait_for(lambda: bool(worker._consumer.assignment()), 30, "a partition")
        joined.set()
        await asyncio.Event().wait()

    worker._start_clients = slow_start  # type: ignore[method-assign]
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(joined.wait(), 60)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        [group] = await admin.describe_consumer_groups([config.group])
        members = group.groups[0][5]  # (error, id, state, protocol type, protocol, members)
        assert members == [], "the stopped worker is still a member of its group"
    finally:
        await admin.close()


async def test_extreme_sampling_values_fail_no_batch_mate(start_worker, client, engine,
                                                          unique) -> None:
    """Before, one schema-valid extreme temperature or top_p made the sampler raise and the
    whole batch was answered inference_failed."""
    from workers.engine import GenerationInput, SamplingParams

    dep = unique("dep")
    await start_worker(dep)
    extreme = [dict(temperature=1e-300), dict(temperature=100.0), dict(top_p=1e-300,
               temperature=1.0), dict(temperature=1e-30, top_p=1e-30, seed=3)]
    greedy = Request(id=uuid.uuid4().hex, model=dep, prompt="Hello there", max_new_tokens=5)
    requests = [Request(id=uuid.uuid4().hex, model=dep, prompt="Hello there",
                        max_new_tokens=5, **params) for params in extreme] + [greedy]
    futures = [await client.submit(r) for r in requests]
    results = await asyncio.wait_for(asyncio.gather(*futures), 60)
    assert [r.error for r in results] == [None] * len(results)
    assert all(len(r.output_ids) == 5 for r in results)
    [alone] = engine.generate([GenerationInput(engine.encode("Hello there"),
                                               SamplingParams(max_new_tokens=5))])
    assert results[-1].output_ids == alone.output_ids


async def test_deadline_is_checked_between_decode_steps(kafka_bootstrap, tiny_model, engine,
                                                        client, unique) -> None:
    """Before, a deadline was checked only when a batch started: a request whose deadline
    passed mid-generation was answered ok. The engine here is slowed (each step takes 50 ms
    more) so that 60 tokens cannot finish within the deadline."""
    import time

    from prometheus_client import CollectorRegistry

    from workers.config import WorkerConfig
    from workers.worker import Worker

    config = WorkerConfig(model_dir=tiny_model, deployment=unique("dep"),
                          bootstrap=kafka_bootstrap)
    slow = own_engine(engine, config)
    steps = {"n": 0}
    step = slow.step

    def slow_step():  # simulated compute time, not synchronisation
        steps["n"] += 1
        time.sleep(0.05)
        return step()

    slow.step = slow_step  # type: ignore[method-assign]
    worker = Worker(config, slow, registry=CollectorRegistry())
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.ready.wait(), 60)
        result = await client.request(Request(
            id=uuid.uuid4().hex, model=config.deployment, prompt="Hello", max_new_tokens=60,
            deadline=time.time() + 1.0), timeout=60)
        assert result.error is not None and result.error.code.value == "deadline_exceeded"
        assert "before it finished" in result.error.message
        assert steps["n"] < 60 and not slow.has_work()  # dropped, not decoded to the end
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_gateway_closes_stalled_and_excess_connections(kafka_bootstrap) -> None:
    """Before, a client sending half a request line held its connection for ever."""
    from aiohttp import web
    from prometheus_client import CollectorRegistry

    from ferry.broker import free_port
    from streams.front.http_guard import ConnectionGuard

    async def ok(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    guard = ConnectionGuard(runner.server, CollectorRegistry(), header_timeout_s=0.3,
                            max_connections=2)
    port = free_port()
    server = await asyncio.get_running_loop().create_server(guard, "127.0.0.1", port)
    try:
        stalled_r, stalled_w = await asyncio.open_connection("127.0.0.1", port)
        stalled_w.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        assert await asyncio.wait_for(stalled_r.read(), 10) == b""  # closed by the server
        stalled_w.close()
        assert guard.closed.labels("header_timeout")._value.get() == 1
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        assert await asyncio.wait_for(conns[2][0].read(), 10) == b""  # the third: over the cap
        reader, writer = conns[0]
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200")
        for _, w in conns:
            w.close()
            await w.wait_closed()
    finally:
        server.close()
        await runner.cleanup()
