"""The router stream: `ferry.ingress` -> auth -> quota -> route -> `ferry.requests.<deployment>`.

The router reads requests that producers (and the gateway) post with their API key in the
`ferry-api-key` header. Per request it authenticates the key against the live key table,
resolves the model alias to a deployment (or takes the one pinned by the
`ferry-deployment` header), charges the tenant's token buckets, and forwards the request
with its batch key. A request it refuses gets an error result on its `reply_to` and a
dead-letter record with the reason; nothing is dropped silently.

Exactly once: everything the router writes because of one ingress record (the forwarded
request, mirror copies, the quota bucket's new state, a dead letter, an error reply, a
re-keyed re-post) goes into its ingress partition's transaction together with the
partition's commit point (`streams/routing/transactions.py`), so a router killed at any
moment forwards nothing twice to `read_committed` readers (every Ferry reader is one) and
charges no quota twice. (Not faust: its exactly-once mode derives transactional ids from
output partitions, which fences nothing here.)

Quotas are exact because one router owns each tenant: ingress is keyed by tenant, so one
partition (one router) sees all of a tenant's requests. A message keyed otherwise (a
producer that does not know its tenant) is re-posted keyed by its tenant first. Bucket
state is written to a compacted topic (`<app id>.quotas`) in the same transaction and read
back on start and on every new partition, so it survives a restart and a hand-over.
Retries (`ferry-attempt` > 1) are not charged again.

Why one long module: the refusal, the charge, the forward and the mirror of one request
happen in one transaction; they read best as one sequence.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import signal
import time
from collections.abc import Iterable, Iterator
from functools import partial

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.metrics_server import BoundedLabel, serve_metrics
from edge.tables import CompactedView
from edge.topic_admin import ensure_topics
from schemas import (
    DLQ_TOPIC, DeadLetter, ErrorCode, Request, Result, SchemaError, batch_key, decode_request,
    encode, requests_topic, salvage_reply_address,
)
from schemas.chat import messages_text
from schemas.fields import from_dict
from schemas.tables import QuotaState
from schemas.topics import (
    API_KEY_HEADER, ATTEMPT_HEADER, DEPLOYMENT_HEADER, INGRESS_PARTITIONS, INGRESS_TOPIC,
    MIRRORED_HEADER, PRIMARY_HEADER, mirror_topic, reply_topic_problem, stream_topic_problem,
)
from streams.routing.catalog import DeploymentCatalog
from streams.routing.choose import choose_backend
from streams.routing.keys import KeyRing, Tenant
from streams.routing.quota import admit, estimate_tokens
from streams.routing.registry import Registry
from streams.routing.routes import RouteTable
from streams.routing.shadows import Shadow, ShadowTable
from streams.routing.transactions import TRANSACTION_TIMEOUT_MS, Sink, TransactionalIngress

log = logging.getLogger("ferry.router")

_REPLY_TIMEOUT_S = 10.0
# An undeliverable record may be one too large to write anywhere: its dead letter keeps a
# prefix of it (its topic, partition and offset name the whole).
_UNDELIVERABLE_VALUE_CHARS = 64 * 1024


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.routed = Counter("ferry_router_routed", "Requests forwarded, by alias and deployment",
                              ["alias", "deployment"], registry=registry)
        self.rejected = Counter("ferry_router_rejected", "Requests refused, by reason",
                                ["reason"], registry=registry)
        self.mirrored = Counter("ferry_router_mirrored", "Requests copied to a shadow candidate",
                                ["alias", "candidate"], registry=registry)
        self.rekeyed = Counter("ferry_router_rekeyed", "Requests re-posted keyed by tenant",
                               registry=registry)
        self.handle = Histogram("ferry_router_handle_seconds", "Time to route one request",
                                buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .5),
                                registry=registry)
        # Per tenant (an authenticated key's tenant, at most 1000 distinct, then "other").
        self.tenant, self.model = BoundedLabel(), BoundedLabel()
        self.tenant_requests = Counter("ferry_router_tenant_requests",
                                       "Requests forwarded, by tenant and requested model",
                                       ["tenant", "model"], registry=registry)
        self.tenant_tokens = Counter("ferry_router_tenant_charged_tokens",
                                     "Tokens charged to the tenant's quota (prompt estimate + "
                                     "max_new_tokens; retries are not charged)", ["tenant"],
                                     registry=registry)
        self.tenant_rejected = Counter("ferry_router_tenant_rejected",
                                       "Requests of a known tenant refused, by reason",
                                       ["tenant", "reason"], registry=registry)


class RouteGauges(Collector):
    """Route weights and shadow shares as the router sees them now (built at scrape time,
    from the metrics thread: the tables are read through copies)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self) -> Iterator[Metric]:
        weights = GaugeMetricFamily("ferry_route_weight", "Weight of a deployment in an "
                                    "alias's route (share = weight / sum of the alias's)",
                                    labels=["alias", "deployment"])
        shadows = GaugeMetricFamily("ferry_shadow_percent", "Share of an alias's requests "
                                    "mirrored to a shadow candidate, percent",
                                    labels=["alias", "candidate"])
        if self.router._ready.is_set():
            for alias, route in sorted(dict(self.router.routes.aliases()).items()):
                for deployment, weight in sorted(dict(route.weights).items()):
                    weights.add_metric([alias, deployment], weight)
            for alias, shadow in sorted(dict(self.router.shadows.all()).items()):
                for candidate in shadow.candidates:
                    shadows.add_metric([alias, candidate], shadow.percent)
        yield weights
        yield shadows

    def describe(self) -> Iterable[Metric]:
        return []


class _Refusal(Exception):
    def __init__(self, code: ErrorCode, message: str, bad_field: str,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.bad_field = code, message, bad_field
        self.retry_after_s = retry_after_s


class Router:
    """One router instance: a transactional ingress reader; quota buckets in a compacted
    topic."""

    def __init__(self, bootstrap: str, config: RouterConfig | None = None, *,
                 registry: CollectorRegistry | None = None) -> None:
        config = config or RouterConfig()
        self.bootstrap, self.app_id, self.ingress = bootstrap, config.app_id, config.ingress
        self.instance_id = config.instance_id
        self.transaction_timeout_ms = config.transaction_timeout_ms
        self.quota_topic = f"{self.app_id}.quotas"
        registry = registry if registry is not None else CollectorRegistry()
        self.metrics = RouterMetrics(registry)
        registry.register(RouteGauges(self))
        self._ready = asyncio.Event()  # the control tables are read
        self._buckets: dict[str, QuotaState] = {}  # tenants this router charged
        self._mirror_topics: set[str] = set()  # created already
        self._reply_topics: set[str] = set()  # created already
        self._ingress: TransactionalIngress | None = None
        self._failure: BaseException | None = None
        self._stopping = asyncio.Event()

    keys: KeyRing  # built in run(): Kafka clients belong to the serving loop
    routes: RouteTable
    catalog: DeploymentCatalog
    quotas: CompactedView  # tenant -> bucket state
    shadows: ShadowTable
    registry: Registry

    def stop(self) -> None:
        """Finish the transaction under way, leave the group, stop (`run` returns)."""
        self._stopping.set()
        if self._ingress is not None:
            self._ingress.stop()

    async def run(self) -> None:
        """Route until `stop()`; raise when a control table reader died (after stopping)."""
        await ensure_topics(self.bootstrap, {self.ingress: INGRESS_PARTITIONS,
                                             DLQ_TOPIC: INGRESS_PARTITIONS})
        try:
            await self._start_views()
            if self._stopping.is_set():
                return
            self._ingress = TransactionalIngress(
                self.bootstrap, self.app_id, self.ingress, self._on_record,
                undeliverable=self._undeliverable, instance_id=self.instance_id,
                transaction_timeout_ms=self.transaction_timeout_ms,
                writes_to=(self.ingress, self.quota_topic, DLQ_TOPIC),
                on_assigned=self._adopt_buckets, on_revoked=self._forget_buckets)
            serving = asyncio.create_task(self._ingress.run(), name="router ingress")
            ready = asyncio.create_task(self._ingress.ready.wait())
            await asyncio.wait([serving, ready], return_when=asyncio.FIRST_COMPLETED)
            if ready.done():
                log.info("router ready: ingress=%s, %d routes, %d keys", self.ingress,
                         len(self.routes.aliases()), len(self.keys.listing()))
            else:
                ready.cancel()
            await serving
        finally:
            await self._close_views()
        if self._failure is not None:
            raise self._failure

    async def _start_views(self) -> None:
        self.keys = KeyRing(self.bootstrap)
        self.routes = RouteTable(self.bootstrap)
        self.catalog = DeploymentCatalog(self.bootstrap)
        self.quotas = CompactedView(self.bootstrap, self.quota_topic)
        self.shadows = ShadowTable(self.bootstrap)
        self.registry = Registry(self.bootstrap)
        for view in (self.keys.view, self.routes.view, self.quotas, self.shadows.view,
                     self.registry.view):
            view.on_failure.append(self._view_died)
        await asyncio.gather(self.keys.start(), self.routes.start(), self.catalog.start(),
                             self.quotas.start(), self.shadows.start(), self.registry.start())
        self._ready.set()

    def _view_died(self, exc: BaseException) -> None:
        # Routing on a table that stopped following (revoked keys still valid, old routes)
        # is worse than not routing: stop, so the supervisor restarts a router that reads.
        log.error("router stopping: a control table reader died: %r", exc)
        if self._failure is None:
            self._failure = exc
        self.stop()

    def _forget_buckets(self, _revoked: set[TopicPartition]) -> None:
        # Tenants may move to another router: from now on its writes (via the topic) count.
        self._buckets.clear()

    async def _adopt_buckets(self, _assigned: set[TopicPartition]) -> None:
        # The previous owners are fenced now: their last committed bucket states are final,
        # and read before this router charges any of their tenants.
        await self.quotas.sync()

    async def _close_views(self) -> None:
        if self._ready.is_set():
            await asyncio.gather(self.keys.close(), self.routes.close(), self.catalog.close(),
                                 self.quotas.close(), self.shadows.close(),
                                 self.registry.close(),
                                 return_exceptions=True)

    async def _on_record(self, record: ConsumerRecord, sink: Sink) -> None:
        start = time.perf_counter()
        try:
            await self.handle(record, sink)
        except KafkaError:
            raise  # the transaction's: redone, or the router stops
        except Exception:  # a bug: log it, never stop routing the partition
            log.exception("router failed on %s[%d]@%d", record.topic, record.partition,
                          record.offset)
        self.metrics.handle.observe(time.perf_counter() - start)

    async def _undeliverable(self, record: ConsumerRecord, exc: BaseException,
                             sink: Sink) -> None:
        """A record whose output the broker refuses every time (a forwarded request over a
        requests topic's size limit, say): its dead letter is its answer."""
        sink.on_commit(self.metrics.rejected.labels("undeliverable").inc)
        reason = f"router: not deliverable: {exc!r}"
        await self._dead_letter(sink, record, reason, "value", "undeliverable",
                                max_value=_UNDELIVERABLE_VALUE_CHARS)
        if (address := salvage_reply_address(record.value)) is not None:
            rid, model, reply_to = address
            tenant = self.keys.authenticate(_headers(record.headers).get(
                API_KEY_HEADER, b"").decode(errors="replace"))
            code = (ErrorCode.REQUEST_TOO_LARGE if isinstance(exc, MessageSizeTooLargeError)
                    else ErrorCode.INTERNAL)
            await self._reply(sink, reply_to, Result.failure(rid, model, code, reason),
                              None if tenant is None else tenant.reply_prefix)

    async def handle(self, record: ConsumerRecord, sink: Sink) -> None:
        """Route one ingress record: everything it causes is written through `sink` (its
        partition's transaction) and counted once that commits."""
        value, headers = record.value, _headers(record.headers)
        try:
            request = decode_request(value)
        except SchemaError as exc:
            await self._dead_letter(sink, record, str(exc), exc.field, "invalid")
            if (address := salvage_reply_address(value)) is not None:
                rid, model, reply_to = address
                await self._reply(sink, reply_to, Result.failure(
                    rid, model, ErrorCode.INVALID_REQUEST, str(exc)), None)
            return
        tenant: Tenant | None = None
        try:
            tenant = self._authenticate(headers)
            await self._forward(sink, request, tenant, record, headers)
        except _Refusal as refusal:
            sink.on_commit(self.metrics.rejected.labels(refusal.code.value).inc)
            if tenant is not None:
                sink.on_commit(self.metrics.tenant_rejected.labels(
                    self.metrics.tenant(tenant.name), refusal.code.value).inc)
            await self._dead_letter(sink, record, refusal.message, refusal.bad_field,
                                    refusal.code.value)
            # Never on an internal topic; a known tenant only on its own reply topics.
            await self._reply(sink, request.reply_to, Result.failure(
                request.id, request.model, refusal.code, refusal.message, refusal.retry_after_s),
                None if tenant is None else tenant.reply_prefix)

    def _authenticate(self, headers: dict[str, bytes]) -> Tenant:
        tenant = self.keys.authenticate(headers.get(API_KEY_HEADER, b"").decode(errors="replace"))
        if tenant is None:
            raise _Refusal(ErrorCode.UNAUTHENTICATED,
                           f"{API_KEY_HEADER}: missing, unknown or revoked API key",
                           API_KEY_HEADER)
        return tenant

    async def _forward(self, sink: Sink, request: Request, tenant: Tenant,
                       record: ConsumerRecord, headers: dict[str, bytes]) -> None:
        if (problem := reply_topic_problem(request.reply_to, tenant.reply_prefix)) is not None:
            raise _Refusal(ErrorCode.INVALID_REQUEST, problem, "reply_to")
        if request.stream_to is not None and (problem := stream_topic_problem(
                request.stream_to, request.reply_to, tenant.reply_prefix)) is not None:
            raise _Refusal(ErrorCode.INVALID_REQUEST, problem, "stream_to")
        if record.key != tenant.name.encode():
            # Quota state lives with the tenant's partition: move the request there first.
            sink.on_commit(self.metrics.rekeyed.inc)
            await sink.send(self.ingress, tenant.name.encode(), record.value,
                            list(headers.items()))
            return
        posted = request.created_at or record.timestamp / 1000
        pinned = headers.get(DEPLOYMENT_HEADER, b"").decode(errors="replace")
        deployment = pinned or await self._pick(request, posted)
        if not deployment or not await self.catalog.exists(deployment, posted):
            raise _Refusal(ErrorCode.UNKNOWN_MODEL,
                           f"model: {deployment or request.model!r} is not served by any "
                           "deployment", "model")
        if _attempt(headers) <= 1:
            await self._charge(sink, request, tenant)
        forwarded = dataclasses.replace(request, model=deployment, created_at=posted)
        shadow = self.shadows.get(request.model) if _attempt(headers) <= 1 else None
        if shadow is not None and not shadow.mirrors(request.id):
            shadow = None
        marks = [(MIRRORED_HEADER, ",".join(shadow.candidates).encode())] if shadow else None
        await sink.send(requests_topic(deployment), batch_key(forwarded, deployment).encode(),
                        encode(forwarded.to_dict()), marks)
        sink.on_commit(self.metrics.routed.labels(request.model, deployment).inc)
        sink.on_commit(self.metrics.tenant_requests.labels(
            self.metrics.tenant(tenant.name), self.metrics.model(request.model)).inc)
        if shadow is not None:
            await self._mirror(sink, forwarded, shadow, deployment)

    async def _charge(self, sink: Sink, request: Request, tenant: Tenant) -> None:
        """Take the request from the tenant's buckets, or refuse it. The new state is kept
        in the sink for the transaction's next requests, and in memory once committed (the
        topic's copy arrives later); the topic keeps it for a restart."""
        now = time.time()
        state = (sink.staged.get(tenant.name) or self._buckets.get(tenant.name)
                 or self._stored_buckets(tenant.name))
        text = request.prompt if request.messages is None else messages_text(
            request.messages)  # rendered by the worker, a few tokens longer
        charged = estimate_tokens(text, request.input_ids, request.max_new_tokens)
        verdict = admit(state, tenant, charged, now)
        if not verdict.allowed:
            retry = None if math.isinf(verdict.retry_after_s) else round(
                verdict.retry_after_s, 3)
            raise _Refusal(ErrorCode.QUOTA_EXCEEDED, f"quota: {verdict.reason}", "quota",
                           retry)
        sink.staged[tenant.name] = verdict.state
        sink.on_commit(partial(self._buckets.__setitem__, tenant.name, verdict.state))
        await sink.send(self.quota_topic, tenant.name.encode(), encode(verdict.state))
        sink.on_commit(partial(self.metrics.tenant_tokens.labels(
            self.metrics.tenant(tenant.name)).inc, charged))

    def _stored_buckets(self, tenant: str) -> QuotaState | None:
        """The tenant's buckets as the quota table has them (after a restart); None (full
        buckets) for a record this router cannot read."""
        raw = self.quotas.values.get(tenant)
        if raw is None:
            return None
        try:
            return from_dict(QuotaState, raw)
        except SchemaError as exc:
            log.warning("quota state of tenant %r unreadable, buckets start full: %s", tenant,
                        exc)
            return None

    async def _pick(self, request: Request, posted: float) -> str | None:
        """The routed backend that exists and takes new requests (deployed checkpoints do so
        only when ready)."""
        return (await choose_backend(request.model, request.id, self.routes, self.catalog,
                                     self.registry, set(), since=posted)).deployment

    async def _mirror(self, sink: Sink, forwarded: Request, shadow: Shadow,
                      primary: str) -> None:
        """Copy a request to each candidate's mirror topic (in the same transaction as the
        primary; a slow or absent candidate never delays the answer: nobody waits for it)."""
        for candidate in shadow.candidates:
            if candidate == primary:
                continue
            topic = mirror_topic(candidate)
            if topic not in self._mirror_topics:
                await ensure_topics(self.bootstrap, {topic: INGRESS_PARTITIONS})
                self._mirror_topics.add(topic)
            copy = dataclasses.replace(forwarded, model=candidate)
            await sink.send(topic, batch_key(copy, candidate).encode(), encode(copy.to_dict()),
                            [(PRIMARY_HEADER, primary.encode())])
            sink.on_commit(self.metrics.mirrored.labels(shadow.alias, candidate).inc)

    async def _reply(self, sink: Sink, reply_to: str, result: Result,
                     prefix: str | None) -> None:
        """An error result on the caller's reply topic, if results may go there at all (the
        refusal's dead letter is the answer otherwise)."""
        if reply_topic_problem(reply_to, prefix) is not None:
            return
        try:
            async with asyncio.timeout(_REPLY_TIMEOUT_S):
                if reply_to not in self._reply_topics:
                    # Created first: a name the broker refuses (one colliding with another
                    # topic) fails here at once instead of stalling the send.
                    await ensure_topics(self.bootstrap, {reply_to: INGRESS_PARTITIONS})
                    self._reply_topics.add(reply_to)
                await sink.send(reply_to, result.id.encode(), encode(result), best_effort=True)
        except (KafkaError, TimeoutError) as exc:  # the dead letter is already written
            log.warning("error result %s not delivered to %r: %r", result.id, reply_to, exc)

    async def _dead_letter(self, sink: Sink, record: ConsumerRecord, reason: str,
                           bad_field: str, kind: str, max_value: int | None = None) -> None:
        log.warning("refused %s[%d]@%d (%s): %s", record.topic, record.partition,
                    record.offset, kind, reason)
        key, value = record.key, record.value
        text = value.decode(errors="replace") if value is not None else None
        letter = DeadLetter(
            reason=reason, bad_field=bad_field, source_topic=record.topic,
            partition=record.partition, offset=record.offset, component="router",
            key=key.decode(errors="replace") if key else None,
            value=text if text is None or max_value is None else text[:max_value],
            timestamp=time.time())
        await sink.send(DLQ_TOPIC, key, encode(letter))


def _headers(raw: Iterable[tuple[str, bytes]] | None) -> dict[str, bytes]:
    return {str(k).lower(): (v if isinstance(v, bytes) else str(v).encode())
            for k, v in (raw or [])}


def _attempt(headers: dict[str, bytes]) -> int:
    try:
        return int(headers.get(ATTEMPT_HEADER, b"1"))
    except ValueError:
        return 1


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """`ferry router`'s settings; its flags are generated from these fields (ferry/flags.py)."""

    app_id: str = dataclasses.field(default="ferry-router", metadata={
        "help": "app id: consumer group, transactional ids and quota topic (on a secure "
                "cluster it must start with ferry-router: its ACLs' prefix)"})
    ingress: str = dataclasses.field(default=INGRESS_TOPIC, metadata={
        "help": "ingress topic"})
    instance_id: str | None = dataclasses.field(default=None, metadata={
        "env": "FERRY_ROUTER_INSTANCE_ID",
        "help": "static group membership: a name unique among the app's routers and kept "
                "across restarts (a StatefulSet pod name); its restart takes its partitions "
                "back without waiting for the session timeout"})
    transaction_timeout_ms: int = dataclasses.field(default=TRANSACTION_TIMEOUT_MS, metadata={
        "help": "the broker aborts a forwarding transaction open this long: about how long "
                "a router killed mid-transaction, with no successor to fence it, holds "
                "read_committed readers of the topics it writes (a transaction is one "
                "fetch of at most 500 records: milliseconds)"})
    log_level: str = dataclasses.field(default="WARNING", metadata={
        "help": "root log level while routing"})


def run_router(bootstrap: str, config: RouterConfig = RouterConfig(), *,
               metrics_port: int | None = None) -> None:
    """Run one router until SIGTERM/SIGINT (then it finishes the transaction under way and
    leaves the group at once); exits 1 when a control table reader died."""
    logging.getLogger().setLevel(config.log_level.upper())
    registry = CollectorRegistry()
    serve_metrics(metrics_port, registry)

    async def serve() -> None:
        router = Router(bootstrap, config, registry=registry)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, router.stop)
        await router.run()
        log.info("router stopped: ingress=%s", config.ingress)

    try:
        asyncio.run(serve())
    except Exception as exc:
        log.error("router failed: %r", exc)
        raise SystemExit(1) from exc
