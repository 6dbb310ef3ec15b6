"""The HTTP gateway: an OpenAI-compatible front over Ferry's Kafka request path.

Each HTTP call becomes one `schemas.Request` posted through one shared `FerryClient`
(reply topic `ferry.replies.gateway-<uuid8>`, one per gateway instance), and the
`schemas.Result` that comes back becomes an OpenAI object or an error JSON.

Two modes. With `auth` (the default) the caller's API key (`Authorization: Bearer`, or the
`ferry-api-key` header) is checked here for a quick 401, and the request goes through the
router (`ferry.ingress`, keyed by tenant) which charges quotas and forwards it. Without it
(`--direct`, for trusted callers and development) requests go straight to deployment topics.

Routing (first match wins): `POST /v1/models/{model}/versions/{version}/completions` (and
`.../chat/completions`) pins deployment `{model}-{version}`; otherwise the body's `model`,
or for `"default"`/absent the Host table, names an alias or a deployment. The gateway picks
the alias's backend with the router's own routing core (`streams.routing.routes.pick`, by request
id) and pins it, so it knows which backend to avoid on a retry.

Busy check: when the chosen backend's worker-group lag is at `max_lag` or above, the next
backend of the alias is tried; when all are busy the call gets 503 `overloaded` with
`Retry-After` at once (429 is for the caller's own quota). Retries: an attempt that times
out (`attempt_timeout_s`) or answers with a retryable error goes to another backend of the
same alias with the same request id, at most `max_attempts` in all within
`request_timeout_s`; the caller gets exactly one answer.

Chat messages are passed on as they are; the worker renders them with its model's chat
template. Every OpenAI field is implemented or refused with a 400 naming it
(`streams.front.openai_fields`). Defaults: greedy; 16 tokens for completions, the rest of the
context for chat (as vLLM). A list of prompts becomes one request per prompt, gathered into
one answer.
`stream: true` sends server-sent events in OpenAI's chunk format as the worker generates
(`streams.front.sse`): the request carries `stream_to` (this gateway's delta topic) and every
delta becomes a text chunk (with its tokens' logprobs when asked; with n > 1 each choice's
deltas become chunks of its `index`; with echo the prompt comes first). A caller who
disconnects, and an attempt the gateway gives up on, are cancelled (a `Cancel` on
`ferry.cancels`): the worker drops the row at its next step instead of computing an answer
nobody reads.

Async: `"async": true` in the body (or `Prefer: respond-async`) answers 202 `{id}` at once;
`GET /v1/requests/{id}?wait=S` long-polls (200 with the object, 202 if still pending, 404 if
unknown) and `GET /v1/requests/{id}/events` streams it as SSE. Finished async results are
kept for `RESULT_RETENTION_S` and copied to `ferry.results` (with the caller's tenant), so
any gateway instance answers the poll; the same works for producers that posted on Kafka
with `reply_to = ferry.results` (`streams.front.recent_results`).

Why one long module: a call's path (auth, choice, attempts, retries, the answer) is one
sequence of decisions on one `LiveCall`; the formats, fields, SSE and limits live beside it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from edge.metrics_server import serve_metrics
from schemas import RESULTS_TOPIC, ErrorCode, Request, Result, SchemaError
from schemas.errors import RETRYABLE
from schemas.topics import API_KEY_HEADER, ATTEMPT_HEADER, DEPLOYMENT_HEADER, INGRESS_TOPIC
from streams.front.client import FerryClient
from streams.front.http_guard import ConnectionGuard
from streams.front.metrics import GatewayMetrics
from streams.front.openai_format import (
    REASON, ApiError, Call, completion_object, completions_object, error_response, json_text,
    parse_call, pick_model, prompt_error, result_error, schema_error,
)
from streams.front.recent_results import CHAT_HEADER, TENANT_HEADER, RecentResults, Seen
from streams.front.serving import WorkerGroups
from streams.front.sse import DISCONNECT_POLL_S, Disconnected, LiveCall, gone, send_events
from streams.routing.backlog import BacklogProbe, retry_after_s
from streams.routing.catalog import DeploymentCatalog
from streams.routing.choose import choose_backend
from streams.routing.keys import KeyRing, Tenant
from streams.routing.registry import Registry
from streams.routing.routes import RouteTable

log = logging.getLogger("ferry.gateway")

try:
    _VERSION = importlib.metadata.version("ferry")
except importlib.metadata.PackageNotFoundError:  # run from a source tree
    _VERSION = "unknown"

RESULT_RETENTION_S = 600.0
MAX_WAIT_S = 300.0
CLOSE_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class GatewaySettings:
    """`ferry gateway`'s settings; its flags are generated from these fields (ferry/flags.py).
    The last five are the HTTP server's (`serve`), not the application's."""

    auth: bool = field(default=True, metadata={
        "flag": "--direct", "negate": True,
        "help": "no API keys and no router: post straight to deployment topics"})
    request_timeout_s: float = field(default=60.0, metadata={
        "flag": "--request-timeout", "help": "seconds for the whole call, retries included"})
    attempt_timeout_s: float = field(default=20.0, metadata={
        "flag": "--attempt-timeout",
        "help": "seconds one backend gets before the call is retried on another"})
    max_attempts: int = field(default=3, metadata={
        "help": "backends one call tries (the first included), within --request-timeout"})
    max_lag: int | None = field(default=None, metadata={
        "help": "busy threshold: a deployment with this many requests queued gets no new ones "
                "(503 overloaded + Retry-After when all of an alias's are busy; 429 is the "
                "caller's own quota); default: no busy check"})
    host_routes: dict[str, str] = field(default_factory=dict, metadata={
        "flag": "--host-route", "metavar": "HOST=MODEL",
        "help": "send calls whose Host is HOST (and model absent/'default') to MODEL (an alias "
                "or a deployment); repeat for several"})
    ingress: str = field(default=INGRESS_TOPIC, metadata={
        "help": "the router's input topic (with API keys)"})
    port: int = field(default=8000, metadata={"help": "HTTP port of the API"})
    host: str = field(default="127.0.0.1", metadata={
        "help": "address to listen on (0.0.0.0: every interface)"})
    max_body_bytes: int = field(default=1 << 20, metadata={
        "help": "larger request bodies are refused (413)"})
    header_timeout_s: float = field(default=10.0, metadata={
        "flag": "--header-timeout",
        "help": "seconds a new connection has to send its first request's headers"})
    max_connections: int = field(default=1024, metadata={
        "help": "open connections beyond this are closed at once"})


@dataclass(frozen=True)
class Caller:
    """Who is calling: the tenant and key to post with (None in direct mode)."""

    tenant: Tenant | None
    api_key: str | None


@dataclass
class Pending:
    """An accepted async call: its answer arrives in `task`."""

    task: asyncio.Task[Result]
    chat: bool
    created: int
    tenant: str | None  # only its tenant may read it
    live: LiveCall      # its text so far, for the events endpoint


# ---- HTTP handlers --------------------------------------------------------------------

class Gateway:
    """Handlers over one FerryClient, the routing views and the async calls in progress."""

    # All built on app startup, inside the serving loop (Kafka clients belong to it).
    client: FerryClient
    catalog: DeploymentCatalog
    routes: RouteTable
    backlog: BacklogProbe
    deployments: Registry  # the deployment registry (self.registry is Prometheus')
    workers: WorkerGroups  # which hand-started deployments have a worker
    keys: KeyRing | None = None

    def __init__(self, bootstrap: str, registry: CollectorRegistry,
                 settings: GatewaySettings) -> None:
        self.bootstrap = bootstrap
        self.reply_to = f"ferry.replies.gateway-{uuid.uuid4().hex[:8]}"
        self.registry = registry
        self.metrics = GatewayMetrics.create(registry)
        self.settings = settings
        self.pending: dict[str, Pending] = {}
        self._sharing: set[asyncio.Future] = set()  # result copies being published

    async def start(self, _app: web.Application) -> None:
        self.client = FerryClient(self.bootstrap, reply_to=self.reply_to, streaming=True)
        self.catalog = DeploymentCatalog(self.bootstrap)
        self.routes = RouteTable(self.bootstrap)
        self.backlog = BacklogProbe(self.bootstrap)
        self.deployments = Registry(self.bootstrap)
        self.recent = RecentResults(self.bootstrap, retention_s=RESULT_RETENTION_S)
        self.workers = WorkerGroups(self.bootstrap)
        parts: list[Any] = [self.client, self.catalog, self.routes, self.backlog,
                            self.deployments, self.recent, self.workers]
        if self.settings.auth:
            self.keys = KeyRing(self.bootstrap)
            parts.append(self.keys)
        await asyncio.gather(*(part.start() for part in parts))
        log.info("gateway ready (%s), replies on %s",
                 "auth + router" if self.settings.auth else "direct", self.reply_to)

    async def close(self, _app: web.Application) -> None:
        for p in self.pending.values():
            p.task.cancel()
        parts: list[Any] = [self.catalog, self.routes, self.backlog, self.deployments,
                            self.recent, self.workers, self.client,
                            *([self.keys] if self.keys else [])]
        try:  # bounded: a broker that stopped answering must not hold the shutdown
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await asyncio.gather(*(p.task for p in self.pending.values()), *self._sharing,
                                     return_exceptions=True)
                await asyncio.gather(*(part.close() for part in parts), return_exceptions=True)
        except TimeoutError:
            log.warning("gateway: Kafka clients not closed within %gs", CLOSE_TIMEOUT_S)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, http: web.Request, chat: bool) -> web.StreamResponse:
        started = time.perf_counter()
        caller = self._caller(http)
        body = await _read_json(http)
        info = http.match_info
        path_model = f"{info['model']}-{info['version']}" if "version" in info else None
        prefer_async = "respond-async" in http.headers.get("Prefer", "")
        try:
            model = pick_model(body, path_model, http.host, self.settings.host_routes)
            call = parse_call(body, chat=chat, model=model, prefer_async=prefer_async,
                              deadline=time.time() + self.settings.request_timeout_s)
        except SchemaError as exc:
            raise schema_error(exc, "messages" if chat else "prompt") from None
        pinned = path_model is not None
        # Every prompt of a call goes to the backend chosen for the first (one model answers).
        first = await self._choose(call.request, pinned, tried=set())
        created = int(time.time())
        if len(call.requests) > 1:
            return await self._generate_many(http, call, caller, first, pinned, created,
                                             started)
        live = LiveCall.of(call.request)
        # Async calls stream too, for whoever follows their events endpoint (unless best_of
        # picks their samples at the end).
        streamed = call.stream or (call.respond_async and (call.request.best_of or 1) == 1)
        task = asyncio.create_task(self._result_of(call.request, caller, first, pinned, live,
                                                   streamed))
        task.add_done_callback(lambda t: self.metrics.count_call(
            caller.tenant.name if caller.tenant else None, call.request.model, t))
        if call.respond_async:
            self._keep(call.request.id, Pending(task, chat, created,
                                                caller.tenant.name if caller.tenant else None,
                                                live))
            return web.json_response({"id": call.request.id, "object": "request",
                                      "status": "pending"}, status=202)
        try:
            if call.stream:
                return await send_events(http, live, task, chat=chat, created=created,
                                         model=first, include_usage=call.include_usage,
                                         metrics=self.metrics, route=_route_label(http),
                                         started=started, limit_field=call.limit_field,
                                         echo=call.echo)
            return _answer(await _unless_gone(http, task), chat, created, call.limit_field,
                           call.echo)
        except Disconnected:
            task.cancel()
            await self._cancel(live, "caller disconnected")
            response = web.Response(status=499)
            response[REASON] = ErrorCode.CANCELLED.value
            return response

    async def _generate_many(self, http: web.Request, call: Call, caller: Caller, first: str,
                             pinned: bool, created: int, started: float
                             ) -> web.StreamResponse:
        """A completions call with a list of prompts: one request each, run together, one
        answer with a choice per prompt (or the first prompt's error, naming it); streamed,
        their chunks interleave, each with its choice index."""
        lives = [LiveCall.of(r) for r in call.requests]
        tasks = [asyncio.create_task(self._result_of(r, caller, first, pinned, live,
                                                     call.stream))
                 for r, live in zip(call.requests, lives)]
        try:
            if call.stream:
                response = await send_events(http, lives, tasks, chat=False, created=created,
                                             model=first, include_usage=call.include_usage,
                                             metrics=self.metrics, route=_route_label(http),
                                             started=started, request_id=call.id)
                # A stream ended by one prompt's error leaves the others nobody reads.
                left = [(t, c) for t, c in zip(tasks, lives) if not t.done()]
                for task, _ in left:
                    task.cancel()
                await asyncio.gather(*(self._cancel(c, "stream ended") for _, c in left))
                return response
            results = await _unless_gone(http, asyncio.ensure_future(asyncio.gather(*tasks)))
        except Disconnected:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*(self._cancel(live, "caller disconnected") for live in lives))
            response = web.Response(status=499)
            response[REASON] = ErrorCode.CANCELLED.value
            return response
        for i, result in enumerate(results):
            if result.error is not None:
                return error_response(prompt_error(result_error(result), i))
        return web.json_response(completions_object(call.id, results, created),
                                 dumps=json_text)

    async def _cancel(self, live: LiveCall, why: str) -> None:
        """Tell the backend of the call's current attempt to stop (best effort: the request's
        deadline stops it anyway)."""
        if live.deployment is None:
            return
        self.metrics.cancels.labels(why).inc()
        try:
            await self.client.cancel(live.request_id, live.deployment, why)
        except Exception as exc:
            log.warning("cancel of %s on %s not sent: %r", live.request_id, live.deployment, exc)

    def _caller(self, http: web.Request) -> Caller:
        if self.keys is None:
            return Caller(None, None)
        auth = http.headers.get("Authorization", "")
        api_key = auth[7:].strip() if auth[:7].lower() == "bearer " else http.headers.get(
            API_KEY_HEADER, "")
        # Keys are ASCII; anything else (undecodable bytes included) is simply not a key.
        tenant = self.keys.authenticate(api_key) if api_key.isascii() else None
        if tenant is None:
            self.metrics.rejections.labels(ErrorCode.UNAUTHENTICATED.value).inc()
            raise ApiError(401, "authorization: missing, unknown or revoked API key",
                           ErrorCode.UNAUTHENTICATED.value, "authorization")
        return Caller(tenant, api_key)

    async def _choose(self, request: Request, pinned: bool, tried: set[str]) -> str:
        """The backend for a new call: by route, skipping missing and busy deployments."""
        choice = await choose_backend(
            request.model, request.id, self.routes, self.catalog, self.deployments, tried,
            pinned=pinned, busy=self._busy if self.settings.max_lag is not None else None)
        if choice.deployment is not None:
            return choice.deployment
        unready, busy = choice.unready, choice.busy_retry_s
        if unready and not busy:
            self.metrics.rejections.labels(ErrorCode.OVERLOADED.value).inc()
            states = ", ".join(f"{d} is {r.status}" for d in unready
                               if (r := self.deployments.by_deployment(d)) is not None)
            raise ApiError(503, f"model: no deployment of {request.model!r} takes new requests "
                           f"({states})", ErrorCode.OVERLOADED.value, "model", 1.0)
        if busy:
            self.metrics.rejections.labels(ErrorCode.OVERLOADED.value).inc()
            raise ApiError(503, f"model: every deployment of {request.model!r} has a backlog of "
                           f"{self.settings.max_lag} requests or more; retry later",
                           ErrorCode.OVERLOADED.value, "model", min(busy))
        self.metrics.rejections.labels(ErrorCode.UNKNOWN_MODEL.value).inc()
        raise ApiError(404, f"model: {request.model!r} is not served by any deployment",
                       ErrorCode.UNKNOWN_MODEL.value, "model")

    async def _result_of(self, request: Request, caller: Caller, deployment: str,
                         pinned: bool, live: LiveCall, streamed: bool) -> Result:
        """Attempts on backends of the alias until one answers; always returns one result."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        tried = {deployment}
        result: Result | None = None
        for attempt in range(1, self.settings.max_attempts + 1):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            live.deployment = deployment
            result = await self._attempt(request, caller, live, attempt,
                                         min(self.settings.attempt_timeout_s, remaining),
                                         deadline, streamed)
            if result.error is None or not _retryable(result):
                return result
            following = None if pinned else await self._alternative(request, tried)
            if following is None or attempt == self.settings.max_attempts:
                break
            log.info("request %s: %s on %s; retrying on %s", request.id,
                     result.error.code.value, deployment, following)
            self.metrics.retries.labels(request.model).inc()
            deployment = following
        if result is None or result.error is None:
            return Result.failure(request.id, request.model, ErrorCode.DEADLINE_EXCEEDED,
                                  "deadline: no result within "
                                  f"{self.settings.request_timeout_s:g}s")
        return result

    async def _busy(self, deployment: str) -> float | None:
        assert self.settings.max_lag is not None
        sample = await self.backlog.sample(deployment)
        if sample.lag >= self.settings.max_lag:
            return retry_after_s(sample, self.settings.max_lag)
        return None

    async def _alternative(self, request: Request, tried: set[str]) -> str | None:
        """Another backend of the alias that takes requests (no busy check: a retry is owed)."""
        return (await choose_backend(request.model, request.id, self.routes, self.catalog,
                                     self.deployments, tried)).deployment

    async def _attempt(self, request: Request, caller: Caller, live: LiveCall, attempt: int,
                       timeout_s: float, deadline: float, streamed: bool) -> Result:
        """One try on one backend: its result, or a failure naming why there is none. A
        stream that keeps producing text is not timed out (only the call's deadline ends
        it)."""
        deployment = live.deployment
        assert deployment is not None
        on_delta = live.on_delta if streamed else None
        loop = asyncio.get_running_loop()
        try:
            if caller.tenant is not None and caller.api_key is not None:
                headers = [(API_KEY_HEADER, caller.api_key.encode()),
                           (DEPLOYMENT_HEADER, deployment.encode()),
                           (ATTEMPT_HEADER, str(attempt).encode())]
                future = await self.client.submit(request, self.settings.ingress,
                                                  key=caller.tenant.name.encode(),
                                                  headers=headers, on_delta=on_delta)
            else:
                future = await self.client.submit(dataclasses.replace(request, model=deployment),
                                                  on_delta=on_delta)
            while True:
                pieces = len(live.pieces)
                wait = min(timeout_s, deadline - loop.time())
                try:
                    return await asyncio.wait_for(asyncio.shield(future), max(0.0, wait))
                except asyncio.TimeoutError:
                    if len(live.pieces) == pieces or loop.time() >= deadline:
                        raise
        except asyncio.TimeoutError:
            await self._cancel(live, "attempt timed out")
            return Result.failure(request.id, deployment, ErrorCode.DEADLINE_EXCEEDED,
                                  f"deadline: {deployment} gave no result within {timeout_s:g}s")
        except Exception as exc:  # a delivery failure or a dead result reader
            self.client.forget(request.id)
            log.warning("request %s failed on %s: %r", request.id, deployment, exc)
            return Result.failure(request.id, deployment, ErrorCode.INTERNAL,
                                  f"request could not be served: {type(exc).__name__}")

    def _keep(self, request_id: str, pending: Pending) -> None:
        self.pending[request_id] = pending
        loop = asyncio.get_running_loop()

        def done(task: asyncio.Task[Result]) -> None:
            loop.call_later(RESULT_RETENTION_S, self.pending.pop, request_id, None)
            if not task.cancelled():
                share = asyncio.ensure_future(self._share(task.result(), pending))
                self._sharing.add(share)
                share.add_done_callback(self._sharing.discard)

        pending.task.add_done_callback(done)

    async def _share(self, result: Result, pending: Pending) -> None:
        """Copy an async call's result to `ferry.results`, so every gateway can answer it."""
        headers = [(CHAT_HEADER, b"1" if pending.chat else b"0")]
        if pending.tenant is not None:
            headers.append((TENANT_HEADER, pending.tenant.encode()))
        try:
            await self.client.publish(RESULTS_TOPIC, result, headers)
        except Exception as exc:  # this gateway still answers it; others will not
            log.warning("result %s not shared: %r", result.id, exc)

    async def poll(self, http: web.Request) -> web.StreamResponse:
        wait = _wait_param(http)
        found = await self._find(http, wait)
        if isinstance(found, Seen):
            return _answer(found.result, found.chat, int(time.time()))
        done, _ = await asyncio.wait([found.task], timeout=wait)
        if not done:
            return web.json_response({"id": http.match_info["id"], "object": "request",
                                      "status": "pending"}, status=202)
        return _answer(found.task.result(), found.chat, found.created)

    async def events(self, http: web.Request) -> web.StreamResponse:
        """An async call as server-sent events: live text if this gateway runs it, else the
        finished result (found on `ferry.results`) as one piece."""
        started = time.perf_counter()
        found = await self._find(http, _wait_param(http))
        if isinstance(found, Seen):
            done: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
            done.set_result(found.result)
            result = found.result
            live = LiveCall(result.id, n=len(result.choices or ()) or 1,
                            logprobs=result.logprobs is not None)
            task, chat, created = done, found.chat, int(time.time())
        else:
            live, task, chat, created = found.live, found.task, found.chat, found.created
        try:  # the caller leaving does not cancel an async call: it can come back
            return await send_events(http, live, task, chat=chat, created=created,
                                     model=live.deployment or "", include_usage=False,
                                     metrics=self.metrics, route=_route_label(http),
                                     started=started, watch_caller=False)
        except Disconnected:
            return web.Response(status=499)

    async def _find(self, http: web.Request, wait: float) -> Pending | Seen:
        """An async call accepted here, else a result on `ferry.results` (a producer's, or an
        async call another gateway accepted), waiting up to `wait` s for it; only its tenant
        may read one that names a tenant."""
        request_id = http.match_info["id"]
        tenant = self._caller(http).tenant if self.keys is not None else None
        name = tenant.name if tenant else None
        pending = self.pending.get(request_id)
        if pending is not None:
            if pending.tenant in (None, name):
                return pending
        elif (seen := await self.recent.wait(request_id, wait)) is not None:
            if seen.tenant in (None, name):
                return seen
        raise ApiError(404, f"id: no request {request_id!r} is known here (nor a result for it "
                       f"within {wait:g}s)", "not_found", "id")

    async def _served(self) -> dict[str, dict[str, Any]]:
        """OpenAI model objects of what takes requests now, by every name a call may use:
        ready deployments of the registry, deployments started by hand whose worker group
        has members, and aliases with at least one such backend (a topic with no worker, a
        typo's auto-created topic, an alias naming nothing: not listed)."""
        records = {r.deployment: r for r in self.deployments.records()}
        topics = await self.catalog.names(max_age_s=5.0)
        ready = {d for d, r in records.items() if r.status == "ready" and d in topics}
        ready |= await self.workers.staffed(n for n in topics if n not in records)
        served: dict[str, dict[str, Any]] = {}
        for alias, route in sorted(self.routes.aliases().items()):
            if any(d in ready for d in route.backends()):
                served[alias] = {"id": alias, "object": "model", "created": 0,
                                 "owned_by": "ferry", "routes": route.weights}
        for name in sorted(ready):
            record = records.get(name)
            if record is None:
                served.setdefault(name, {"id": name, "object": "model", "created": 0,
                                         "owned_by": "ferry"})
            else:
                obj = {"id": record.id, "object": "model",
                       "created": int(record.times.get("pending", 0)), "owned_by": "ferry",
                       "deployment": record.deployment, "status": record.status}
                served.setdefault(record.id, obj)
                served.setdefault(record.deployment, obj)  # the topic-safe name works too
        return served

    async def models(self, http: web.Request) -> web.Response:
        self._caller(http)  # the same key as generation
        unique = {id(obj): obj for obj in (await self._served()).values()}
        return web.json_response({"object": "list", "data": list(unique.values())})

    async def model(self, http: web.Request) -> web.Response:
        self._caller(http)
        name = http.match_info["id"]
        obj = (await self._served()).get(name)
        if obj is None:
            raise ApiError(404, f"model: {name!r} is not served by any ready deployment",
                           ErrorCode.UNKNOWN_MODEL.value, "model")
        return web.json_response(obj)

    async def health(self, http: web.Request) -> web.Response:
        """vLLM's /health: 200 with an empty body when the gateway can serve, else 503."""
        healthz = await self.healthz(http)
        return web.Response(status=healthz.status, text="" if healthz.status == 200 else
                            healthz.text, content_type="application/json")

    async def version(self, _http: web.Request) -> web.Response:
        return web.json_response({"version": _VERSION})

    async def healthz(self, _http: web.Request) -> web.Response:
        """ok, or 503 naming every background reader that died (the gateway would answer
        from stale routes or keys, or never see results)."""
        parts = {"results": self.client, "recent_results": self.recent, "routes": self.routes,
                 "registry": self.deployments, **({"keys": self.keys} if self.keys else {})}
        dead = {name: repr(part.failure) for name, part in parts.items() if not part.healthy}
        if dead:
            return web.json_response({"status": "failing", "dead_readers": dead}, status=503)
        return web.json_response({"status": "ok"})

    async def metrics_page(self, _http: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    @web.middleware
    async def middleware(self, http: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        """Every answer is counted and timed; every failure becomes an error JSON."""
        label = _route_label(http)
        start = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            response = await _guarded(handler, http)
        finally:
            self.metrics.in_flight.dec()
        reason = response.get(REASON, "ok" if response.status < 400 else "http_error")
        self.metrics.requests.labels(label, str(response.status), reason).inc()
        self.metrics.latency.labels(label).observe(time.perf_counter() - start)
        return response


def _wait_param(http: web.Request) -> float:
    try:
        wait = float(http.query.get("wait", "30"))
    except ValueError:
        wait = -1.0
    if not 0.0 <= wait <= MAX_WAIT_S:
        raise ApiError(400, f"wait: must be a number of seconds in [0, {MAX_WAIT_S:g}]",
                       ErrorCode.INVALID_REQUEST.value, "wait")
    return wait


def _retryable(result: Result) -> bool:
    """A backend's failure (worth another backend), not the request's own fault."""
    assert result.error is not None
    return result.error.code in RETRYABLE


def _route_label(http: web.Request) -> str:
    route = http.match_info.route.resource
    return route.canonical if route is not None else "unmatched"


async def _guarded(handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                   http: web.Request) -> web.StreamResponse:
    try:
        return await handler(http)
    except ApiError as err:
        return error_response(err)
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(ApiError(413, f"body: {exc.text}",
                                       ErrorCode.REQUEST_TOO_LARGE.value, None))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(ApiError(exc.status, exc.reason, "http_error", None))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:  # a bug or a broker failure: answer it, never crash
        log.exception("unhandled error on %s %s", http.method, http.path)
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}",
                                       ErrorCode.INTERNAL.value, None))


async def _read_json(http: web.Request) -> Any:
    raw = await http.read()  # raises 413 past the application's client_max_size
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"body: not valid JSON: {exc}", ErrorCode.INVALID_REQUEST.value,
                       None) from None


def _answer(result: Result, chat: bool, created: int, limit_field: str = "max_tokens",
            echo: str | None = None) -> web.Response:
    if result.error is not None:
        return error_response(result_error(result, limit_field))
    return web.json_response(completion_object(result, chat, created, echo), dumps=json_text)


async def _unless_gone(http: web.Request, task: asyncio.Task[Result]) -> Result:
    """The call's result; Disconnected as soon as its caller is seen gone."""
    while True:
        done, _ = await asyncio.wait([task], timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if gone(http):
            raise Disconnected()


# ---- application ----------------------------------------------------------------------

GATEWAY = web.AppKey("gateway", Gateway)


def create_app(bootstrap: str, settings: GatewaySettings | None = None, *,
               registry: CollectorRegistry | None = None,
               metrics_route: bool = True) -> web.Application:
    """The gateway application; its Kafka clients start with the app and close with it.
    `metrics_route`: /metrics on the API port too (`serve` puts it on a port of its own:
    the series name tenants, which callers must not read)."""
    settings = settings or GatewaySettings()
    gateway = Gateway(bootstrap, registry if registry is not None else CollectorRegistry(),
                      settings)
    app = web.Application(client_max_size=settings.max_body_bytes,
                          middlewares=[gateway.middleware])
    app[GATEWAY] = gateway
    app.on_startup.append(gateway.start)
    app.on_cleanup.append(gateway.close)
    for prefix in ("/v1", "/v1/models/{model}/versions/{version}"):
        app.router.add_post(f"{prefix}/completions", gateway.completions)
        app.router.add_post(f"{prefix}/chat/completions", gateway.chat_completions)
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_get("/v1/models/{id}", gateway.model)
    app.router.add_get("/v1/requests/{id}", gateway.poll)
    app.router.add_get("/v1/requests/{id}/events", gateway.events)
    app.router.add_get("/healthz", gateway.healthz)
    app.router.add_get("/health", gateway.health)
    app.router.add_get("/version", gateway.version)
    if metrics_route:
        app.router.add_get("/metrics", gateway.metrics_page)
    return app


async def serve(bootstrap: str, settings: GatewaySettings | None = None, *,
                metrics_port: int | None = None, metrics_route: bool = True) -> None:
    """Run the gateway on `settings.host`:`settings.port` until cancelled, behind a
    header-read timeout and a connection cap (the settings' too); its metrics on
    `metrics_port` (None: none) and, with `metrics_route`, on the API port."""
    settings = settings or GatewaySettings()
    app = create_app(bootstrap, settings, metrics_route=metrics_route)
    serve_metrics(metrics_port, app[GATEWAY].registry)
    runner = web.AppRunner(app, keepalive_timeout=75.0)
    await runner.setup()
    guard = ConnectionGuard(runner.server, app[GATEWAY].registry,
                            header_timeout_s=settings.header_timeout_s,
                            max_connections=settings.max_connections)
    server = await asyncio.get_running_loop().create_server(guard, settings.host, settings.port)
    try:
        log.info("gateway on http://%s:%d (bootstrap=%s)", settings.host, settings.port,
                 bootstrap)
        await asyncio.Event().wait()
    finally:
        server.close()
        await runner.cleanup()
