"""`ferry demo`: the whole pipeline on an embedded default, then everything stopped again.

Starts a local Kafka broker, builds a small Llama checkpoint, starts a worker process for
deployment `tiny`, posts a handful of requests (plus one malformed message, to show the
dead-letter path), prints the results and the worker's metrics, and stops both.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
import urllib.request

from aiokafka import AIOKafkaProducer

from ferry.broker import LocalBroker, ferry_home, free_port
from ferry.client import FerryClient
from schemas import Request, requests_topic

DEPLOYMENT = "tiny"
PROMPTS = ["The ship left the harbour", "Kafka topics are", "Once upon a time",
           "A batch of requests", "Tensor parallel ranks", "The checkpoint was"]


def run_demo(n_requests: int = 8) -> int:
    home = ferry_home() / "demo"
    model_dir = home / "model"
    if not (model_dir / "config.json").exists():
        from workers.model_factory import build_tiny_checkpoint

        build_tiny_checkpoint(model_dir, seed=0)
    broker = LocalBroker(home / "broker", port=free_port())
    shutil.rmtree(broker.data_dir, ignore_errors=True)  # a demo starts from empty topics
    print(f"[demo] starting Kafka {broker.data_dir} ...", flush=True)
    bootstrap = broker.up()
    print(f"[demo] bootstrap={bootstrap}", flush=True)
    metrics_port = free_port()
    worker = subprocess.Popen(
        [sys.executable, "-m", "ferry.cli", "worker", "--model", str(model_dir),
         "--deployment", DEPLOYMENT, "--bootstrap", bootstrap, "--max-batch", "4",
         "--metrics-port", str(metrics_port)])
    try:
        asyncio.run(_traffic(bootstrap, n_requests))
        _print_metrics(metrics_port)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        broker.down()
        print("[demo] worker and broker stopped", flush=True)
    return 0


async def _traffic(bootstrap: str, n: int) -> None:
    async with FerryClient(bootstrap) as client:
        requests = [Request(id=f"demo-{i}", model=DEPLOYMENT, prompt=PROMPTS[i % len(PROMPTS)],
                            max_new_tokens=12, temperature=0.0 if i % 2 == 0 else 0.8, seed=i)
                    for i in range(n)]
        requests.append(Request(id="demo-unknown", model="no-such-model", prompt="hi"))
        start = time.monotonic()
        futures = [await client.submit(r, topic=requests_topic(DEPLOYMENT)) for r in requests]
        await _post_malformed(bootstrap)
        print(f"[demo] posted {len(futures)} requests and 1 malformed message to "
              f"{requests_topic(DEPLOYMENT)}; waiting (the first batch waits for the worker "
              "to load)", flush=True)
        results = await asyncio.wait_for(asyncio.gather(*futures), 180)
        took = time.monotonic() - start
        print(f"\n{'id':<14}{'finish':<8}{'tokens':>7}{'queued ms':>11}{'model ms':>10}  text")
        for r in results:
            text = r.text if r.error is None else f"error {r.error.code.value}: {r.error.message}"
            print(f"{r.id:<14}{r.finish_reason:<8}{r.usage.completion_tokens:>7}"
                  f"{r.timings.queued_ms:>11.0f}{r.timings.inference_ms:>10.0f}  {text!r}")
        print(f"\n[demo] {len(results)} answers in {took:.1f}s; the malformed message went to "
              "ferry.dlq", flush=True)


async def _post_malformed(bootstrap: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(requests_topic(DEPLOYMENT), b'{"id": "demo-bad", "model"')
    finally:
        await producer.stop()


def _print_metrics(port: int) -> None:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    wanted = ("ferry_results_total", "ferry_tokens_generated_total", "ferry_dead_letters_total",
              "ferry_batch_size_count", "ferry_errors_total")
    print("[demo] worker metrics:")
    for line in body.splitlines():
        if line.startswith(wanted):
            print("   ", line)
