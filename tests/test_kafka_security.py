"""Kafka security: a secure broker (SASL/SCRAM, ACLs) started by this module on its own
port, tenants' principals confined to ingress and their reply prefix, a worker serving as
its own least-privilege principal; and the ACL tables and client options as data."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import faust
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    GroupAuthorizationFailedError, KafkaConnectionError, TopicAuthorizationFailedError,
)
from prometheus_client import CollectorRegistry

from edge.kafka_clients import (
    KafkaSecurity, KafkaSecurityError, client_options, faust_options, security_from_env,
)
from ferry import kafka_acls
from ferry.broker import SecureBroker, free_port
from ferry.cli import main
from schemas import Request, decode_result, encode, requests_topic
from schemas.topics import API_KEY_HEADER, INGRESS_TOPIC, KEYS_TOPIC, RESULTS_TOPIC, ROUTES_TOPIC
from streams.rollout.launchers import LocalLauncher, ManifestLauncher, worker_kafka_env
from streams.routing.keys import KeyRing, Tenant
from streams.routing.registry import DeploymentRecord
from tests.harness import post
from workers.engine import Engine, GenerationInput, SamplingParams

# ---- client options from the environment (no broker) -------------------------------------


def test_plaintext_by_default_and_sasl_from_env() -> None:
    assert client_options(security_from_env({})) == {}
    security = security_from_env({"FERRY_KAFKA_SECURITY_PROTOCOL": "sasl_plaintext",
                                  "FERRY_KAFKA_USERNAME": "ferry-worker",
                                  "FERRY_KAFKA_PASSWORD": "pw"})
    assert client_options(security) == {
        "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "ferry-worker", "sasl_plain_password": "pw"}
    assert security_from_env(security.env()) == security  # `ferry kafka env` round trip
    credentials = faust_options(security)["broker_credentials"]
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.username, credentials.password, credentials.mechanism.value,
            credentials.protocol.value) == ("ferry-worker", "pw", "SCRAM-SHA-512",
                                            "SASL_PLAINTEXT")
    assert faust_options(KafkaSecurity()) == {}


@pytest.mark.parametrize(("env", "named"), [
    ({"FERRY_KAFKA_SECURITY_PROTOCOL": "SASL_PLAIN"}, "FERRY_KAFKA_SECURITY_PROTOCOL"),
    ({"FERRY_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "FERRY_KAFKA_SASL_MECHANISM": "MD5",
      "FERRY_KAFKA_USERNAME": "u", "FERRY_KAFKA_PASSWORD": "p"}, "FERRY_KAFKA_SASL_MECHANISM"),
    ({"FERRY_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "FERRY_KAFKA_USERNAME": "u"},
     "FERRY_KAFKA_PASSWORD"),
])
def test_unusable_settings_are_one_error_naming_the_variable(env: dict, named: str,
                                                             monkeypatch) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(KafkaSecurityError, match=named):
        AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", **client_options())


# ---- the ACL tables (no broker) ------------------------------------------------------------


def _allowed(bindings: list[dict], principal: str, operation: str, topic: str) -> bool:
    """Whether `bindings` let `principal` do `operation` on `topic` (ALLOW only, as ours are)."""
    return any(b["principal"] == f"User:{principal}" and b["resource_type"] == "TOPIC"
               and b["operation"] in (operation, "ALL")
               and (topic.startswith(b["name"]) if b["pattern"] == "PREFIXED"
                    else topic == b["name"])
               for b in bindings)


def test_tenant_bindings_are_ingress_and_its_prefix_only() -> None:
    bindings = kafka_acls.tenant_bindings("acme", "acme.")
    mine = [b for b in bindings if b["principal"] == "User:acme"]
    assert _allowed(mine, "acme", "WRITE", INGRESS_TOPIC)
    assert _allowed(mine, "acme", "READ", "acme.replies")
    for topic in (requests_topic("llama"), KEYS_TOPIC, ROUTES_TOPIC, RESULTS_TOPIC,
                  "ferry.deltas", "globex.replies"):
        assert not _allowed(mine, "acme", "WRITE", topic)
        assert not _allowed(mine, "acme", "READ", topic)
    assert {b["operation"] for b in mine if b["resource_type"] == "GROUP"} == {"READ", "DESCRIBE"}
    assert all(b["name"] == "acme." for b in mine if b["resource_type"] == "GROUP")
    # The components that answer a tenant may write its prefix; nobody else gets anything.
    others = {b["principal"] for b in bindings} - {"User:acme"}
    assert others == {f"User:{kafka_acls.ROUTER}", f"User:{kafka_acls.WORKER}"}
    assert _allowed(bindings, kafka_acls.WORKER, "WRITE", "acme.replies")


def test_only_operators_and_the_deployer_write_control_tables() -> None:
    bindings = kafka_acls.component_bindings()
    writers = {table: {p for p in kafka_acls.COMPONENTS if _allowed(bindings, p, "WRITE", table)}
               for table in kafka_acls.CONTROL_TABLES}
    assert writers[KEYS_TOPIC] == {kafka_acls.CONTROL}
    assert writers[ROUTES_TOPIC] == {kafka_acls.CONTROL, kafka_acls.DEPLOYER}
    # The worker reads requests, never the keys; the router never writes results of others'
    # deployments' topics it has no business with (ferry.telemetry).
    assert _allowed(bindings, kafka_acls.WORKER, "READ", requests_topic("llama"))
    assert not _allowed(bindings, kafka_acls.WORKER, "READ", KEYS_TOPIC)
    assert not _allowed(bindings, kafka_acls.ROUTER, "WRITE", "ferry.telemetry")
    # The router's group, transactional ids and quota topic: any app id `ferry-router…`.
    mine = [b for b in bindings if b["principal"] == f"User:{kafka_acls.ROUTER}"
            and b["resource_type"] in ("GROUP", "TRANSACTIONAL_ID")]
    assert {(b["resource_type"], b["name"], b["pattern"]) for b in mine} == {
        ("GROUP", "ferry-router", "PREFIXED"), ("TRANSACTIONAL_ID", "ferry-router", "PREFIXED")}
    assert _allowed(bindings, kafka_acls.ROUTER, "WRITE", "ferry-router-eu.quotas")
    assert not any(b["operation"] == "ALL" for b in bindings
                   if b["principal"] == f"User:{kafka_acls.ROUTER}")
    assert kafka_acls.tenant_prefixes(
        bindings + kafka_acls.tenant_bindings("acme", "acme.")) == {"acme": "acme."}


@pytest.mark.parametrize("prefix", ["ferry.", "f", "ferry_x.", "ferry-router", "_internal",
                                    "x", "bad name"])
def test_reply_prefixes_that_reach_ferrys_topics_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="reply prefix"):
        kafka_acls.check_reply_prefix(prefix)


def test_overlapping_tenant_prefixes_are_refused() -> None:
    kafka_acls.check_reply_prefix("acme.", {"globex": "globex."})
    for prefix in ("acme", "acme.eu.", "acme_"):  # '_' and '.' are one character to Kafka
        with pytest.raises(ValueError, match="overlaps tenant 'acme'"):
            kafka_acls.check_reply_prefix(prefix, {"acme": "acme."})
    for name in ("ferry-worker", "admin", "ferry-anything"):
        with pytest.raises(ValueError, match="reserved"):
            kafka_acls.check_tenant(name)


# ---- on a secure broker --------------------------------------------------------------------


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    if shutil.which("java") is None:
        pytest.skip("no Java: the secure broker runs the Kafka jars with Java 17")
    broker = SecureBroker(tmp_path_factory.mktemp("kafka-secure"), port=free_port())
    broker.up()
    try:
        yield broker
    finally:
        broker.down()


@pytest.fixture(scope="module")
def tenants(secure: SecureBroker) -> dict[str, KafkaSecurity]:
    """Two tenants, each with its default reply prefix (`acme.`, `globex.`)."""
    return {name: secure.add_tenant(name)[0] for name in ("acme", "globex")}


@contextlib.asynccontextmanager
async def producer_as(broker: SecureBroker, security: KafkaSecurity
                      ) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all",
                                request_timeout_ms=10_000, **client_options(security))
    try:  # start() inside: a producer refused while connecting is still closed
        await producer.start()
        yield producer
    finally:
        await producer.stop()


async def create_topics(broker: SecureBroker, security: KafkaSecurity, *names: str,
                        refused: bool = False) -> None:
    """Create topics as `security`; with `refused`, assert the broker says not authorized."""
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap, **client_options(security))
    try:
        await admin.start()
        response = await admin.create_topics([NewTopic(n, 1, 1) for n in names])
    finally:
        await admin.close()
    codes = {name: code for name, code, *_ in response.topic_errors}
    expected = {TopicAuthorizationFailedError.errno} if refused else {0, 36}  # 36: exists
    assert set(codes.values()) <= expected and codes, codes


async def read_one(broker: SecureBroker, security: KafkaSecurity, topic: str,
                   timeout_s: float = 30.0, **settings: object) -> list:
    """Records of partition 0 of `topic` from the beginning, read as `security`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", **settings,
                                **client_options(security))
    await consumer.start()
    try:
        if settings.get("group_id"):
            consumer.subscribe([topic])
        else:
            consumer.assign([TopicPartition(topic, 0)])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            if records := [r for rs in batch.values() for r in rs]:
                return records
        return []
    finally:
        await consumer.stop()


async def test_wrong_password_is_refused(secure, tenants, caplog) -> None:
    good = tenants["acme"]
    async with producer_as(secure, good):
        pass  # the right password connects
    wrong = KafkaSecurity(good.protocol, good.mechanism, good.username, "not-the-password")
    with pytest.raises(KafkaConnectionError):
        async with producer_as(secure, wrong):
            pass
    assert "SaslAuthenticationFailed" in caplog.text and "invalid credentials" in caplog.text


async def test_a_tenant_writes_ingress_but_not_requests_or_control_tables(
        secure, tenants, unique) -> None:
    router, control = secure.security(kafka_acls.ROUTER), secure.security(kafka_acls.CONTROL)
    deployment_topic = requests_topic(unique("sec"))
    await create_topics(secure, router, INGRESS_TOPIC, deployment_topic)
    await create_topics(secure, control, KEYS_TOPIC, ROUTES_TOPIC)
    async with producer_as(secure, tenants["acme"]) as producer:
        meta = await producer.send_and_wait(INGRESS_TOPIC, b"{}", key=b"acme")
        assert meta.offset >= 0
        for forbidden in (deployment_topic, KEYS_TOPIC, ROUTES_TOPIC, RESULTS_TOPIC):
            with pytest.raises(TopicAuthorizationFailedError):
                await producer.send_and_wait(forbidden, b"{}", key=b"key:x")
    # The operator's principal may write the control table the tenant may not.
    async with producer_as(secure, control) as producer:
        assert (await producer.send_and_wait(ROUTES_TOPIC, b"{}", key=b"x")).offset >= 0


def rdkafka_read(broker: SecureBroker, security: KafkaSecurity, topic: str,
                 timeout_s: float = 30.0) -> list[bytes] | int:
    """`topic` from the beginning, read by librdkafka (an independent client) as `security`
in a consumer group of its prefix: the first values, or the error code the broker answered."""
    from confluent_kafka import Consumer

    consumer = Consumer({
        "bootstrap.servers": broker.bootstrap, "security.protocol": security.protocol,
        "sasl.mechanism": security.mechanism, "sasl.username": security.username,
        "sasl.password": security.password, "group.id": f"{security.username}.{uuid.uuid4()}",
        "enable.auto.commit": False, "auto.offset.reset": "earliest",
        "isolation.level": "read_committed"})
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                return msg.error().code()
            return [msg.value()]
        return []
    finally:
        consumer.close()


async def test_a_tenant_reads_its_own_replies_only(secure, tenants, unique) -> None:
    from confluent_kafka import KafkaError as RdError

    acme, globex = tenants["acme"], tenants["globex"]
    mine, theirs = f"acme.{unique('r')}", f"globex.{unique('r')}"
    await create_topics(secure, acme, mine)  # a tenant creates its own reply topics
    await create_topics(secure, globex, theirs)
    await create_topics(secure, acme, f"globex.{unique('r')}", refused=True)
    await create_topics(secure, secure.security(kafka_acls.WORKER), RESULTS_TOPIC)
    async with producer_as(secure, secure.security(kafka_acls.WORKER)) as worker:
        await worker.send_and_wait(mine, b"for acme", key=b"1")
        await worker.send_and_wait(theirs, b"for globex", key=b"1")
        await worker.send_and_wait(RESULTS_TOPIC, b"for anyone", key=b"1")
    assert [r.value for r in await read_one(secure, acme, mine)] == [b"for acme"]
    assert [r.value for r in await read_one(secure, acme, mine,
                                            group_id=f"acme.{unique('g')}")] == [b"for acme"]
    assert await asyncio.to_thread(rdkafka_read, secure, acme, mine) == [b"for acme"]
    assert await asyncio.to_thread(rdkafka_read, secure, globex, theirs) == [b"for globex"]
    for topic in (theirs, RESULTS_TOPIC, KEYS_TOPIC):  # the shared results are no tenant's
        assert (await asyncio.to_thread(rdkafka_read, secure, acme, topic)
                == RdError.TOPIC_AUTHORIZATION_FAILED), topic
    with pytest.raises(GroupAuthorizationFailedError):  # a group outside its prefix
        await read_one(secure, acme, mine, group_id=f"globex.{unique('g')}")


def test_tenant_cli_prints_working_exports_and_remove_revokes(secure, capsys,
                                                              monkeypatch) -> None:
    assert main(["kafka", "tenant", "add", "initech", "--rpm", "7",
                 "--data", str(secure.data_dir)]) == 0
    exports = capsys.readouterr().out.strip()
    env = dict(part.split("=", 1) for part in shlex.split(exports.removeprefix("export ")))
    assert env["FERRY_KAFKA_USERNAME"] == "initech" and env["KAFKA_BOOTSTRAP"] == secure.bootstrap
    security = security_from_env(env)
    # One command, one prefix: the API key it made sends replies where the principal reads.
    for key, value in secure.env("admin").items():
        monkeypatch.setenv(key, value)

    async def tenant_of_key() -> Tenant | None:
        async with KeyRing.snapshot(secure.bootstrap) as ring:
            return ring.authenticate(env["FERRY_API_KEY"])

    tenant = asyncio.run(tenant_of_key())
    assert tenant is not None and tenant.name == "initech"
    assert tenant.reply_prefix == "initech." and tenant.rpm == 7

    async def post() -> None:
        await create_topics(secure, secure.security(kafka_acls.ROUTER), INGRESS_TOPIC)
        async with producer_as(secure, security) as producer:
            await producer.send_and_wait(INGRESS_TOPIC, b"{}", key=b"initech")

    asyncio.run(post())
    # A prefix overlapping a tenant's is refused, as one line.
    assert main(["kafka", "tenant", "add", "acme2", "--reply-prefix", "initech.x",
                 "--data", str(secure.data_dir)]) == 2
    assert "overlaps tenant 'initech'" in capsys.readouterr().err
    assert main(["kafka", "acl", "list", "--data", str(secure.data_dir)]) == 0
    assert "User:initech" in capsys.readouterr().out
    assert main(["kafka", "tenant", "remove", "initech", "--data", str(secure.data_dir)]) == 0
    with pytest.raises(KafkaConnectionError):
        asyncio.run(post())


def alone(engine: Engine, prompt: str, max_new_tokens: int) -> list[int]:
    """The tokens the (same) tiny model gives for this prompt, greedy, in-process."""
    [out] = engine.generate([GenerationInput(engine.encode(prompt),
                                             SamplingParams(max_new_tokens=max_new_tokens))])
    return out.output_ids


@dataclass
class FerryProcess:
    """A `ferry` subprocess connecting as one principal, with its log."""

    name: str  # the worker's deployment, the router's app id
    process: subprocess.Popen
    log: Path

    def check(self) -> None:
        assert self.process.poll() is None, f"exited:\n{self.log.read_text()[-3000:]}"


@contextlib.contextmanager
def ferry_as(secure: SecureBroker, principal: str, name: str, args: list[str],
             log: Path) -> Iterator[FerryProcess]:
    """`ferry ARGS` with `principal`'s exports and no other FERRY_KAFKA_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_KAFKA_")}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "ferry.cli", *args, "--metrics-port", "off"],
            env={**env, **secure.env(principal), "PYTHONUNBUFFERED": "1"},
            stdout=out, stderr=subprocess.STDOUT)
    try:
        yield FerryProcess(name, process, log)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def secure_worker(secure: SecureBroker, tiny_model: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[FerryProcess]:
    """`ferry worker` with the ferry-worker principal's exports and nothing else: it creates
    its topics, joins its group and answers in transactions as that principal."""
    deployment = f"secure-{uuid.uuid4().hex[:8]}"
    log = tmp_path_factory.mktemp("secure-worker") / "worker.log"
    with ferry_as(secure, kafka_acls.WORKER, deployment,
                  ["worker", "--model", str(tiny_model), "--deployment", deployment,
                   "--partitions", "1"], log) as worker:
        yield worker


async def test_a_worker_answers_a_tenant_as_its_own_principal(
        secure, tenants, secure_worker: FerryProcess, engine: Engine, unique) -> None:
    """The request is posted as the router would (its principal), to the deployment's
    topic. The tenant reads the answer on its own reply topic."""
    deployment = secure_worker.name
    reply_to = f"acme.{unique('replies')}"
    await create_topics(secure, tenants["acme"], reply_to)
    await create_topics(secure, secure.security(kafka_acls.WORKER), requests_topic(deployment))
    async with producer_as(secure, secure.security(kafka_acls.ROUTER)) as router:
        await router.send_and_wait(requests_topic(deployment), encode(Request(
            id="sec-1", model=deployment, prompt="Hello secure Ferry", max_new_tokens=5,
            reply_to=reply_to)), key=b"k")
    records: list = []
    deadline = time.monotonic() + 120
    while not records and time.monotonic() < deadline:
        secure_worker.check()
        records = await read_one(secure, tenants["acme"], reply_to, timeout_s=2,
                                 isolation_level="read_committed")
    assert records, f"no answer within 120s:\n{secure_worker.log.read_text()[-3000:]}"
    result = decode_result(records[0].value)
    assert result.id == "sec-1" and result.error is None
    assert result.output_ids == alone(engine, "Hello secure Ferry", 5)


async def test_the_gateway_serves_as_its_own_principal(
        secure, secure_worker: FerryProcess, engine: Engine, monkeypatch, http) -> None:
    """A gateway (direct mode) whose every Kafka client connects as ferry-gateway, through
    the secure worker: the answer comes back over HTTP."""
    from streams.front.gateway import GatewaySettings, create_app

    for key, value in secure.security(kafka_acls.GATEWAY).env().items():
        monkeypatch.setenv(key, value)
    runner = web.AppRunner(create_app(secure.bootstrap, GatewaySettings(auth=False),
                                      registry=CollectorRegistry()))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        status, body = 0, {}
        deadline = time.monotonic() + 120
        while status != 200 and time.monotonic() < deadline:  # until the worker has joined
            secure_worker.check()
            status, body = await post(http, f"http://127.0.0.1:{port}/v1/completions",
                                      {"model": secure_worker.name, "prompt": "Hi",
                                       "max_tokens": 4})
            if status != 200:
                await asyncio.sleep(0.5)  # polling the condition, with the deadline above
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == len(alone(engine, "Hi", 4)) > 0
    finally:
        await runner.cleanup()


async def answers_on(secure: SecureBroker, security: KafkaSecurity, topic: str, count: int,
                     processes: list[FerryProcess], timeout_s: float = 120.0) -> list:
    """`count` committed records on `topic` (partition 0), while `processes` keep running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for process in processes:
            process.check()
        records = await read_one(secure, security, topic, timeout_s=2,
                                 isolation_level="read_committed")
        if len(records) >= count:
            return records
    logs = "\n".join(f"{p.name}:\n{p.log.read_text()[-3000:]}" for p in processes)
    raise AssertionError(f"no answer on {topic} within {timeout_s}s:\n{logs}")


async def test_a_tenant_is_served_through_the_router_every_part_its_own_principal(
        secure, secure_worker: FerryProcess, engine: Engine, tmp_path: Path, unique) -> None:
    """The front door on the secure broker: a tenant (its own SCRAM principal and an API key
    the operator made as ferry-control) posts to ferry.ingress; `ferry router` as
    ferry-router (an app id other than the default) authenticates, charges and forwards it in
    its transactions; the worker as ferry-worker answers on the tenant's reply topic."""
    tenant, prefix = secure.add_tenant("hooli")
    made = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "ferry.cli", "keys", "add", "hooli",
                         "--reply-prefix", prefix, "--rpm", "100"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("FERRY_KAFKA_")},
             **secure.env(kafka_acls.CONTROL)}, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    api_key = made.stdout.strip()
    reply_to = f"{prefix}{unique('replies')}"
    await create_topics(secure, tenant, reply_to)
    # The worker's topic exists before the router looks the deployment up.
    await create_topics(secure, secure.security(kafka_acls.WORKER),
                        requests_topic(secure_worker.name))
    app_id = unique("ferry-router-sec")
    with ferry_as(secure, kafka_acls.ROUTER, app_id,
                  ["router", "--app-id", app_id, "--log-level", "INFO"],
                  tmp_path / "router.log") as router:
        # It creates ferry.ingress (a tenant may not) and joins its group first.
        deadline = time.monotonic() + 120
        while "router ready" not in router.log.read_text() and time.monotonic() < deadline:
            router.check()
            await asyncio.sleep(0.2)  # polling the log, with the deadline above
        assert "router ready" in router.log.read_text(), router.log.read_text()[-3000:]
        async with producer_as(secure, tenant) as producer:
            # Keyed by its tenant, and not keyed: the router re-posts that one to ingress
            # keyed by the tenant (its quota's partition) before forwarding it.
            for rid, key in (("front-1", b"hooli"), ("front-2", None)):
                await producer.send_and_wait(INGRESS_TOPIC, encode(Request(
                    id=rid, model=secure_worker.name, prompt="Through the front door",
                    max_new_tokens=5, reply_to=reply_to)), key=key,
                    headers=[(API_KEY_HEADER, api_key.encode())])
        records = await answers_on(secure, tenant, reply_to, 2, [router, secure_worker])
    results = {r.id: r for r in map(decode_result, (rec.value for rec in records))}
    assert set(results) == {"front-1", "front-2"}, results
    expected = alone(engine, "Through the front door", 5)
    for result in results.values():
        assert result.error is None and result.output_ids == expected, result


# ---- launched workers connect as the worker (no broker) -------------------------------------


DEPLOYER_ENV = {"FERRY_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "FERRY_KAFKA_USERNAME": "ferry-deployer", "FERRY_KAFKA_PASSWORD": "deployer-pw"}


def test_local_workers_get_the_workers_credentials_not_the_deployers(
        monkeypatch, tmp_path: Path) -> None:
    for key, value in {**DEPLOYER_ENV, "FERRY_WORKER_KAFKA_USERNAME": "ferry-worker",
                       "FERRY_WORKER_KAFKA_PASSWORD": "worker-pw"}.items():
        monkeypatch.setenv(key, value)
    env = LocalLauncher("127.0.0.1:1", tmp_path).env
    assert security_from_env(env) == KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-512",
                                                   "ferry-worker", "worker-pw")
    assert "deployer-pw" not in env.values() and not any(
        k.startswith("FERRY_WORKER_KAFKA_") for k in env)
    assert env["PATH"] == os.environ["PATH"]  # the rest of the deployer's environment
    # Without the worker's own credentials the deployer refuses to launch, naming them.
    monkeypatch.delenv("FERRY_WORKER_KAFKA_PASSWORD")
    with pytest.raises(KafkaSecurityError, match="FERRY_WORKER_KAFKA_PASSWORD"):
        LocalLauncher("127.0.0.1:1", tmp_path)
    # On a plaintext cluster nothing is asked for.
    assert worker_kafka_env({}) == {}


async def test_rendered_replicas_take_credentials_from_compose_env_or_a_secret(
        monkeypatch, tmp_path: Path) -> None:
    import yaml

    for key, value in DEPLOYER_ENV.items():  # the manifest launcher needs no worker password
        monkeypatch.setenv(key, value)
    launcher = ManifestLauncher("kafka:9092", tmp_path)
    record = DeploymentRecord("llm", "step-1", "/models/llm/step-1")
    await launcher.start(record)
    service = yaml.safe_load((tmp_path / f"{record.deployment}.compose.yml").read_text())
    [compose] = service["services"].values()
    assert compose["environment"] == {
        "KAFKA_BOOTSTRAP": "kafka:9092", "FERRY_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "FERRY_KAFKA_USERNAME": "${FERRY_WORKER_KAFKA_USERNAME:?set FERRY_WORKER_KAFKA_USERNAME}",
        "FERRY_KAFKA_PASSWORD": "${FERRY_WORKER_KAFKA_PASSWORD:?set FERRY_WORKER_KAFKA_PASSWORD}"}
    deployment = yaml.safe_load((tmp_path / f"{record.deployment}.k8s.yaml").read_text())
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["valueFrom"] for e in container["env"]}
    for var in ("FERRY_KAFKA_USERNAME", "FERRY_KAFKA_PASSWORD"):  # the worker's own principal
        assert env[var] == {"secretKeyRef": {"name": "ferry-worker-kafka", "key": var,
                                             "optional": False}}
    for var in ("KAFKA_BOOTSTRAP", "FERRY_KAFKA_SECURITY_PROTOCOL", "FERRY_KAFKA_SASL_MECHANISM"):
        assert env[var] == {"configMapKeyRef": {"name": "ferry-config", "key": var}}
    assert "deployer-pw" not in str(service) + str(deployment)
