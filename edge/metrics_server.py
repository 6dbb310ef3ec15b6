"""Every component's /metrics: on by default, on a port of its own, with process_* metrics.

Default ports (override with `--metrics-port PORT`, disable with `--metrics-port off` or 0):
worker 9100, router 9101, gateway 9102, deployer 9103, comparator 9104. A port that is taken
stops the component at start, naming the flag: an operator who expects metrics never gets a
component that silently serves none.
"""

from __future__ import annotations

import argparse
import socket
import threading
import weakref
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler as WSGIRequestHandlerBase
from wsgiref.simple_server import make_server

from prometheus_client import (
    CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

DEFAULT_PORTS = {"worker": 9100, "router": 9101, "gateway": 9102, "deployer": 9103,
                 "comparator": 9104}


_WITH_PROCESS: weakref.WeakSet[CollectorRegistry] = weakref.WeakSet()


class MetricsPortError(RuntimeError):
    pass


def parse_port(value: str) -> int | None:
    """argparse type of --metrics-port: a TCP port, or off/0 (None: no endpoint)."""
    if value.strip().lower() in ("off", "0", "none"):
        return None
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a port number or 'off'") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{port} is not in 1..65535 (or off)")
    return port


def add_metrics_port(parser: argparse.ArgumentParser, component: str) -> None:
    default = DEFAULT_PORTS[component]
    parser.add_argument("--metrics-port", type=parse_port, default=default, metavar="PORT|off",
                        help=f"Prometheus /metrics on this port (default {default}; off or 0: "
                             "none)")


def free_port() -> int:
    """A port free on this machine now (for local replicas and tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_process_metrics(registry: CollectorRegistry) -> CollectorRegistry:
    """process_* (CPU, memory, fds), python_info and python_gc_* on a component's registry,
    as prometheus_client puts them on its default one."""
    if registry not in _WITH_PROCESS:  # once: a second set would repeat every series
        _WITH_PROCESS.add(registry)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def serve_metrics(port: int | None, registry: CollectorRegistry, host: str = "0.0.0.0") -> None:
    """Serve `registry` (with process metrics) on `port` in a background thread; None: not."""
    if port is None:
        return
    with_process_metrics(registry)
    try:
        server = make_server(host, port, _text_format(make_wsgi_app(registry)),
                             ThreadingWSGIServer, handler_class=WSGIRequestHandler)
    except OSError as exc:
        raise MetricsPortError(f"--metrics-port {port}: cannot listen ({exc.strerror or exc}); "
                               "pass a free port, or --metrics-port off") from None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()


def _text_format(app: Any) -> Any:
    """Always Prometheus' text format 0.0.4. prometheus_client 0.26's OpenMetrics output (what
    Prometheus asks for first) rewrites the colons of sample names to underscores
    (`vllm:num_requests_running` became `vllm_num_requests_running`): vLLM's names would not
    survive a scrape."""
    def text_only(environ: dict[str, Any], start_response: Any) -> Any:
        environ.pop("HTTP_ACCEPT", None)
        return app(environ, start_response)
    return text_only


class WSGIRequestHandler(WSGIRequestHandlerBase):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's name)
        pass  # a scrape every few seconds is not news



class BoundedLabel:
    """Label values as they come, up to `limit` distinct ones; any later one is `other`. Tenant
    and model labels come from API keys and routes the operator created (unknown ones are
    refused before anything is counted); this is the guard if a deployment has very many."""

    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) < self.limit:
            self._seen.add(value)
            return value
        return "other"
