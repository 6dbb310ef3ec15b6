"""Metrics overhead: a worker through Kafka with its metrics on (every series observed, served
on a port, scraped every 0.5 s: thirty times Prometheus's default rate) against the same
worker with every instrument a no-op and nothing served, rounds alternated on the same
engine weights in one process. Reads generated tokens/s; the ratio on/off is what to read.
On a busy shared machine rounds swing far more than the metrics cost, so it also measures
the instruments apart: one observation and one scrape against the worker's mean step.

Run: `.venv/bin/python -m tests.bench.bench_metrics` (BENCH_HIDDEN, BENCH_LAYERS,
BENCH_REQUESTS, BENCH_ROUNDS as in the pipeline benchmark). Results:
tests/bench/results/metrics.json.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import statistics
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from ferry.broker import free_port
from models.factory import build_tiny_checkpoint
from schemas import Request
from streams.front.client import FerryClient
from tests.bench.bench_pipeline import HIDDEN, LAYERS, MAX_BATCH, burst, fresh
from tests.bench.common import kafka_and_tmp, write_results
from workers.config import WorkerConfig
from workers.engine import Engine, GenerationInput, SamplingParams
from workers.metrics import WorkerMetrics
from workers.worker import Worker

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
RESULTS = Path(__file__).parent / "results" / "metrics.json"


class _Null:
    """Any instrument, doing nothing."""

    def labels(self, *_: Any) -> _Null:
        return self

    def inc(self, *_: Any) -> None: ...
    def observe(self, *_: Any) -> None: ...
    def set(self, *_: Any) -> None: ...
    def remove(self, *_: Any) -> None: ...

    def time(self) -> _Null:
        return self

    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *_: Any) -> None: ...


def null_metrics() -> WorkerMetrics:
    names = [f.name for f in dataclasses.fields(WorkerMetrics) if f.name != "unread"]
    return WorkerMetrics(**{n: _Null() for n in names})  # type: ignore[arg-type]


def _scrape(url: str, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        urllib.request.urlopen(url, timeout=5).read()


async def one_round(bootstrap: str, model_dir: Path, engine: Engine, metrics_on: bool,
                    keep: list[Worker] | None = None) -> float:
    dep = f"bench-metrics-{uuid.uuid4().hex[:6]}"
    port = free_port() if metrics_on else None
    config = WorkerConfig(model_dir=model_dir, deployment=dep, bootstrap=bootstrap,
                          max_num_seqs=MAX_BATCH, metrics_port=port)
    worker = Worker(config, fresh(engine, config), registry=CollectorRegistry())
    if not metrics_on:
        worker.metrics = null_metrics()
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.ready.wait(), 60)
    stop = threading.Event()
    if port is not None:
        threading.Thread(target=_scrape, args=(f"http://127.0.0.1:{port}/metrics", stop),
                         daemon=True).start()
    try:
        async with FerryClient(bootstrap, reply_to=f"{dep}-replies") as client:
            await client.request(Request(id=f"warm-{dep}", model=dep, prompt="warm up"))
            results: list[Any] = []
            wall, _ = await burst(client, dep, collect=results)
    finally:
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    if keep is not None:
        keep.append(worker)
    return sum(r.usage.completion_tokens for r in results) / wall


def costs(worker: Worker) -> dict[str, float]:
    """What the instruments cost against what a step costs, measured apart from the noise of
    a shared machine: one observation, one scrape, and the worker's mean step."""
    dep = worker.config.deployment
    histogram = worker.metrics.itl.labels(dep)
    n = 200_000
    start = time.perf_counter()
    for _ in range(n):
        worker.metrics.itl.labels(dep).observe(0.01)
    labelled_us = (time.perf_counter() - start) / n * 1e6
    start = time.perf_counter()
    for _ in range(n):
        histogram.observe(0.01)
    observe_us = (time.perf_counter() - start) / n * 1e6
    start = time.perf_counter()
    for _ in range(20):
        generate_latest(worker.registry)
    scrape_ms = (time.perf_counter() - start) / 20 * 1e3
    value = worker.registry.get_sample_value
    steps = value("ferry_inference_seconds_count", {"deployment": dep})
    step_ms = value("ferry_inference_seconds_sum", {"deployment": dep}) / steps * 1e3
    rows = value("ferry_batch_size_sum", {"deployment": dep}) / steps
    requests = value("ferry_e2e_request_latency_seconds_count", {"deployment": dep})
    # Per step: a token timing per row, step time, batch size, three gauges; per finished
    # request: tokens, prompt tokens, queue wait, e2e, TPOT, result (+ the publisher's).
    per_step = rows + 5 + 7 * requests / steps
    estimated = 1 - per_step * labelled_us / 1e3 / step_ms - scrape_ms / 15_000
    return {"labels_observe_us": labelled_us, "observe_us": observe_us,
            "scrape_ms": scrape_ms, "mean_step_ms": step_ms, "rows_per_step": rows,
            "observations_per_step": per_step,
            "estimated_ratio_on_off_15s_scrapes": estimated}


async def run(bootstrap: str, model_dir: Path) -> dict[str, Any]:
    engine = Engine.from_dir(model_dir)
    engine.generate([GenerationInput(engine.encode("warm up"), SamplingParams())])
    on, off, kept = [], [], []
    for i in range(ROUNDS):  # alternated, the order flipped every round
        for metrics_on in ((True, False) if i % 2 == 0 else (False, True)):
            tps = await one_round(bootstrap, model_dir, engine, metrics_on,
                                  kept if metrics_on else None)
            (on if metrics_on else off).append(tps)
            print(f"round {i} metrics {'on ' if metrics_on else 'off'}: {tps:8.1f} tokens/s",
                  flush=True)
    return {"tokens_per_s_on": on, "tokens_per_s_off": off,
            "ratio_on_off": statistics.median(on) / statistics.median(off),
            **costs(kept[-1])}


def main() -> None:
    with kafka_and_tmp() as (bootstrap, tmp):
        model_dir = build_tiny_checkpoint(tmp / "model", seed=0, hidden_size=HIDDEN,
                                          intermediate_size=HIDDEN * 2,
                                          num_hidden_layers=LAYERS)
        row = asyncio.run(run(bootstrap, model_dir))
    print(f"\nmetrics on / off, median tokens/s over {ROUNDS} rounds: "
          f"{row['ratio_on_off']:.3f}  (Llama hidden {HIDDEN} x {LAYERS} layers)")
    print(f"one labels().observe() {row['labels_observe_us']:.2f} us, a scrape "
          f"{row['scrape_ms']:.1f} ms; a step {row['mean_step_ms']:.1f} ms with "
          f"{row['observations_per_step']:.0f} observations: estimated ratio "
          f"{row['estimated_ratio_on_off_15s_scrapes']:.4f} (15 s scrapes)")
    write_results(RESULTS, rows=[row], hidden=HIDDEN, layers=LAYERS)


if __name__ == "__main__":
    main()
