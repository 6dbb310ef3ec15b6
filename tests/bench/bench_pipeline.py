"""Pipeline benchmark: the worker through Kafka against the same engine in-process on the same
requests (all posted at once, the same engine budgets), and against a plain aiokafka
produce-consume round trip with no model.

Run: `make bench` (starts its own broker unless KAFKA_BOOTSTRAP is set). The model is the
tests' tiny Llama unless BENCH_HIDDEN / BENCH_LAYERS ask for a larger one (with the tiny one
Kafka's own cost dominates; with hidden 512 x 8 layers the model does). All modes run side
by side in one process, one after another on the same machine, so their ratios are what to
read (the absolute numbers move with the machine's noise). Results go to
tests/bench/results/pipeline.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CollectorRegistry

from edge.topic_admin import ensure_topics
from models.factory import build_tiny_checkpoint
from schemas import Request
from streams.front.client import FerryClient
from tests.bench.common import kafka_and_tmp, pct, write_results
from workers.config import WorkerConfig
from workers.engine import Engine, EngineRequest, GenerationInput, SamplingParams
from workers.worker import Worker

N_REQUESTS = int(os.environ.get("BENCH_REQUESTS", "96"))
HIDDEN = int(os.environ.get("BENCH_HIDDEN", "64"))
LAYERS = int(os.environ.get("BENCH_LAYERS", "2"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))
MAX_BATCH = 32
MAX_NEW_TOKENS = 16
RESULTS = Path(__file__).parent / "results" / "pipeline.json"
PROMPTS = [f"request number {i} asks the model about topic {i % 7}" for i in range(N_REQUESTS)]


def summary(name: str, latencies: list[float], wall: float) -> dict:
    return {"mode": name, "requests": len(latencies), "req_per_s": len(latencies) / wall,
            "p50_ms": pct(latencies, 50) * 1000, "p99_ms": pct(latencies, 99) * 1000}


def in_process(engine: Engine) -> dict:
    """The same requests added at once to an engine with the worker's budgets; latency = time
    until each one's completion comes out of a step."""
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
    start = time.perf_counter()
    for i, prompt in enumerate(PROMPTS):
        engine.add(EngineRequest(f"r{i}", engine.encode(prompt), params))
    latencies = []
    while engine.has_work():
        latencies += [time.perf_counter() - start] * len(engine.step().finished)
    return summary("in-process engine", latencies, time.perf_counter() - start)


async def burst(client: FerryClient, model: str, topic: str | None = None,
                collect: list | None = None) -> tuple[float, list[float]]:
    """Post every request at once; latency = submit to result (results into `collect`)."""
    sent: dict[str, float] = {}
    futures = []
    start = time.perf_counter()
    for i, prompt in enumerate(PROMPTS):
        rid = f"{model}-{i}-{uuid.uuid4().hex[:6]}"
        sent[rid] = time.perf_counter()
        future = await client.submit(Request(id=rid, model=model, prompt=prompt,
                                             max_new_tokens=MAX_NEW_TOKENS,
                                             batch_key="bench"), topic=topic)
        future.add_done_callback(lambda f, rid=rid: sent.__setitem__(
            rid, time.perf_counter() - sent[rid]))
        futures.append(future)
    results = await asyncio.wait_for(asyncio.gather(*futures), 600)
    wall = time.perf_counter() - start
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    if collect is not None:
        collect.extend(results)
    return wall, list(sent.values())


async def pipeline(bootstrap: str, model_dir: Path, engine: Engine,
                   exactly_once: bool) -> dict:
    dep = f"bench-{uuid.uuid4().hex[:6]}"
    config = WorkerConfig(model_dir=model_dir, deployment=dep, bootstrap=bootstrap,
                          max_num_seqs=MAX_BATCH, exactly_once=exactly_once)
    worker = Worker(config, fresh(engine, config), registry=CollectorRegistry())
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.ready.wait(), 60)
    try:
        async with FerryClient(bootstrap, reply_to=f"{dep}-replies") as client:
            await client.request(Request(id=f"warm-{dep}", model=dep, prompt="warm up"))
            wall, latencies = await burst(client, dep)
            alone = await one_at_a_time(client, dep)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    name = "pipeline, exactly-once" if exactly_once else "pipeline, at-least-once"
    return {**summary(name, latencies, wall), "alone_p50_ms": pct(alone, 50) * 1000}


async def one_at_a_time(client: FerryClient, model: str, n: int = 16) -> list[float]:
    """Latency of a request alone (no queueing): what delivery adds to one answer."""
    latencies = []
    for i in range(n):
        start = time.perf_counter()
        await client.request(Request(id=f"{model}-alone-{i}-{uuid.uuid4().hex[:6]}",
                                     model=model, prompt=PROMPTS[i],
                                     max_new_tokens=MAX_NEW_TOKENS))
        latencies.append(time.perf_counter() - start)
    return latencies


async def echo_round_trip(bootstrap: str) -> dict:
    """A consumer that answers every request at once with a canned result: Kafka's own cost."""
    topic, replies = f"echo-{uuid.uuid4().hex[:6]}", f"echo-replies-{uuid.uuid4().hex[:6]}"
    await ensure_topics(bootstrap, {topic: 4})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2)
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=topic,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await producer.start()
    await consumer.start()

    async def echo() -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=100)
            for msgs in batch.values():
                for msg in msgs:
                    rid = json.loads(msg.value)["id"]
                    body = json.dumps({"id": rid, "model": "echo", "finish_reason": "length"})
                    await producer.send(replies, body.encode(), key=rid.encode())
            if batch:
                await consumer.commit()

    task = asyncio.create_task(echo())
    try:
        async with FerryClient(bootstrap, reply_to=replies) as client:
            wall, latencies = await burst(client, "echo", topic=topic)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await consumer.stop()
        await producer.stop()
    return summary("aiokafka round trip, no model", latencies, wall)


def fresh(engine: Engine, config: WorkerConfig) -> Engine:
    """An engine over the same weights with the worker's budgets and state of its own."""
    return Engine(engine.model, engine.config, engine.tokenizer, engine.device,
                  config.engine_config())


async def run_modes(bootstrap: str, model_dir: Path) -> list[dict]:
    engine = Engine.from_dir(model_dir)
    engine.generate([GenerationInput(engine.encode("warm up"), SamplingParams())])
    config = WorkerConfig(model_dir=model_dir, deployment="bench", bootstrap=bootstrap,
                          max_num_seqs=MAX_BATCH)
    runs: dict[str, list[dict]] = {}
    for _ in range(ROUNDS):  # alternated, so drift on a shared machine hits every mode
        for row in [await pipeline(bootstrap, model_dir, engine, exactly_once=True),
                    await pipeline(bootstrap, model_dir, engine, exactly_once=False),
                    in_process(fresh(engine, config)), await echo_round_trip(bootstrap)]:
            runs.setdefault(row["mode"], []).append(row)
    return [median_row(rows) for rows in runs.values()]


def median_row(rows: list[dict]) -> dict:
    out = dict(rows[0], rounds=len(rows))
    for key in ("req_per_s", "p50_ms", "p99_ms", "alone_p50_ms"):
        if key in out:
            out[key] = statistics.median(r[key] for r in rows)
    return out


def main() -> None:
    with kafka_and_tmp() as (bootstrap, tmp):
        model_dir = build_tiny_checkpoint(tmp / "model", seed=0, hidden_size=HIDDEN,
                                          intermediate_size=HIDDEN * 2,
                                          num_hidden_layers=LAYERS)
        rows = asyncio.run(run_modes(bootstrap, model_dir))
    base = next(r for r in rows if r["mode"] == "pipeline, at-least-once")
    print(f"\n{N_REQUESTS} requests, max_num_seqs={MAX_BATCH}, max_new_tokens={MAX_NEW_TOKENS}, "
          f"Llama hidden {HIDDEN} x {LAYERS} layers on CPU ({os.cpu_count()} cores)\n")
    print(f"{'mode':<32}{'req/s':>9}{'p50 ms':>10}{'p99 ms':>10}"
          f"{'req/s ratio':>13}{'p50 ratio':>11}{'p99 ratio':>11}   (ratios: mode / at-least-once pipeline, medians of {ROUNDS} alternated rounds)")
    for row in rows:
        row["throughput_ratio_vs_pipeline"] = row["req_per_s"] / base["req_per_s"]
        row["p50_ratio_vs_pipeline"] = row["p50_ms"] / base["p50_ms"]
        row["p99_ratio_vs_pipeline"] = row["p99_ms"] / base["p99_ms"]
        print(f"{row['mode']:<32}{row['req_per_s']:>9.1f}{row['p50_ms']:>10.1f}"
              f"{row['p99_ms']:>10.1f}{row['throughput_ratio_vs_pipeline']:>12.2f}x"
              f"{row['p50_ratio_vs_pipeline']:>10.2f}x{row['p99_ratio_vs_pipeline']:>10.2f}x")
    eos = next(r for r in rows if r["mode"] == "pipeline, exactly-once")
    print(f"\none request alone, p50: at-least-once {base['alone_p50_ms']:.1f} ms, exactly-once "
          f"{eos['alone_p50_ms']:.1f} ms (+{eos['alone_p50_ms'] - base['alone_p50_ms']:.1f} ms)")
    write_results(RESULTS, rows=rows, hidden=HIDDEN, layers=LAYERS, rounds=ROUNDS)


if __name__ == "__main__":
    main()
