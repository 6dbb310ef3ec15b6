"""The deployer: every finished training checkpoint becomes a deployment with its own endpoint.

It follows a training run's output directory (a new `checkpoint-*` directory counts once it
is complete, see `models.judge`) and the `ferry.checkpoints` topic (trainers that
announce checkpoints, `ferry deploy`, `ferry undeploy`). For each new checkpoint, one at a
time: verify -> push to the model store (parallel, verified) -> registry `pending` ->
create the request topic -> start replicas through the launcher (`loading`) -> a probe
request answered through Kafka (weights loaded, partitions owned) -> `ready`. Only then do
the gateway and the router send it traffic. The four durations are kept on the record.
A launcher that only renders manifests (`runs_replicas` false) cannot say when someone
applies them: its deployments are `rendered` instead of `loading`, and become `ready` when
the probe is answered, however long that takes (never failed for the wait).

Policy: keep the last `keep` checkpoints; older ones go `draining` (no new traffic; what is
queued is still answered) and are `retired` once their worker group's lag is zero (their
topics stay, for replay). A deployment still in a route with weight is never drained by the
policy. Optionally each new checkpoint becomes the alias's shadow candidate, or a canary at
a given weight.

Why one long module: a deployment's stages (judge, upload, launch, probe, retire) act on
one registry record in order; the module is that state machine.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from edge.kafka_clients import client_options
from edge.topic_admin import ensure_topics
from models import store as model_store
from models.judge import check
from schemas import Request, Result, SchemaError, decode, encode, requests_topic
from schemas.events import CheckpointEvent
from schemas.fields import from_dict
from schemas.topics import CHECKPOINTS_TOPIC, CONTROL_PARTITIONS, DEFAULT_PARTITIONS
from streams.front.client import FerryClient
from streams.rollout.canary import split_weights
from streams.rollout.launchers import Launcher
from streams.routing.backlog import BacklogProbe
from streams.routing.registry import LIVE, DeploymentRecord, Registry, publish
from streams.routing.routes import RouteTable, set_route
from streams.routing.shadows import set_shadow

log = logging.getLogger("ferry.deployer")


@dataclass(frozen=True)
class Policy:
    keep: int = field(default=3, metadata={"help": "checkpoints kept deployed"})
    settle_s: float = field(default=10.0, metadata={
        "flag": "--settle",
        "help": "seconds without change that finish a checkpoint lacking COMPLETE"})
    replicas: int = field(default=1, metadata={"help": "workers of each deployment"})
    shadow_of: str | None = field(default=None, metadata={
        "metavar": "ALIAS", "help": "make each new checkpoint the shadow candidate of ALIAS"})
    shadow_percent: float = field(default=100.0, metadata={
        "help": "share of ALIAS's requests mirrored to the candidate (--shadow-of)"})
    canary_of: str | None = field(default=None, metadata={
        "metavar": "ALIAS", "help": "give each new checkpoint --canary-weight % of ALIAS's "
                                    "traffic"})
    canary_weight: int = field(default=10, metadata={
        "help": "the new checkpoint's share of ALIAS (--canary-of), in %"})
    load_timeout_s: float = field(default=300.0, metadata={
        "flag": "--load-timeout",
        "help": "seconds a replica has to load and answer (launchers that run replicas, not "
                "manifests)"})


@dataclass(frozen=True)
class DeployerConfig:
    """`ferry deployer`'s settings; its flags are generated from these fields
    (ferry/flags.py)."""

    model: str = field(metadata={"help": "model name: deployments are NAME@VERSION"})
    store: Path = field(metadata={"help": "model store directory"})
    watch: Path | None = field(default=None, metadata={
        "help": "training output directory to follow (checkpoint-* subdirectories)"})
    launcher: Literal["local", "manifests"] = field(default="local", metadata={
        "help": "local: run `ferry worker` processes; manifests: write compose/Kubernetes "
                "files"})
    manifests: Path = field(default=Path("deployments"), metadata={
        "help": "where the manifests launcher writes compose/Kubernetes files"})
    logs: Path | None = field(default=None, metadata={
        "help": "worker logs (local launcher; default STORE/.logs)"})
    policy: Policy = field(default_factory=Policy)


def version_order(version: str) -> tuple[int, str]:
    """checkpoint-900 < checkpoint-1200: by the last number in the name, then by name."""
    numbers = re.findall(r"\d+", version)
    return (int(numbers[-1]) if numbers else -1, version)


class Deployer:
    def __init__(self, bootstrap: str, model: str, store: Path, launcher: Launcher,
                 policy: Policy = Policy(), watch: Path | None = None,
                 poll_s: float = 1.0) -> None:
        self.bootstrap, self.model, self.store = bootstrap, model, store
        self.launcher, self.policy, self.watch, self.poll_s = launcher, policy, watch, poll_s
        self.registry = Registry(bootstrap)
        self._waiting: dict[str, str] = {}  # checkpoint dir -> why it is not taken yet
        self._queued: set[str] = set()  # versions found finished, deployment under way
        self._held: set[str] = set()  # kept beyond `keep` because a route uses them
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._events: AIOKafkaConsumer | None = None  # checkpoint events, committed when acted on
        self._mine: dict[str, DeploymentRecord] = {}  # this model's records, latest state
        self._applied: dict[str, asyncio.Task] = {}  # rendered deployments' probes, by id
        self.deployed = asyncio.Event()  # set after each deployment became ready (for tests)

    def record(self, version: str) -> DeploymentRecord | None:
        """This model's deployment of `version`, as last published."""
        return self._mine.get(f"{self.model}@{version}")

    # ---- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        self.client = FerryClient(self.bootstrap,
                                  reply_to=f"ferry.replies.deployer-{uuid.uuid4().hex[:8]}")
        self.routes = RouteTable(self.bootstrap)
        self.backlog = BacklogProbe(self.bootstrap)
        await ensure_topics(self.bootstrap, {CHECKPOINTS_TOPIC: CONTROL_PARTITIONS})
        parts = [self.registry, self.client, self.routes, self.backlog]
        await asyncio.gather(*(p.start() for p in parts))
        try:
            await self._adopt()
            loops = [self._act(), self._follow_events(), self._drain_loop()]
            if self.watch is not None:
                loops.append(self._watch_loop())
            await asyncio.gather(*loops)
        finally:
            for task in self._applied.values():
                task.cancel()
            await self.launcher.close()
            await asyncio.gather(*(p.close() for p in parts), return_exceptions=True)

    async def _adopt(self) -> None:
        """After a restart, bring this model's live deployments back up."""
        for record in self.registry.records():
            if record.name != self.model or record.status == "pending":
                continue  # a pending one was cut off mid-upload: it is deployed afresh (the
                # push resumes) when the directory or its event is seen again
            adopted = record.status in ("loading", "ready", "rendered")
            if adopted:  # ready again once it answers again
                log.info("adopting %s (%s)", record.id, record.status)
                await self._set(record.moved(
                    "loading" if self.launcher.runs_replicas else "rendered"))
            else:
                self._mine[record.id] = record
            if record.status in LIVE:
                await self.launcher.start(self._mine[record.id])
            if adopted and self.launcher.runs_replicas:
                self._queue.put_nowait(("probe", self._mine[record.id]))
            elif adopted:
                self._await_applied(self._mine[record.id], {})

    # ---- inputs: the watched directory and the checkpoints topic -------------------------

    async def _watch_loop(self) -> None:
        assert self.watch is not None
        while True:
            self.scan()
            await asyncio.sleep(self.poll_s)  # a directory has no change feed we can rely on

    def scan(self) -> None:
        """Queue every finished checkpoint directory not deployed yet; note why others wait."""
        assert self.watch is not None
        now = time.time()
        for directory in sorted(self.watch.iterdir() if self.watch.is_dir() else []):
            if not directory.is_dir() or directory.name.startswith("."):
                continue
            if self._known(directory.name) or directory.name in self._queued:
                continue
            verdict = check(directory, self.policy.settle_s, now)
            if verdict.complete:
                self._waiting.pop(str(directory), None)
                self._queued.add(directory.name)
                self._queue.put_nowait(("dir", directory))
            elif self._waiting.get(str(directory)) != verdict.reason:
                self._waiting[str(directory)] = verdict.reason
                log.info("waiting for %s: %s", directory.name, verdict.reason)

    def _known(self, version: str) -> bool:
        return f"{self.model}@{version}" in self._mine

    async def _follow_events(self) -> None:
        consumer = AIOKafkaConsumer(CHECKPOINTS_TOPIC, bootstrap_servers=self.bootstrap, **client_options(),
                                    group_id=f"ferry.deployer.{self.model}",
                                    # A new deployer also takes what was announced before
                                    # it started; a restarted one goes on from its commit,
                                    # made only once an event was acted on (see _act).
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        self._events = consumer
        try:
            async for message in consumer:
                event: CheckpointEvent | None = None
                try:
                    event = from_dict(CheckpointEvent, decode(message.value))
                except SchemaError as exc:
                    log.warning("unreadable checkpoint event at offset %d: %s",
                                message.offset, exc)
                if event is not None and event.model != self.model:
                    event = None  # not ours: only its offset goes through the queue, in order
                tp = TopicPartition(message.topic, message.partition)
                self._queue.put_nowait(("event", (event, tp, message.offset)))
        finally:
            self._events = None
            await consumer.stop()

    # ---- actions, one at a time ----------------------------------------------------------

    async def _act(self) -> None:
        while True:
            kind, item = await self._queue.get()
            try:
                if kind == "dir":
                    await self.deploy_checkpoint(item)
                elif kind == "probe":
                    await self._bring_up(item, {})
                elif kind == "applied":
                    await self._answered_rendered(*item)
                else:
                    event, tp, offset = item
                    try:
                        if event is not None:
                            await self._handle_event(event)
                    finally:  # acted on (or failed for good): a restart does not redo it
                        if self._events is not None:
                            await self._events.commit({tp: offset + 1})
            except Exception as exc:  # one bad checkpoint must not stop the deployer
                log.exception("deployer action %s %s failed: %s", kind, item, exc)

    async def _handle_event(self, event: CheckpointEvent) -> None:
        if event.action == "deploy" and event.path is not None:
            await self.deploy_checkpoint(Path(event.path), event.version)
        elif event.action == "deploy" and event.store_path is not None:
            await self.deploy_stored(Path(event.store_path))
        elif event.action == "undeploy" and event.id is not None:
            record = self._mine.get(event.id)
            if record is not None and record.status == "rendered":  # never served: no drain
                if (task := self._applied.pop(record.id, None)) is not None:
                    task.cancel()
                await self.launcher.stop(record)
                await self._set(record.moved("retired"))
                return
            if record is None or record.status not in ("ready", "loading", "pending"):
                log.warning("undeploy %s: not a live deployment of %s", event.id, self.model)
                return
            await self._set(record.moved("draining"))

    async def deploy_checkpoint(self, src: Path, version: str | None = None) -> None:
        version = version or src.name
        if self._known(version):
            return
        start = time.monotonic()
        verdict = check(src, 0.0, time.time())
        if not verdict.complete:
            raise ValueError(f"{src}: not a complete checkpoint: {verdict.reason}")
        verify_s = time.monotonic() - start
        target = self.store / self.model / version
        record = DeploymentRecord(self.model, version, str(target), replicas=self.policy.replicas)
        await self._set(record.moved("pending"))
        start = time.monotonic()
        await asyncio.to_thread(model_store.push, src, target)
        await self._launch(record, {"verify_s": verify_s, "upload_s": time.monotonic() - start})

    async def deploy_stored(self, version_dir: Path) -> None:
        """A version already in the store (`ferry deploy STORE/NAME/VERSION`)."""
        start = time.monotonic()
        manifest = await asyncio.to_thread(model_store.verify, version_dir, full=False)
        if manifest.name != self.model or self._known(manifest.version):
            return
        record = DeploymentRecord(self.model, manifest.version, str(version_dir),
                                  replicas=self.policy.replicas)
        await self._set(record.moved("pending"))
        await self._launch(record, {"verify_s": time.monotonic() - start, "upload_s": 0.0})

    async def _launch(self, record: DeploymentRecord, durations: dict[str, float]) -> None:
        await ensure_topics(self.bootstrap, {requests_topic(record.deployment): DEFAULT_PARTITIONS})
        if not self.launcher.runs_replicas:
            record = self._mine[record.id].moved("rendered")
            await self._set(record)
            await self.launcher.start(record)
            log.info("%s rendered; ready once its manifests are applied and it answers",
                     record.id)
            self._await_applied(record, durations)
            return
        record = self._mine[record.id].moved("loading")
        await self._set(record)
        await self.launcher.start(record)
        await self._bring_up(record, durations)

    def _probe(self, record: DeploymentRecord) -> Request:
        return Request(id=f"probe-{record.deployment}-{uuid.uuid4().hex[:8]}",
                       model=record.deployment, prompt="ready?", max_new_tokens=1)

    def _await_applied(self, record: DeploymentRecord, durations: dict[str, float]) -> None:
        """Probe a rendered deployment without a deadline, in the background (actions go on
        meanwhile); its answer is acted on in turn, through the queue."""
        async def wait() -> None:
            start = time.monotonic()
            try:
                result = await (await self.client.submit(self._probe(record)))
            except Exception:  # the deployer's client failed: said once, here
                log.exception("%s: probe of the rendered deployment failed", record.id)
                return
            self._queue.put_nowait(("applied", (record.id, result, {
                **durations, "load_s": time.monotonic() - start})))

        self._applied[record.id] = asyncio.create_task(wait(), name=f"probe {record.id}")

    async def _answered_rendered(self, record_id: str, result: Result,
                                 durations: dict[str, float]) -> None:
        self._applied.pop(record_id, None)
        record = self._mine.get(record_id)
        if record is not None and record.status == "rendered":  # not undeployed meanwhile
            await self._answered(record, result, durations)

    async def _bring_up(self, record: DeploymentRecord, durations: dict[str, float]) -> None:
        """Wait for a probe answered through Kafka, then mark the deployment ready."""
        start = time.monotonic()
        try:
            result = await self.client.request(self._probe(record),
                                               timeout=self.policy.load_timeout_s)
        except asyncio.TimeoutError:
            result = None
        await self._answered(record, result, {**durations, "load_s": time.monotonic() - start})

    async def _answered(self, record: DeploymentRecord, result: Result | None,
                        durations: dict[str, float]) -> None:
        """Ready when the probe was answered; failed (replicas stopped) when it was not, or
        with an error."""
        if result is None or result.error is not None:
            reason = result.error.message if result and result.error else "no answer"
            await self.launcher.stop(record)
            await self._set(self._mine[record.id].moved("failed", error=f"probe: {reason}"))
            log.error("%s failed to come up: %s", record.id, reason)
            return
        await self._set(self._mine[record.id].moved("ready", durations=durations))
        log.info("%s ready at /v1/models/%s/versions/%s/completions: %s", record.id,
                 record.name, record.version,
                 ", ".join(f"{k[:-2]} {v:.2f}s" for k, v in durations.items()))
        await self._attach(self._mine[record.id])
        await self._apply_keep()
        self.deployed.set()

    async def _attach(self, record: DeploymentRecord) -> None:
        if self.policy.shadow_of:
            await set_shadow(self.bootstrap, self.policy.shadow_of, [record.deployment],
                             self.policy.shadow_percent)
            log.info("%s is now the shadow candidate of %s", record.id, self.policy.shadow_of)
        if self.policy.canary_of:
            route = self.routes.get(self.policy.canary_of)
            weights = (split_weights(route.weights, record.deployment, self.policy.canary_weight)
                       if route else {record.deployment: 100})
            await set_route(self.bootstrap, self.policy.canary_of, weights)
            log.info("%s is a canary of %s: %s", record.id, self.policy.canary_of, weights)

    async def _apply_keep(self) -> None:
        ready = sorted((r for r in self._mine.values() if r.status == "ready"),
                       key=lambda r: version_order(r.version))
        for record in ready[:-self.policy.keep] if self.policy.keep > 0 else []:
            if self._in_routes(record.deployment):
                if record.id not in self._held:  # said once, not every tick
                    self._held.add(record.id)
                    log.info("keeping %s beyond keep=%d: a route still sends it traffic",
                             record.id, self.policy.keep)
                continue
            await self._set(record.moved("draining"))

    def _in_routes(self, deployment: str) -> bool:
        routes = self.routes.aliases().values()
        return any(route.weights.get(deployment, 0) > 0 for route in routes)

    async def _drain_loop(self) -> None:
        """Drain what the keep policy no longer keeps (a checkpoint that just left its last
        route, after a route change or a finished canary), and retire draining deployments
        once everything queued for them is answered."""
        while True:
            await self._apply_keep()
            for record in [r for r in self._mine.values() if r.status == "draining"]:
                if (await self.backlog.sample(record.deployment)).lag == 0:
                    await self.launcher.stop(record)
                    await self._set(self._mine[record.id].moved("retired"))
                    log.info("%s retired (lag 0); its topic stays for replay", record.id)
            await asyncio.sleep(self.poll_s)  # lag is sampled, not pushed

    async def _set(self, record: DeploymentRecord) -> None:
        record = replace(record, restarts=self.launcher.restarts(record.deployment))
        await publish(self.bootstrap, record)
        self._mine[record.id] = record  # what others can read now


async def request_deploy(bootstrap: str, version_dir: Path) -> str:
    """`ferry deploy STORE/NAME/VERSION`: ask the model's deployer to deploy a stored version."""
    manifest = model_store.verify(version_dir, full=False)
    await _announce(bootstrap, CheckpointEvent("deploy", manifest.name,
                                               store_path=str(version_dir.resolve())))
    return f"{manifest.name}@{manifest.version}"


async def request_undeploy(bootstrap: str, deployment_id: str) -> None:
    name, sep, version = deployment_id.partition("@")
    if not sep or not name or not version:
        raise ValueError(f"deployment: {deployment_id!r} is not NAME@VERSION")
    await _announce(bootstrap, CheckpointEvent("undeploy", name, id=deployment_id))


async def announce_checkpoint(bootstrap: str, model: str, path: Path) -> None:
    """Ask the deployer to deploy a finished checkpoint directory (a trainer outside Ferry
    may call it; Ferry's own trainer is found by the deployer watching its directory)."""
    await _announce(bootstrap, CheckpointEvent("deploy", model, path=str(path.resolve()),
                                               version=path.name))


async def _announce(bootstrap: str, event: CheckpointEvent) -> None:
    await ensure_topics(bootstrap, {CHECKPOINTS_TOPIC: CONTROL_PARTITIONS})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **client_options(), acks="all")
    try:
        await producer.start()
        await producer.send_and_wait(CHECKPOINTS_TOPIC, encode(event), key=event.model.encode())
    finally:
        await producer.stop()

