"""Metrics an operator expects: every component's port on by default (off on request), vLLM's
names next to Ferry's, the queue including the Kafka backlog, per-tenant usage."""

from __future__ import annotations

import asyncio
import re
import socket

import openai
import pytest
from prometheus_client import CollectorRegistry

from edge.metrics_server import (
    DEFAULT_PORTS, BoundedLabel, MetricsPortError, parse_port, serve_metrics,
)
from ferry.cli import _parser
from schemas import Request
from tests.conftest import wait_for
from workers.metrics import WorkerMetrics

COMMANDS = {
    "worker": ["worker", "--model", "m", "--deployment", "d"],
    "router": ["router"],
    "gateway": ["gateway"],
    "deployer": ["deployer", "--model", "m", "--store", "s"],
    "comparator": ["comparator", "--candidate", "c"],
}


@pytest.mark.parametrize("component", sorted(COMMANDS))
def test_every_component_serves_metrics_by_default_on_its_own_port(component: str) -> None:
    args = COMMANDS[component]
    assert _parser().parse_args(args).metrics_port == DEFAULT_PORTS[component]
    assert _parser().parse_args([*args, "--metrics-port", "off"]).metrics_port is None
    assert _parser().parse_args([*args, "--metrics-port", "0"]).metrics_port is None
    assert _parser().parse_args([*args, "--metrics-port", "9555"]).metrics_port == 9555
    assert len(set(DEFAULT_PORTS.values())) == len(DEFAULT_PORTS)


@pytest.mark.parametrize("bad", ["x", "-1", "70000", ""])
def test_a_bad_port_is_refused_naming_it(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["router", "--metrics-port", bad])
    assert "--metrics-port" in capsys.readouterr().err
    with pytest.raises(Exception):
        parse_port(bad)


def test_a_taken_port_stops_the_component_saying_so() -> None:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        with pytest.raises(MetricsPortError, match="--metrics-port .*off"):
            serve_metrics(sock.getsockname()[1], CollectorRegistry())


def test_bounded_label_caps_distinct_values() -> None:
    label = BoundedLabel(limit=2)
    assert [label(v) for v in ("a", "b", "c", "a", "d")] == ["a", "b", "other", "a", "other"]


def test_vllm_names_are_the_same_measurements_with_model_name() -> None:
    registry = CollectorRegistry()
    m = WorkerMetrics.create(registry)
    m.results.labels("d", "stop").inc(3)
    m.results.labels("d", "error").inc()  # a failure is no success
    m.prompt_tokens.labels("d").inc(11)
    m.ttft.labels("d").observe(0.2)
    m.queue_depth.labels("d").set(2)
    m.unread["d"] = 5
    value = registry.get_sample_value
    assert value("vllm:request_success_total", {"model_name": "d",
                                                "finished_reason": "stop"}) == 3
    assert value("vllm:request_success_total", {"model_name": "d",
                                                "finished_reason": "error"}) is None
    assert value("vllm:prompt_tokens_total", {"model_name": "d"}) == 11
    assert value("vllm:time_to_first_token_seconds_count", {"model_name": "d"}) == 1
    assert value("vllm:time_to_first_token_seconds_bucket", {"model_name": "d", "le": "0.25"}) == 1
    assert value("vllm:num_requests_waiting", {"model_name": "d"}) == 7
    assert value("process_cpu_seconds_total") is not None


async def test_waiting_includes_the_unread_kafka_backlog(start_worker, client, unique) -> None:
    dep = unique("backlog")
    worker = await start_worker(dep, max_queued=1, max_num_seqs=1)
    futures = [await client.submit(Request(id=f"b{i}", model=dep, prompt=f"queued {i}",
                                           max_new_tokens=96)) for i in range(40)]
    value = worker.registry.get_sample_value

    def waiting() -> float:
        return value("vllm:num_requests_waiting", {"model_name": dep}) or 0.0

    # One request admitted at a time: the rest wait on Kafka, and count as waiting.
    await wait_for(lambda: waiting() >= 6, 30, "the backlog to show as waiting")
    lag = sum(value("ferry_consumer_lag", {"deployment": dep, "partition": str(p)}) or 0
              for p in range(4))
    assert lag >= waiting() - 1  # unanswered = unread + admitted (+ running)
    results = await asyncio.wait_for(asyncio.gather(*futures), 180)
    assert all(r.error is None for r in results)
    await wait_for(lambda: waiting() == 0, 30, "the queue to drain")
    await wait_for(lambda: all((value("ferry_consumer_lag", {"deployment": dep,
                                                             "partition": str(p)}) or 0) == 0
                               for p in range(4)), 30, "the lag to reach 0 after the commits")
    assert (value("ferry_commit_latency_seconds_count", {"deployment": dep}) or 0) >= 1


async def test_gateway_counts_each_call_once_per_tenant(start_worker, start_gateway,
                                                        unique) -> None:
    dep = unique("usage")
    await start_worker(dep)
    gw = await start_gateway()
    async with gw.openai() as api:
        answers = [await api.completions.create(model=dep, prompt="hi", max_tokens=4),
                   await api.completions.create(model=dep, prompt="there", max_tokens=3)]
        async for _ in await api.completions.create(model=dep, prompt="s", max_tokens=2,
                                                    stream=True):
            pass
        with pytest.raises(openai.NotFoundError):
            await api.completions.create(model=unique("nobody"), prompt="x")
    value = gw.registry.get_sample_value
    labels = {"tenant": "direct", "model": dep}
    assert value("ferry_gateway_tenant_requests_total", {**labels, "outcome": "ok"}) == 3
    completion = value("ferry_gateway_tenant_tokens_total", {**labels, "kind": "completion"})
    assert completion == sum(a.usage.completion_tokens for a in answers) + 2
    assert value("ferry_gateway_tenant_tokens_total", {**labels, "kind": "prompt"}) > 0
    counted = {s.labels["model"] for m in gw.registry.collect()
               if m.name == "ferry_gateway_tenant_requests" for s in m.samples}
    assert counted == {dep}  # a call to an unknown model (404) is not a model's usage


def test_the_readme_table_documents_every_series() -> None:
    from pathlib import Path

    from streams.front.http_guard import ConnectionGuard
    from streams.front.metrics import GatewayMetrics
    from streams.routing.router import RouterMetrics
    from streams.shadow.comparator import ComparatorMetrics

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    # Names in the table's rows (a vLLM row names its ferry_* twin in its meaning).
    table = {name for line in readme.splitlines() if line.startswith("| `")
             for name in re.findall(r"`([a-z0-9_:]+)`", line)}
    registry = CollectorRegistry()
    WorkerMetrics.create(registry)
    GatewayMetrics.create(registry)
    RouterMetrics(registry)
    ComparatorMetrics(registry)
    ConnectionGuard(lambda: None, registry, header_timeout_s=10.0, max_connections=1024)
    names = {f.name + ("_total" if f.type == "counter" else "") for f in registry.collect()}
    names |= {"ferry_route_weight", "ferry_shadow_percent", "ferry_deployer_deployments",
              "ferry_deployment_status", "ferry_deployer_replica_restarts"}  # built at scrape
    names = {n for n in names if not n.startswith(("process_", "python_"))}
    assert names - table == set(), "not in the README's metrics table"


def test_deployer_metrics_come_from_its_state() -> None:
    from types import SimpleNamespace

    from streams.rollout.metrics import deployer_registry
    from streams.routing.registry import DeploymentRecord

    ready = DeploymentRecord("llm", "step-2", "/s/llm/step-2").moved("ready")
    retired = DeploymentRecord("llm", "step-1", "/s/llm/step-1").moved("retired")
    deployer = SimpleNamespace(model="llm", _mine={r.id: r for r in (ready, retired)},
                               launcher=SimpleNamespace(restarts=lambda d: 2))
    value = deployer_registry(deployer).get_sample_value  # type: ignore[arg-type]
    assert value("ferry_deployer_deployments", {"model": "llm", "status": "ready"}) == 1
    assert value("ferry_deployer_deployments", {"model": "llm", "status": "retired"}) == 1
    assert value("ferry_deployer_deployments", {"model": "llm", "status": "failed"}) == 0
    assert value("ferry_deployment_status", {"deployment": ready.deployment,
                                             "status": "ready"}) == 1
    assert value("ferry_deployment_status", {"deployment": retired.deployment,
                                             "status": "retired"}) is None
    assert value("ferry_deployer_replica_restarts", {"deployment": ready.deployment}) == 2
    assert value("process_cpu_seconds_total") is not None
