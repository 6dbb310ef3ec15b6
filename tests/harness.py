"""Fixtures and helpers for the front door: gateways in-process, routers as processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from ferry.broker import free_port
from streams.front.gateway import GatewaySettings, create_app


@dataclass
class Gateway:
    url: str
    registry: CollectorRegistry
    app: web.Application
    api_key: str = "x"

    def openai(self, api_key: str | None = None) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key or self.api_key,
                                  max_retries=0)


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_gateway(kafka_bootstrap: str) -> AsyncIterator[GatewayFactory]:
    """start_gateway(**settings) -> a gateway app served on 127.0.0.1; all stopped at teardown.
    Direct mode (no keys, no router) unless `auth=True` is given."""
    runners: list[web.AppRunner] = []

    async def start(**settings: Any) -> Gateway:
        settings.setdefault("auth", False)
        registry = CollectorRegistry()
        runner = web.AppRunner(create_app(kafka_bootstrap, GatewaySettings(**settings),
                                          registry=registry))
        runners.append(runner)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return Gateway(f"http://127.0.0.1:{port}", registry, runner.app)

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(http: aiohttp.ClientSession, url: str, body: object,
               **kwargs: object) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(url, data=data, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


@dataclass
class FerryProcess:
    """A `ferry COMMAND ARGS...` process that logs `ready_line` when it can work."""

    command: str
    args: list[str]
    ready_line: str
    metrics_port: int
    log: Path
    process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        cmd = [sys.executable, "-m", "ferry.cli", self.command, *self.args,
               "--metrics-port", str(self.metrics_port), "--log-level", "INFO"]
        with self.log.open("a") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while self.ready_line not in self.log.read_text(errors="replace"):
            assert self.process.poll() is None, f"exited:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.1)  # polling a log file for a condition, with a deadline

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample from the process's /metrics page (0 when absent)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as page:
            text = page.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in (labels or {}).items()):
                    return sample.value
        return 0.0


class RouterProcess(FerryProcess):
    """A `ferry router` process with its own app id and ingress topic."""

    def __init__(self, app_id: str, ingress: str, metrics_port: int, log: Path) -> None:
        super().__init__("router", ["--app-id", app_id, "--ingress", ingress],
                         "router ready", metrics_port, log)
        self.app_id, self.ingress = app_id, ingress

    def start(self, bootstrap: str, timeout: float = 60.0) -> None:  # type: ignore[override]
        if "--bootstrap" not in self.args:
            self.args += ["--bootstrap", bootstrap]
        super().start(timeout)


@pytest.fixture(scope="module")
def router(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[RouterProcess]:
    """One router process for a test module, on an ingress topic of its own."""
    tag = uuid.uuid4().hex[:8]
    proc = RouterProcess(f"ferry-router-test-{tag}", f"ferry.ingress.test-{tag}", free_port(),
                         tmp_path_factory.mktemp("router") / "router.log")
    proc.start(kafka_bootstrap)
    yield proc
    proc.stop()
