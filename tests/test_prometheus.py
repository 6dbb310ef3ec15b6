"""A real Prometheus (Debian's package, installed by `make system-deps`) on Ferry's own
compose/prometheus/prometheus.yml and alert rules: promtool checks the files and runs the
rules' unit tests; then the server scrapes a running worker, shadow candidate, router,
comparator and gateway under a little load, and every query of every Grafana dashboard must
return data through its HTTP API."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from aiokafka import AIOKafkaProducer

from ferry.broker import free_port
from ferry.prometheus import PROMETHEUS, PROMTOOL, LocalPrometheus, has_data
from schemas import requests_topic
from streams.routing.keys import add_key
from streams.routing.routes import set_route
from streams.routing.shadows import set_shadow
from tests.harness import FerryProcess

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "compose" / "prometheus"
# `make dashboard-pngs` sets these: keep the server's data in RECORD and the load running for
# RECORD_SECONDS, then compose/grafana/render.py draws the dashboards from that data.
RECORD = os.environ.get("FERRY_PROMETHEUS_RECORD")
RECORD_SECONDS = float(os.environ.get("FERRY_PROMETHEUS_RECORD_SECONDS", "150"))

pytestmark = pytest.mark.skipif(
    not (Path(PROMETHEUS).exists() and Path(PROMTOOL).exists()),
    reason="prometheus/promtool not installed (`make system-deps` installs Debian's "
           "`prometheus` package with apt-get)")


def dashboard_queries() -> list[str]:
    spec = importlib.util.spec_from_file_location("ferry_dashboards",
                                                  ROOT / "compose" / "grafana" / "dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return list(dict.fromkeys(module.queries()))


def promtool(*args: str) -> str:
    done = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=PROM_DIR,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_promtool_checks_config_rules_and_their_unit_tests() -> None:
    promtool("check", "config", "prometheus.yml")
    assert "SUCCESS: 6 rules found" in promtool("check", "rules", "alerts.yml")
    promtool("test", "rules", "alerts_test.yml")
    alerts = {r["alert"] for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
              for r in g["rules"]}
    tested = {t["alertname"] for case in yaml.safe_load(
        (PROM_DIR / "alerts_test.yml").read_text())["tests"] for t in case["alert_rule_test"]}
    assert alerts == tested, f"alerts without a unit test: {alerts - tested}"


def test_a_wrong_expectation_fails_the_rule_tests(tmp_path: Path) -> None:
    tests = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())
    tests["rule_files"] = [str(PROM_DIR / "alerts.yml")]
    tests["tests"][1]["alert_rule_test"][0]["exp_alerts"][0]["exp_labels"]["deployment"] = "good"
    (tmp_path / "t.yml").write_text(yaml.safe_dump(tests))
    done = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "t.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "FerryHighErrorRate" in done.stdout + done.stderr


# ---- the server, scraping a running stack ----------------------------------------------

def scrape_config(targets: dict[str, list[str]], port: int) -> dict[str, Any]:
    """compose/prometheus/prometheus.yml with the compose DNS names replaced by the test's
    processes, scraping every second."""
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROM_DIR / f) for f in config["rule_files"]]
    jobs = []
    for job in config["scrape_configs"]:
        name = job["job_name"]
        if name == "prometheus":
            targets[name] = [f"127.0.0.1:{port}"]
        if name in targets:  # the deployer is not part of this run (no dashboard reads it)
            jobs.append({"job_name": name, "static_configs": [{"targets": targets.pop(name)}]})
    # Not in compose (one comparator per shadow experiment), scraped the same way.
    jobs += [{"job_name": name, "static_configs": [{"targets": t}]} for name, t in targets.items()]
    config["scrape_configs"] = jobs
    return config


@pytest.fixture
def comparator_for(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Any]:
    procs: list[FerryProcess] = []

    def start(candidate: str) -> FerryProcess:
        args = ["--bootstrap", kafka_bootstrap, "--app-id", f"ferry-comparator-{candidate}",
                "--candidate", candidate, "--window", "5", "--score-timeout", "20"]
        proc = FerryProcess("comparator", args, "comparator ready", free_port(),
                            tmp_path / "comparator.log")
        procs.append(proc)
        proc.start()
        return proc

    yield start
    for proc in procs:
        proc.stop()


async def _load(gw: Any, alias: str, key: str, limited_key: str, stop: asyncio.Event) -> int:
    """Calls until `stop`: plain and streamed ones, a refused one (prompt too long) now and
    then, and a tenant over its quota."""
    sent = 0
    async with gw.openai(key) as api, gw.openai(limited_key) as limited:
        while not stop.is_set():
            sent += 1
            try:
                if sent % 7 == 0:
                    await api.completions.create(model=alias, prompt="x", max_tokens=1 << 19)
                elif sent % 5 == 0:
                    await limited.completions.create(model=alias, prompt="hi", max_tokens=2)
                elif sent % 2:
                    async for _ in await api.completions.create(
                            model=alias, prompt=f"stream {sent}", max_tokens=6, stream=True):
                        pass
                else:
                    await api.completions.create(model=alias, prompt=f"hello {sent}",
                                                 max_tokens=6)
            except openai.APIError:
                pass  # the refusals are the point; the routes may still be arriving too
    return sent


async def test_prometheus_scrapes_the_stack_and_every_dashboard_query_has_data(
        router, start_worker, start_gateway, comparator_for, kafka_bootstrap, unique,
        tmp_path: Path) -> None:
    primary, candidate, alias = unique("prim"), unique("cand"), unique("chat")
    comparator = comparator_for(candidate)
    worker_port, candidate_port = free_port(), free_port()
    await start_worker(primary, metrics_port=worker_port)
    await start_worker(candidate, shadow=True, metrics_port=candidate_port)
    await set_route(kafka_bootstrap, alias, {primary: 100})
    await set_shadow(kafka_bootstrap, alias, [candidate], 100)
    key = await add_key(kafka_bootstrap, unique("acme"))
    limited_key = await add_key(kafka_bootstrap, unique("tiny"), rpm=1)
    gw = await start_gateway(auth=True, ingress=router.ingress)
    port = free_port()
    config = scrape_config({
        "ferry-gateway": [gw.url.removeprefix("http://")],  # in-process: /metrics on its port
        "ferry-router": [f"127.0.0.1:{router.metrics_port}"],
        "ferry-worker": [f"127.0.0.1:{worker_port}", f"127.0.0.1:{candidate_port}"],
        "ferry-comparator": [f"127.0.0.1:{comparator.metrics_port}"],
    }, port)
    prometheus = LocalPrometheus(config, port, Path(RECORD) if RECORD else tmp_path)
    started = time.monotonic()
    stop = asyncio.Event()
    load = asyncio.create_task(_load(gw, alias, key, limited_key, stop))
    try:
        # A record no schema accepts: a dead letter from the worker.
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        await producer.send_and_wait(requests_topic(primary), b"{not json")
        await producer.stop()

        queries = dashboard_queries()
        missing: list[str] = queries
        deadline = time.monotonic() + 240
        while missing:
            assert time.monotonic() < deadline, "no data within 240 s for:\n" + "\n".join(
                f"  {q}  ->  {prometheus.query(q)}" for q in missing)
            assert not load.done() or load.exception() is None, load.exception()
            if prometheus.ready():
                missing = [q for q in missing if not has_data(prometheus.query(q))]
            await asyncio.sleep(2)  # polling Prometheus for a condition, with a deadline

        targets = prometheus.get("/api/v1/targets")["data"]["activeTargets"]
        assert {t["labels"]["job"] for t in targets} == {
            "ferry-gateway", "ferry-router", "ferry-worker", "ferry-comparator", "prometheus"}
        assert all(t["health"] == "up" for t in targets), [
            (t["scrapeUrl"], t["lastError"]) for t in targets if t["health"] != "up"]
        rules = [r for g in prometheus.get("/api/v1/rules")["data"]["groups"]
                 for r in g["rules"]]
        assert len(rules) == 6 and all(r["health"] == "ok" for r in rules), rules
        # The vLLM names carry the deployment as model_name; waiting includes the backlog.
        assert has_data(prometheus.query(
            f'vllm:num_requests_waiting{{model_name="{primary}"}}'))
        assert has_data(prometheus.query(
            'process_resident_memory_bytes{job="ferry-router"}'))
        if RECORD:  # a longer run for the dashboard PNGs: the load goes on until then
            while time.monotonic() < started + RECORD_SECONDS:
                assert not load.done() or load.exception() is None, load.exception()
                await asyncio.sleep(1)
    finally:
        stop.set()
        sent = await asyncio.wait_for(load, 120)
        prometheus.stop()
    assert sent > 0
