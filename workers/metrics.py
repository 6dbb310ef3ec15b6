"""The worker's Prometheus metrics, bundled against a registry passed in (tests use a fresh one).

Ferry's own series keep the `ferry_` prefix and a `deployment` label. The measurements vLLM
also makes are exported a second time, at scrape time, under vLLM's names with `model_name`
(= the deployment): `vllm:num_requests_running`, `vllm:num_requests_waiting`,
`vllm:kv_cache_usage_perc` (what the Gateway API Inference Extension's endpoint picker
scrapes), the TTFT/TPOT/ITL/e2e/queue-time histograms, token counters and
`vllm:request_success_total{finished_reason}`. They cost nothing per token (one observation,
two names) and a vLLM dashboard or a GIE InferencePool works on Ferry unchanged.
`vllm:num_requests_waiting` is the whole queue: the deployment's Kafka records this worker
owns and has not read yet (sampled every second, `BacklogSampler`) plus what it admitted and
the engine has not started. Summed over a deployment's workers it is the group's backlog.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from edge.metrics_server import with_process_metrics

log = logging.getLogger("ferry.worker")

_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class WorkerMetrics:
    batch_size: Histogram
    queue_wait: Histogram
    inference: Histogram
    engine_step: Histogram
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
    commit_latency: Histogram
    consumer_lag: Gauge
    # deployment -> requests on this worker's partitions not read yet (BacklogSampler)
    unread: dict[str, int] = field(default_factory=dict)

    @classmethod
    def create(cls, registry: CollectorRegistry) -> WorkerMetrics:
        dep = ["deployment"]
        metrics = cls(
            batch_size=Histogram("ferry_batch_size", "Rows that got a token per engine step",
                                 dep, buckets=_BATCH, registry=registry),
            queue_wait=Histogram("ferry_queue_wait_seconds",
                                 "From request creation to its entry into the engine", dep,
                                 buckets=_SECONDS, registry=registry),
            inference=Histogram("ferry_inference_seconds",
                                "Time per engine step as the serve loop sees it (hand-off to "
                                "the engine thread and back included)", dep,
                                buckets=_SECONDS, registry=registry),
            # Beside ferry_inference_seconds: the difference is what the worker's own loop
            # (thread hand-off, the GIL, the event loop's work) costs per step.
            engine_step=Histogram("ferry_engine_step_seconds",
                                  "Engine compute per step, timed in the engine's thread", dep,
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
            commit_latency=Histogram("ferry_commit_latency_seconds",
                                     "Time of one offset commit to the group coordinator", dep,
                                     buckets=_SECONDS, registry=registry),
            consumer_lag=Gauge("ferry_consumer_lag",
                               "Records of an owned request partition not yet committed "
                               "(end offset - committed offset)", [*dep, "partition"],
                               registry=registry),
        )
        registry.register(VllmNames(metrics))
        with_process_metrics(registry)
        return metrics


# Ferry family (as prometheus_client names it: counters without _total) -> vLLM's name.
VLLM_NAMES = {
    "ferry_requests_running": "vllm:num_requests_running",
    "ferry_kv_cache_usage": "vllm:kv_cache_usage_perc",
    "ferry_time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
    "ferry_time_per_output_token_seconds": "vllm:time_per_output_token_seconds",
    "ferry_inter_token_latency_seconds": "vllm:inter_token_latency_seconds",
    "ferry_e2e_request_latency_seconds": "vllm:e2e_request_latency_seconds",
    "ferry_queue_wait_seconds": "vllm:request_queue_time_seconds",
    "ferry_prompt_tokens": "vllm:prompt_tokens",
    "ferry_tokens_generated": "vllm:generation_tokens",
    "ferry_results": "vllm:request_success",
}


def _renamed(family: Metric, name: str) -> Metric:
    """`family` under `name`, with `deployment` called `model_name`; error results are not
    successes (vLLM's request_success counts finished requests by finish reason)."""
    out = Metric(name, family.documentation, family.type, family.unit)
    for s in family.samples:
        if s.labels.get("finished_reason") == "error":
            continue
        labels = {("model_name" if k == "deployment" else k): v for k, v in s.labels.items()}
        out.samples.append(Sample(name + s.name[len(family.name):], labels, s.value,
                                  s.timestamp, s.exemplar))
    return out


class VllmNames(Collector):
    """The worker's series vLLM also has, under vLLM's names, built at scrape time."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics
        self._sources = [metrics.running, metrics.kv_cache_usage, metrics.ttft, metrics.tpot,
                         metrics.itl, metrics.e2e, metrics.queue_wait, metrics.prompt_tokens,
                         metrics.tokens_generated, metrics.results]

    def collect(self) -> Iterator[Metric]:
        for source in self._sources:
            for family in source.collect():
                yield _renamed(family, VLLM_NAMES[family.name])
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Requests waiting: not yet read from this worker's "
            "Kafka partitions, or admitted and not yet started", labels=["model_name"])
        queued = {s.labels["deployment"]: s.value for f in self._metrics.queue_depth.collect()
                  for s in f.samples}
        for dep in sorted(set(queued) | set(self._metrics.unread)):
            waiting.add_metric([dep], queued.get(dep, 0.0) + self._metrics.unread.get(dep, 0))
        yield waiting

    def describe(self) -> Iterable[Metric]:
        return []  # no fixed names to check for collisions: built at scrape time


class BacklogSampler:
    """Every `every_s`: per owned partition, its Kafka lag (end - committed) and how many
    records are not read yet (end - position), for `vllm:num_requests_waiting`."""

    def __init__(self, metrics: WorkerMetrics, deployment: str, every_s: float = 1.0) -> None:
        self.metrics, self.deployment, self.every_s = metrics, deployment, every_s
        self._shown: set[int] = set()  # partitions with a lag series

    async def run(self, consumer: AIOKafkaConsumer) -> None:
        """Never raises: a failed sample (a rebalance, a slow broker) keeps the last values."""
        while True:
            try:
                await asyncio.wait_for(self.sample(consumer), max(5.0, 5 * self.every_s))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("backlog sample failed: %r", exc)
            await asyncio.sleep(self.every_s)

    async def sample(self, consumer: AIOKafkaConsumer) -> None:
        tps = sorted(consumer.assignment(), key=lambda tp: tp.partition)
        ends = await consumer.end_offsets(tps) if tps else {}
        unread, owned = 0, set()
        for tp in tps:
            position, committed = await self._offsets(consumer, tp)
            end = ends.get(tp)
            if end is None or position is None:
                continue
            owned.add(tp.partition)
            unread += max(0, end - position)
            base = committed if committed is not None else position
            self.metrics.consumer_lag.labels(self.deployment, str(tp.partition)).set(
                max(0, end - base))
        for gone in self._shown - owned:
            self.metrics.consumer_lag.remove(self.deployment, str(gone))
        self._shown = owned
        self.metrics.unread[self.deployment] = unread

    @staticmethod
    async def _offsets(consumer: AIOKafkaConsumer, tp: TopicPartition
                       ) -> tuple[int | None, int | None]:
        try:
            return await consumer.position(tp), await consumer.committed(tp)
        except Exception:  # revoked between assignment() and now
            return None, None
