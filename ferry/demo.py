"""`ferry demo`: the whole pipeline on an embedded default, then everything stopped again.

Starts a local Kafka broker, builds a small Llama checkpoint, starts a worker process for
deployment `tiny`, posts a handful of requests straight to its topic (plus one malformed
message, to show the dead-letter path) and prints the results and the worker's metrics.
Then the front door: an API key, a route `chat -> tiny`, 100% shadow traffic to a candidate
worker on the same checkpoint, a router process, a comparator process and an HTTP gateway; a
few OpenAI-style chat calls through them, one with a bad key, and the shadow report.
Last, every checkpoint deployed: a tiny trainer writes a checkpoint every 100 steps, the
deployer deploys each one with its own endpoint and retires the oldest (keep 2); each
checkpoint's validation loss, a corpus sentence's log-likelihood under it and its answer show
the later checkpoints answering better.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from edge.kafka_clients import client_options
from ferry.broker import LocalBroker, ferry_home, free_port
from schemas import Request, requests_topic
from schemas.topics import shadow_results_topic
from streams.front.client import FerryClient
from streams.shadow.report import format_table, read_comparisons, summarize

DEPLOYMENT = "tiny"
CANDIDATE = "tiny-candidate"  # the same checkpoint as a shadow candidate
PROMPTS = ["The ship left the harbour", "Kafka topics are", "Once upon a time",
           "A batch of requests", "Tensor parallel ranks", "The checkpoint was"]


def run_demo(n_requests: int = 8) -> int:
    home = ferry_home() / "demo"
    model_dir = home / "model"
    if not (model_dir / "config.json").exists():
        from models.factory import build_tiny_checkpoint

        build_tiny_checkpoint(model_dir, seed=0)
    broker = LocalBroker(home / "broker", port=free_port())
    shutil.rmtree(broker.data_dir, ignore_errors=True)  # a demo starts from empty topics
    print(f"[demo] starting Kafka {broker.data_dir} ...", flush=True)
    bootstrap = broker.up()
    print(f"[demo] bootstrap={bootstrap}", flush=True)
    metrics_port = free_port()
    worker = [sys.executable, "-m", "ferry.cli", "worker", "--model", str(model_dir),
              "--bootstrap", bootstrap]
    processes = [subprocess.Popen(worker + ["--deployment", DEPLOYMENT,
                                            "--metrics-port", str(metrics_port)])]
    try:
        asyncio.run(_traffic(bootstrap, n_requests))
        _print_metrics(metrics_port)
        processes.append(subprocess.Popen(worker + ["--deployment", CANDIDATE, "--shadow",
                                                    "--metrics-port", str(free_port())]))
        router_log = home / "router.log"
        with router_log.open("w") as log:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "ferry.cli", "router", "--bootstrap", bootstrap,
                 "--log-level", "INFO", "--metrics-port", str(free_port())], stdout=log, stderr=subprocess.STDOUT))
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "ferry.cli", "comparator", "--bootstrap", bootstrap,
                 "--candidate", CANDIDATE, "--window", "120",
                 "--metrics-port", str(free_port())], stdout=log,
                stderr=subprocess.STDOUT))
        asyncio.run(_front_door(bootstrap, router_log))
        asyncio.run(_checkpoints(bootstrap, home))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)
        broker.down()
        print("[demo] workers, router and broker stopped", flush=True)
    return 0


async def _front_door(bootstrap: str, router_log: Path) -> None:
    from streams.front.gateway import GatewaySettings, create_app
    from streams.routing.keys import add_key
    from streams.routing.routes import set_route
    from streams.routing.shadows import set_shadow

    api_key = await add_key(bootstrap, "demo", rpm=600, tpm=100_000)
    await set_route(bootstrap, "chat", {DEPLOYMENT: 100})
    await set_shadow(bootstrap, "chat", [CANDIDATE], 100)
    print(f"\n[demo] front door: key for tenant 'demo', route chat -> {DEPLOYMENT}, "
          f"100% shadow to {CANDIDATE}; waiting for the router", flush=True)
    deadline = time.monotonic() + 120
    while "router ready" not in router_log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"router not ready; see {router_log}")
        await asyncio.sleep(0.2)
    runner = web.AppRunner(create_app(bootstrap, GatewaySettings(request_timeout_s=120)))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        async with aiohttp.ClientSession() as http:
            ids = []
            for prompt in PROMPTS[:4]:
                body = {"model": "chat", "max_tokens": 8,
                        "messages": [{"role": "user", "content": prompt}]}
                async with http.post(url, json=body,
                                     headers={"Authorization": f"Bearer {api_key}"}) as resp:
                    answer = await resp.json()
                ids.append(answer["id"])
                print(f"[demo] POST /v1/chat/completions {resp.status} model={answer['model']} "
                      f"{answer['choices'][0]['message']['content']!r}", flush=True)
            await _stream_one(http, url, api_key)
            async with http.post(url, json={"model": "chat", "messages": []},
                                 headers={"Authorization": "Bearer fk_nope"}) as resp:
                print(f"[demo] a bad key: {resp.status} {(await resp.json())['error']['code']}")
    finally:
        await runner.cleanup()
    shadowed = await _count(bootstrap, shadow_results_topic(CANDIDATE), len(ids))
    print(f"[demo] {CANDIDATE} answered {shadowed} of the {len(ids)} chat calls on "
          f"{shadow_results_topic(CANDIDATE)} (never to the caller)", flush=True)
    deadline = time.monotonic() + 60
    while len(records := await read_comparisons(bootstrap, CANDIDATE)) < len(ids):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)  # the comparator pairs, scores, then publishes
    print(f"[demo] ferry shadow report {CANDIDATE} (same checkpoint as the primary):")
    print(format_table(summarize(CANDIDATE, records)), flush=True)


async def _stream_one(http: aiohttp.ClientSession, url: str, api_key: str) -> None:
    """One chat call with `stream: true`: its text arrives chunk by chunk, as generated."""
    body = {"model": "chat", "max_tokens": 24, "stream": True,
            "messages": [{"role": "user", "content": PROMPTS[4]}]}
    start, first, pieces = time.perf_counter(), None, []
    async with http.post(url, json=body, headers={"Authorization": f"Bearer {api_key}"}) as resp:
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if text := choices[0].get("delta", {}).get("content"):
                first = first if first is not None else time.perf_counter() - start
                pieces.append(text)
    total = time.perf_counter() - start
    print(f"[demo] stream: {len(pieces)} text chunks, the first after {1000 * (first or 0):.0f} "
          f"ms, the last after {1000 * total:.0f} ms: {''.join(pieces)!r}", flush=True)


async def _checkpoints(bootstrap: str, home: Path) -> None:
    from streams.front.gateway import GATEWAY, GatewaySettings, create_app
    from streams.rollout.deployer import Deployer, Policy
    from streams.rollout.launchers import LocalLauncher
    from workers.tokenizer import load_tokenizer

    run, store = home / "run", home / "store"
    for directory in (run, store):
        shutil.rmtree(directory, ignore_errors=True)
    run.mkdir(parents=True)
    print(f"\n[demo] every checkpoint deployed: training into {run}, deployer keeps 2",
          flush=True)
    trainer = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ferry.cli", "train", str(run), "--steps", "300", "--every",
        "100", stdout=asyncio.subprocess.PIPE)
    deployer = Deployer(bootstrap, "tinylm", store, LocalLauncher(bootstrap, home / "logs"),
                        Policy(keep=2, settle_s=5.0), watch=run, poll_s=0.5)
    deploying = asyncio.create_task(deployer.run())
    runner = web.AppRunner(create_app(bootstrap, GatewaySettings(auth=False)))
    await runner.setup()
    gateway = runner.app[GATEWAY]
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as http, FerryClient(bootstrap) as client:
            for step in (100, 200, 300):
                version = f"checkpoint-{step}"
                assert trainer.stdout is not None
                line = (await trainer.stdout.readline()).decode().strip()
                print(f"[train] {line}", flush=True)
                while (record := deployer.record(version)) is None or record.status != "ready":
                    if deploying.done():
                        deploying.result()  # the deployer died: say why
                    await asyncio.sleep(0.2)  # the deployer works in the background
                while not gateway.deployments.accepts_new(record.deployment):
                    await asyncio.sleep(0.05)  # the gateway follows the registry within a fetch
                state = json.loads((run / version / "trainer_state.json").read_text())
                tokenizer = load_tokenizer(run / version)
                assert tokenizer is not None
                score = await client.request(Request(
                    id=f"score-{step}", model=record.deployment,
                    input_ids=tokenizer.encode("If the"),
                    score_ids=tokenizer.encode(" argument is omitted, the default is used.",
                                               add_special_tokens=False),  # no bos mid-text
                    max_new_tokens=1))
                url = f"http://127.0.0.1:{port}/v1/models/tinylm/versions/{version}/completions"
                async with http.post(url, json={"prompt": "Return the", "max_tokens": 12}) as r:
                    text = (await r.json())["choices"][0]["text"]
                took = ", ".join(f"{k[:-2]} {v:.2f}s" for k, v in record.durations.items())
                print(f"[demo] tinylm@{version} ready ({took}); val loss {state['val_loss']:.3f},"
                      f" log-likelihood of a docstring {score.score:.2f};"
                      f" 'Return the' -> {text!r}",
                      flush=True)
        while (first := deployer.record("checkpoint-100")) and first.status != "retired":
            await asyncio.sleep(0.2)  # keep=2: the oldest drains, then retires
        print("[demo] ferry deployments:")
        for v in (100, 200, 300):
            record = deployer.record(f"checkpoint-{v}")
            assert record is not None
            print(f"    {record.id:24} {record.status:8} "
                  f"/v1/models/tinylm/versions/checkpoint-{v}/completions", flush=True)
    finally:
        await runner.cleanup()
        deploying.cancel()
        await asyncio.gather(deploying, return_exceptions=True)
        await trainer.wait()


async def _count(bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0) -> int:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, **client_options(),
                                auto_offset_reset="earliest",
                                isolation_level="read_committed")
    await consumer.start()
    seen = 0
    try:
        deadline = time.monotonic() + timeout_s
        while seen < expected and time.monotonic() < deadline:
            seen += sum(map(len, (await consumer.getmany(timeout_ms=500)).values()))
    finally:
        await consumer.stop()
    return seen


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
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **client_options())
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
