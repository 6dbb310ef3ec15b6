"""Connection limits for the gateway's HTTP server: a header-read timeout and a cap on open
connections, which aiohttp's server does not have (a client that sends half a request line
and waits holds a connection, and a coroutine, for ever).

`ConnectionGuard` wraps the protocol factory of an aiohttp `web.Server`: each new
connection must complete its first request's headers within `header_timeout_s`, and
connections past `max_connections` are closed at once. Idle keep-alive connections are
aiohttp's own `keepalive_timeout`.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger("ferry.gateway")


class ConnectionGuard:
    """A protocol factory for `loop.create_server` that limits what a connection may hold."""

    def __init__(self, server: web.Server, registry: CollectorRegistry, *,
                 header_timeout_s: float, max_connections: int) -> None:
        # no defaults: the gateway's are its settings' (GatewaySettings)
        self._server = server
        self.header_timeout_s, self.max_connections = header_timeout_s, max_connections
        self.open = 0
        self.closed = Counter("ferry_gateway_connections_closed",
                              "Connections closed by the gateway's limits, by reason",
                              ["reason"], registry=registry)

    def __call__(self) -> RequestHandler:
        # As web.Server.__call__ builds its handlers, with the guard's subclass.
        handler = _GuardedHandler(self._server, loop=self._server._loop, **self._server._kwargs)
        handler.guard = self
        return handler

    def _check(self, handler: RequestHandler) -> None:
        # aiohttp counts a request once its headers are parsed; none yet means a stalled client.
        if handler.transport is not None and handler._request_count == 0:
            self.closed.labels("header_timeout").inc()
            log.info("closed a connection that sent no complete request within %gs",
                     self.header_timeout_s)
            handler.force_close()


class _GuardedHandler(RequestHandler):
    __slots__ = ("guard",)  # RequestHandler has slots: no attributes can be patched on

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        guard: ConnectionGuard = self.guard
        guard.open += 1
        if guard.open > guard.max_connections:
            guard.closed.labels("max_connections").inc()
            self.force_close()
            return
        asyncio.get_running_loop().call_later(guard.header_timeout_s, guard._check, self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.guard.open -= 1
        super().connection_lost(exc)
