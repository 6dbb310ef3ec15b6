"""Ferry's Grafana dashboards as code, built with Grafana's Foundation SDK.

    .venv/bin/python compose/grafana/dashboards.py   # rewrites compose/grafana/dashboards/*.json

The JSON is committed (Grafana's file provisioning reads it); tests/test_dashboards.py fails
when it drifts from this file, and tests/test_prometheus.py runs every query below against a
real Prometheus scraping a running stack. Series named `vllm:*` are vLLM's (Ferry's workers
export them with `model_name` = deployment); `ferry_*` are Ferry's own (README: Metrics).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="prometheus")  # provisioning's uid


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: Literal["timeseries", "stat", "table"] = "timeseries"
    description: str = ""
    width: int = 8


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Board:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]


def _p(q: float, metric: str, by: str, window: str = "1m") -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket[{window}])))"


def _quantiles(metric: str, by: str = "model_name") -> tuple[Query, ...]:
    return (Query(_p(0.5, metric, by), f"p50 {{{{{by}}}}}"),
            Query(_p(0.99, metric, by), f"p99 {{{{{by}}}}}"))


OVERVIEW = Board("ferry-overview", "Ferry: overview", "Traffic, latency, queue and errors of "
                 "every deployment", (
    Row("Traffic", (
        Panel("Requests/s by model", (
            Query("sum by (model_name) (rate(vllm:request_success_total[1m]))", "{{model_name}}"),
        ), "reqps"),
        Panel("Tokens/s by model", (
            Query("sum by (model_name) (rate(vllm:generation_tokens_total[1m]))",
                  "generated {{model_name}}"),
            Query("sum by (model_name) (rate(vllm:prompt_tokens_total[1m]))",
                  "prompt {{model_name}}"),
        ), "short"),
        Panel("Gateway answers/s by status", (
            Query("sum by (status) (rate(ferry_gateway_requests_total[1m]))", "{{status}}"),
        ), "reqps"),
    )),
    Row("Latency", (
        Panel("Time to first token", _quantiles("vllm:time_to_first_token_seconds"), "s"),
        Panel("Time per output token", _quantiles("vllm:time_per_output_token_seconds"), "s"),
        Panel("End-to-end request latency", _quantiles("vllm:e2e_request_latency_seconds"), "s"),
        Panel("Gateway latency by route", _quantiles(
            "ferry_gateway_request_latency_seconds", "route"), "s"),
        Panel("Queue time (created to engine)", _quantiles(
            "vllm:request_queue_time_seconds"), "s"),
        Panel("Offset commit latency", _quantiles("ferry_commit_latency_seconds", "deployment"),
              "s"),
    )),
    Row("Queue and engine", (
        Panel("Requests waiting (Kafka backlog + admitted) and running", (
            Query("sum by (model_name) (vllm:num_requests_waiting)", "waiting {{model_name}}"),
            Query("sum by (model_name) (vllm:num_requests_running)", "running {{model_name}}"),
        )),
        Panel("Kafka lag by partition (end - committed)", (
            Query("sum by (deployment, partition) (ferry_consumer_lag)",
                  "{{deployment}}[{{partition}}]"),
        )),
        Panel("Batch size (rows per engine step)", (
            Query("sum by (deployment) (rate(ferry_batch_size_sum[1m])) / "
                  "sum by (deployment) (rate(ferry_batch_size_count[1m]))", "{{deployment}}"),
        )),
        Panel("KV cache usage", (
            Query("max by (model_name) (vllm:kv_cache_usage_perc)", "{{model_name}}"),
        ), "percentunit"),
        Panel("Worker replicas reporting", (
            Query("count by (model_name) (vllm:num_requests_running)", "{{model_name}}"),
        ), kind="stat"),
    )),
    Row("Errors", (
        Panel("Worker errors by code", (
            Query("sum by (deployment, code) (increase(ferry_errors_total[5m]))",
                  "{{deployment}} {{code}}"),
        )),
        Panel("Gateway errors by reason", (
            Query('sum by (reason) (increase(ferry_gateway_requests_total{status=~"4..|5.."}'
                  '[5m]))', "{{reason}}"),
        )),
        Panel("Dead letters (worker: by bad field; router: by refusal)", (
            Query("sum by (deployment, field) (increase(ferry_dead_letters_total[5m]))",
                  "worker {{deployment}} {{field}}"),
            Query("sum by (reason) (increase(ferry_router_rejected_total[5m]))",
                  "router {{reason}}"),
        )),
    )),
    Row("Processes", (
        Panel("CPU by component", (
            Query("sum by (job) (rate(process_cpu_seconds_total[1m]))", "{{job}}"),
        ), "percentunit"),
        Panel("Resident memory by component", (
            Query("sum by (job) (process_resident_memory_bytes)", "{{job}}"),
        ), "bytes"),
    )),
))

ROLLOUT = Board("ferry-rollout", "Ferry: rollout", "Routes, canary shares and how each "
                "deployment of an alias is doing", (
    Row("Routes", (
        Panel("Route weights", (
            Query("sum by (alias, deployment) (ferry_route_weight)", "{{alias}} -> {{deployment}}"),
        ), width=12),
        Panel("Canary step: share of each alias's traffic", (
            Query("sum by (alias, deployment) (ferry_route_weight) / on (alias) group_left "
                  "sum by (alias) (ferry_route_weight)", "{{alias}} -> {{deployment}}"),
        ), "percentunit", width=12),
    )),
    Row("Per deployment", (
        Panel("Routed requests/s", (
            Query("sum by (alias, deployment) (rate(ferry_router_routed_total[1m]))",
                  "{{alias}} -> {{deployment}}"),
        ), "reqps"),
        Panel("Error rate", (
            Query("sum by (deployment) (rate(ferry_errors_total[5m])) / "
                  "sum by (deployment) (rate(ferry_results_total[5m]))", "{{deployment}}"),
        ), "percentunit"),
        Panel("End-to-end p99", (
            Query(_p(0.99, "vllm:e2e_request_latency_seconds", "model_name", "5m"),
                  "{{model_name}}"),
        ), "s"),
    )),
))

SHADOW = Board("ferry-shadow", "Ferry: shadow", "Shadow candidates against their primaries "
               "(the comparator's stats window)", (
    Row("Agreement", (
        Panel("Exact match rate and token overlap", (
            Query("max by (candidate) (ferry_shadow_exact_match_rate)", "exact {{candidate}}"),
            Query("max by (candidate) (ferry_shadow_overlap_mean)", "overlap {{candidate}}"),
        ), "percentunit"),
        Panel("Candidate log-likelihood of the primary's tokens (per token)", (
            Query("max by (candidate) (ferry_shadow_logprob_mean)", "{{candidate}}"),
        )),
        Panel("Pairs compared (window) and mirrored/s", (
            Query("max by (candidate) (ferry_shadow_window_pairs)", "pairs {{candidate}}"),
            Query("sum by (candidate) (rate(ferry_router_mirrored_total[1m]))",
                  "mirrored/s {{candidate}}"),
        )),
    )),
    Row("Both sides", (
        Panel("Latency p50/p99, primary vs candidate", (
            Query("max by (candidate, side, quantile) (ferry_shadow_latency_ms)",
                  "{{side}} p{{quantile}} {{candidate}}"),
        ), "ms", width=12),
        Panel("Error rate, primary vs candidate", (
            Query("max by (candidate, side) (ferry_shadow_error_rate)", "{{side}} {{candidate}}"),
        ), "percentunit", width=12),
    )),
))

TENANTS = Board("ferry-tenants", "Ferry: per-tenant usage", "Calls and tokens by tenant (from "
                "API keys) for usage and billing", (
    Row("Usage", (
        Panel("Calls/s by tenant and outcome", (
            Query("sum by (tenant, outcome) (rate(ferry_gateway_tenant_requests_total[1m]))",
                  "{{tenant}} {{outcome}}"),
        ), "reqps", width=12),
        Panel("Tokens/s by tenant", (
            Query("sum by (tenant, kind) (rate(ferry_gateway_tenant_tokens_total[1m]))",
                  "{{tenant}} {{kind}}"),
        ), width=12),
        Panel("Tokens in the last hour by tenant and model", (
            Query("sum by (tenant, model, kind) (increase(ferry_gateway_tenant_tokens_total[1h]))",
                  "{{tenant}} {{model}} {{kind}}"),
        ), kind="table", width=12),
        Panel("Quota: charged tokens/s and refusals by tenant", (
            Query("sum by (tenant) (rate(ferry_router_tenant_charged_tokens_total[1m]))",
                  "charged {{tenant}}"),
            Query("sum by (tenant, reason) (increase(ferry_router_tenant_rejected_total[5m]))",
                  "refused {{tenant}} {{reason}}"),
        ), width=12),
    )),
))

BOARDS = (OVERVIEW, ROLLOUT, SHADOW, TENANTS)


def queries() -> list[str]:
    """Every PromQL expression of every dashboard."""
    return [q.expr for b in BOARDS for r in b.rows for p in r.panels for q in p.queries]


def _panel(panel: Panel, panel_id: int) -> Any:
    builder = {"timeseries": timeseries.Panel, "stat": stat.Panel, "table": table.Panel}[
        panel.kind]()
    builder = (builder.id(panel_id).title(panel.title).datasource(DATASOURCE).unit(panel.unit)
               .height(8).span(panel.width))
    if panel.description:
        builder = builder.description(panel.description)
    for i, query in enumerate(panel.queries):
        target = prometheus.Dataquery().expr(query.expr).ref_id(chr(ord("A") + i))
        if query.legend:
            target = target.legend_format(query.legend)
        if panel.kind == "table":
            target = target.instant().format("table")
        builder = builder.with_target(target)
    return builder


def build(board: Board) -> dict[str, Any]:
    builder = (dashboard.Dashboard(board.title).uid(board.uid).description(board.description)
               .tags(["ferry"]).refresh("10s").time("now-1h", "now").editable()
               .timezone("browser"))
    panel_id = 0
    for row in board.rows:
        panel_id += 1
        builder = builder.with_row(dashboard.Row(row.title).id(panel_id))
        for panel in row.panels:
            panel_id += 1
            builder = builder.with_panel(_panel(panel, panel_id))
    return _pruned(json.loads(JSONEncoder().encode(builder.build())))


def _pruned(value: Any) -> Any:
    """Without nulls: Grafana fills in what a panel leaves out."""
    if isinstance(value, dict):
        return {k: _pruned(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value


def render() -> dict[str, str]:
    """File name -> JSON text, as committed."""
    return {f"{b.uid}.json": json.dumps(build(b), indent=2, sort_keys=True) + "\n"
            for b in BOARDS}


def main() -> int:
    OUT.mkdir(exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(OUT / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
