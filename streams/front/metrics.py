"""The HTTP gateway's metrics, declared against a registry passed in (tests use a fresh one)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edge.metrics_server import BoundedLabel, with_process_metrics
from schemas import Result

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class GatewayMetrics:
    requests: Counter  # labels: route, status, reason (error code, or "ok")
    latency: Histogram  # labels: route; seconds from request read to response sent
    ttft: Histogram  # labels: route; seconds from request read to its first text sent (streams)
    itl: Histogram  # labels: route; seconds between text chunks of a stream
    cancels: Counter  # labels: why; cancels published (caller gone, attempt abandoned)
    in_flight: Gauge
    retries: Counter  # labels: alias; attempts after the first
    rejections: Counter  # labels: reason; refused before reaching a backend
    tenant_requests: Counter  # labels: tenant, model, outcome (ok, or the error code)
    tenant_tokens: Counter  # labels: tenant, model, kind (prompt, completion)
    # Tenants come from API keys ("direct" without auth), models from routes and deployments
    # (unknown ones get 404 before anything is counted); capped besides.
    tenant: BoundedLabel = field(default_factory=BoundedLabel)
    model: BoundedLabel = field(default_factory=BoundedLabel)

    def count_call(self, tenant: str | None, model: str, task: asyncio.Future[Result]) -> None:
        """A finished call's outcome and token usage, per tenant (a done callback: every call,
        streamed, async or not, is counted once, when its one result is known)."""
        if task.cancelled():
            outcome, result = "cancelled", None
        elif task.exception() is not None:
            outcome, result = "internal", None
        else:
            result = task.result()
            outcome = "ok" if result.error is None else result.error.code.value
        labels = (self.tenant(tenant or "direct"), self.model(model))
        self.tenant_requests.labels(*labels, outcome).inc()
        if result is not None:
            self.tenant_tokens.labels(*labels, "prompt").inc(result.usage.prompt_tokens)
            self.tenant_tokens.labels(*labels, "completion").inc(result.usage.completion_tokens)

    @classmethod
    def create(cls, registry: CollectorRegistry) -> GatewayMetrics:
        with_process_metrics(registry)
        return cls(
            requests=Counter("ferry_gateway_requests_total", "HTTP requests answered.",
                             ["route", "status", "reason"], registry=registry),
            latency=Histogram("ferry_gateway_request_latency_seconds",
                              "Time to answer an HTTP request.", ["route"],
                              buckets=LATENCY_BUCKETS, registry=registry),
            ttft=Histogram("ferry_gateway_time_to_first_token_seconds",
                           "Streaming calls: from the request read to its first text sent.",
                           ["route"], buckets=LATENCY_BUCKETS, registry=registry),
            itl=Histogram("ferry_gateway_inter_token_latency_seconds",
                          "Streaming calls: between consecutive text chunks sent.", ["route"],
                          buckets=LATENCY_BUCKETS, registry=registry),
            cancels=Counter("ferry_gateway_cancels_total",
                            "Cancels published for work nobody waits for any more.", ["why"],
                            registry=registry),
            in_flight=Gauge("ferry_gateway_in_flight_requests",
                            "HTTP requests being answered now.", registry=registry),
            retries=Counter("ferry_gateway_retries_total",
                            "Attempts sent to another backend after a timeout or failure.",
                            ["alias"], registry=registry),
            rejections=Counter("ferry_gateway_rejections_total",
                               "Calls refused at the gateway (auth, busy, unknown model).",
                               ["reason"], registry=registry),
            tenant_requests=Counter("ferry_gateway_tenant_requests",
                                    "Calls answered, by tenant, requested model and outcome.",
                                    ["tenant", "model", "outcome"], registry=registry),
            tenant_tokens=Counter("ferry_gateway_tenant_tokens",
                                  "Tokens of answered calls (the worker's count), by tenant, "
                                  "model and kind (prompt, completion).",
                                  ["tenant", "model", "kind"], registry=registry),
        )
