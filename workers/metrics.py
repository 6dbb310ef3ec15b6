"""The worker's Prometheus metrics, bundled against a registry passed in (tests use a fresh one)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class WorkerMetrics:
    batch_size: Histogram
    queue_wait: Histogram
    inference: Histogram
    tokens_generated: Counter
    prompt_tokens: Counter
    results: Counter
    errors: Counter
    dead_letters: Counter
    queue_depth: Gauge
    running: Gauge
    kv_cache_usage: Gauge
    ttft: Histogram
    tpot: Histogram
    itl: Histogram
    e2e: Histogram
    cancelled: Counter
    deltas: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> WorkerMetrics:
        dep = ["deployment"]
        return cls(
            batch_size=Histogram("ferry_batch_size", "Rows that got a token per engine step",
                                 dep, buckets=_BATCH, registry=registry),
            queue_wait=Histogram("ferry_queue_wait_seconds",
                                 "From request creation to its entry into the engine", dep,
                                 buckets=_SECONDS, registry=registry),
            inference=Histogram("ferry_inference_seconds", "Time per engine step", dep,
                                buckets=_SECONDS, registry=registry),
            tokens_generated=Counter("ferry_tokens_generated_total", "Completion tokens", dep,
                                     registry=registry),
            prompt_tokens=Counter("ferry_prompt_tokens_total", "Prompt tokens processed", dep,
                                  registry=registry),
            results=Counter("ferry_results_total", "Results published, by finish reason",
                            [*dep, "finished_reason"], registry=registry),
            errors=Counter("ferry_errors_total", "Error results published, by code",
                           [*dep, "code"], registry=registry),
            dead_letters=Counter("ferry_dead_letters_total", "Messages sent to the DLQ",
                                 [*dep, "field"], registry=registry),
            queue_depth=Gauge("ferry_queue_depth", "Requests admitted, waiting for the engine",
                              dep, registry=registry),
            running=Gauge("ferry_requests_running", "Requests the engine is decoding", dep,
                          registry=registry),
            kv_cache_usage=Gauge("ferry_kv_cache_usage", "Fraction of KV cache blocks in use",
                                 dep, registry=registry),
            ttft=Histogram("ferry_time_to_first_token_seconds",
                           "From request creation to its first generated token", dep,
                           buckets=_SECONDS, registry=registry),
            tpot=Histogram("ferry_time_per_output_token_seconds",
                           "Per request: from its first token to its last, per later token",
                           dep, buckets=_SECONDS, registry=registry),
            itl=Histogram("ferry_inter_token_latency_seconds",
                          "Between consecutive tokens of a request", dep, buckets=_SECONDS,
                          registry=registry),
            e2e=Histogram("ferry_e2e_request_latency_seconds",
                          "From request creation to its result", dep, buckets=_SECONDS,
                          registry=registry),
            cancelled=Counter("ferry_requests_cancelled_total",
                              "Requests dropped by a cancel record", dep, registry=registry),
            deltas=Counter("ferry_deltas_total", "Token delta records published", dep,
                           registry=registry),
        )
