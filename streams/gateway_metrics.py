"""The HTTP gateway's metrics, declared against a registry passed in (tests use a fresh one)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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

    @classmethod
    def create(cls, registry: CollectorRegistry) -> GatewayMetrics:
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
        )
