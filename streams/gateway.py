"""The HTTP gateway: an OpenAI-compatible front over Ferry's Kafka request path.

Thin transport: each HTTP call becomes one `schemas.Request` posted through one shared
`FerryClient` (reply topic `ferry.replies.gateway-<uuid8>`, one per gateway instance), and
the `schemas.Result` that comes back becomes an OpenAI object or an error JSON.

Routing (first match wins):
  * `POST /v1/models/{model}/versions/{version}/completions` (and `.../chat/completions`)
    serve deployment `{model}-{version}` exactly, whatever the body's `model` says;
  * otherwise the body's `model` names the deployment; when it is absent or `"default"`
    and the Host header (port stripped) is in `host_routes`, that entry names it.
A deployment exists when its topic `ferry.requests.<deployment>` does (cached admin lookup),
so a request for a model nobody serves gets 404 at once instead of waiting for a timeout.

Chat messages are rendered to one prompt as `"{role}: {content}\\n"` lines followed by
`"assistant:"`. Sampling defaults are Ferry's (greedy, 16 tokens), not OpenAI's.
`stream: true` sends server-sent events in OpenAI's chunk format; the worker answers with
whole results for now, so the text arrives as one content chunk, then a chunk with the
finish reason, then `data: [DONE]`. Token-level streaming comes with a later milestone.

Async: `"async": true` in the body (or `Prefer: respond-async`) answers 202 `{id}` at once;
`GET /v1/requests/{id}?wait=S` long-polls (200 with the object, 202 if still pending, 404 if
unknown) and `GET /v1/requests/{id}/events` streams it as SSE. Finished async results are
kept for `RESULT_RETENTION_S`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ferry.client import FerryClient
from schemas import ErrorCode, Request, Result, SchemaError
from schemas.topics import REQUESTS_PREFIX
from streams.gateway_metrics import GatewayMetrics
from streams.openai_format import (
    ApiError, completion_object, error_response, error_type, json_text, parse_call, pick_model,
    result_error, schema_error, stream_chunks,
)

log = logging.getLogger("ferry.gateway")

RESULT_RETENTION_S = 600.0
MAX_WAIT_S = 300.0
# ---- Kafka-side state -----------------------------------------------------------------

class DeploymentCatalog:
    """Which deployments exist: the `ferry.requests.*` topics, from a cached admin lookup.

    A name found is trusted for `ttl_s`; a name not found triggers a fresh listing, at most
    one per `min_refresh_s`, so unknown names cost one metadata request, not a timeout.
    """

    def __init__(self, bootstrap: str, ttl_s: float = 30.0, min_refresh_s: float = 0.5) -> None:
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        self._ttl_s, self._min_refresh_s = ttl_s, min_refresh_s
        self._names: set[str] = set()
        self._listed_at = float("-inf")
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self._admin.start()

    async def close(self) -> None:
        await self._admin.close()

    async def names(self, max_age_s: float = 0.0) -> set[str]:
        async with self._lock:
            if time.monotonic() - self._listed_at > max_age_s:
                topics = await self._admin.list_topics()
                self._names = {t[len(REQUESTS_PREFIX):] for t in topics
                               if t.startswith(REQUESTS_PREFIX)}
                self._listed_at = time.monotonic()
            return set(self._names)

    async def exists(self, deployment: str) -> bool:
        if deployment in await self.names(max_age_s=self._ttl_s):
            return True
        return deployment in await self.names(max_age_s=self._min_refresh_s)


@dataclass
class Pending:
    """An accepted async call: its answer arrives in `task`."""

    task: asyncio.Task[Result]
    chat: bool
    created: int


async def await_result(future: Awaitable[Result], request: Request, timeout_s: float) -> Result:
    """The result, or a failure result: deadline_exceeded when none came within `timeout_s`,
    internal when it could not be posted (so an async call never ends in a raw exception)."""
    try:
        return await asyncio.wait_for(future, timeout_s)
    except asyncio.TimeoutError:
        return Result.failure(request.id, request.model, ErrorCode.DEADLINE_EXCEEDED,
                              f"deadline: no result within {timeout_s:g}s")
    except Exception as exc:  # a delivery failure or a dead result reader
        log.warning("request %s failed: %r", request.id, exc)
        return Result.failure(request.id, request.model, ErrorCode.INTERNAL,
                              f"request could not be served: {type(exc).__name__}")


# ---- HTTP handlers --------------------------------------------------------------------

class Gateway:
    """Handlers over one FerryClient, one catalog and the async calls in progress."""

    client: FerryClient  # both built on app startup, inside the serving loop
    catalog: DeploymentCatalog

    def __init__(self, bootstrap: str, registry: CollectorRegistry, request_timeout_s: float,
                 host_routes: dict[str, str]) -> None:
        self.bootstrap = bootstrap
        self.reply_to = f"ferry.replies.gateway-{uuid.uuid4().hex[:8]}"
        self.registry = registry
        self.metrics = GatewayMetrics.create(registry)
        self.request_timeout_s = request_timeout_s
        self.host_routes = host_routes
        self.pending: dict[str, Pending] = {}

    async def start(self, _app: web.Application) -> None:
        # Built here, not in __init__: Kafka clients must belong to the serving loop.
        self.client = FerryClient(self.bootstrap, reply_to=self.reply_to)
        self.catalog = DeploymentCatalog(self.bootstrap)
        await self.client.start()
        await self.catalog.start()

    async def close(self, _app: web.Application) -> None:
        for p in self.pending.values():
            p.task.cancel()
        await asyncio.gather(*(p.task for p in self.pending.values()), return_exceptions=True)
        await self.catalog.close()
        await self.client.close()

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, http: web.Request, chat: bool) -> web.StreamResponse:
        body = await _read_json(http)
        info = http.match_info
        path_model = f"{info['model']}-{info['version']}" if "version" in info else None
        prefer_async = "respond-async" in http.headers.get("Prefer", "")
        try:
            model = pick_model(body, path_model, http.host, self.host_routes)
            call = parse_call(body, chat=chat, model=model, prefer_async=prefer_async,
                              deadline=time.time() + self.request_timeout_s)
        except SchemaError as exc:
            raise schema_error(exc, "messages" if chat else "prompt") from None
        if not await self.catalog.exists(model):
            raise ApiError(404, f"model: {model!r} is not served by any deployment",
                           ErrorCode.UNKNOWN_MODEL.value, "model")
        created = int(time.time())
        task = asyncio.create_task(self._result_of(call.request))
        if call.respond_async:
            self._keep(call.request.id, Pending(task, chat, created))
            return web.json_response({"id": call.request.id, "object": "request",
                                      "status": "pending"}, status=202)
        result = await task
        if call.stream:
            return await _send_events(http, result, chat, created)
        return _answer(result, chat, created)

    async def _result_of(self, request: Request) -> Result:
        async def answer() -> Result:
            return await (await self.client.submit(request))

        return await await_result(answer(), request, self.request_timeout_s)

    def _keep(self, request_id: str, pending: Pending) -> None:
        self.pending[request_id] = pending
        loop = asyncio.get_running_loop()
        pending.task.add_done_callback(lambda _: loop.call_later(
            RESULT_RETENTION_S, self.pending.pop, request_id, None))

    async def poll(self, http: web.Request) -> web.StreamResponse:
        pending = self._pending(http)
        try:
            wait = float(http.query.get("wait", "30"))
        except ValueError:
            wait = -1.0
        if not 0.0 <= wait <= MAX_WAIT_S:
            raise ApiError(400, f"wait: must be a number of seconds in [0, {MAX_WAIT_S:g}]",
                           ErrorCode.INVALID_REQUEST.value, "wait")
        done, _ = await asyncio.wait([pending.task], timeout=wait)
        if not done:
            return web.json_response({"id": http.match_info["id"], "object": "request",
                                      "status": "pending"}, status=202)
        return _answer(pending.task.result(), pending.chat, pending.created)

    async def events(self, http: web.Request) -> web.StreamResponse:
        pending = self._pending(http)
        result = await asyncio.shield(pending.task)
        return await _send_events(http, result, pending.chat, pending.created)

    def _pending(self, http: web.Request) -> Pending:
        pending = self.pending.get(http.match_info["id"])
        if pending is None:
            raise ApiError(404, f"id: no request {http.match_info['id']!r} is known here",
                           "not_found", "id")
        return pending

    async def models(self, _http: web.Request) -> web.Response:
        names = sorted(await self.catalog.names())
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "ferry"} for n in names]
        return web.json_response({"object": "list", "data": data})

    async def healthz(self, _http: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics_page(self, _http: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    @web.middleware
    async def middleware(self, http: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        """Every answer is counted and timed; every failure becomes an error JSON."""
        route = http.match_info.route.resource
        label = route.canonical if route is not None else "unmatched"
        start = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            response = await _guarded(handler, http)
        finally:
            self.metrics.in_flight.dec()
        self.metrics.requests.labels(label, str(response.status)).inc()
        self.metrics.latency.labels(label).observe(time.perf_counter() - start)
        return response


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


def _answer(result: Result, chat: bool, created: int) -> web.Response:
    if result.error is not None:
        return error_response(result_error(result))
    return web.json_response(completion_object(result, chat, created), dumps=json_text)


async def _send_events(http: web.Request, result: Result, chat: bool,
                       created: int) -> web.StreamResponse:
    """Send a result as OpenAI server-sent events; an error result is one error event."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(http)
    if result.error is not None:
        err = result_error(result)
        events = [{"error": {"message": err.message, "type": error_type(err.status),
                             "param": err.param, "code": err.code}}]
    else:
        events = stream_chunks(result, chat, created)
    for event in events:
        await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


# ---- application ----------------------------------------------------------------------

GATEWAY = web.AppKey("gateway", Gateway)


def create_app(bootstrap: str, *, registry: CollectorRegistry | None = None,
               max_body_bytes: int = 1 << 20, request_timeout_s: float = 60.0,
               host_routes: dict[str, str] | None = None) -> web.Application:
    """The gateway application; its FerryClient starts with the app and closes with it."""
    gateway = Gateway(bootstrap, registry if registry is not None else CollectorRegistry(),
                      request_timeout_s, dict(host_routes or {}))
    app = web.Application(client_max_size=max_body_bytes, middlewares=[gateway.middleware])
    app[GATEWAY] = gateway
    app.on_startup.append(gateway.start)
    app.on_cleanup.append(gateway.close)
    for prefix in ("/v1", "/v1/models/{model}/versions/{version}"):
        app.router.add_post(f"{prefix}/completions", gateway.completions)
        app.router.add_post(f"{prefix}/chat/completions", gateway.chat_completions)
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_get("/v1/requests/{id}", gateway.poll)
    app.router.add_get("/v1/requests/{id}/events", gateway.events)
    app.router.add_get("/healthz", gateway.healthz)
    app.router.add_get("/metrics", gateway.metrics_page)
    return app


async def serve(bootstrap: str, port: int, host: str = "127.0.0.1", **settings: Any) -> None:
    """Run the gateway until cancelled."""
    runner = web.AppRunner(create_app(bootstrap, **settings))
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("gateway on http://%s:%d (bootstrap=%s)", host, port, bootstrap)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
