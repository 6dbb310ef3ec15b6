"""`ferry demo`: the whole pipeline on an embedded default, then everything stopped again.

First a small Llama is trained once on an offline corpus (`ferry train`: a checkpoint every
100 steps; cached under FERRY_HOME/demo/trained, so later runs skip it). Then a local Kafka
broker and a worker process for deployment `tiny` serving the last checkpoint, with a shadow
candidate worker serving the first one; requests are posted straight to its topic (plus one
malformed message, to show the dead-letter path) and the results and the worker's metrics
printed. Then the front door: an API key, a route `chat -> tiny`, 100% shadow traffic to the
candidate, a router process, a comparator process and an HTTP gateway; a few OpenAI-style
chat calls through them, one streamed, one with a bad key, and the shadow report comparing
the two checkpoints. Last, every checkpoint deployed: the training run's checkpoints arrive
in a watched directory one at a time, as a trainer writes them; the deployer deploys each
with its own endpoint and retires the oldest (keep 2), and each one's validation loss, a
sentence's log-likelihood under it and its answer show the later checkpoints answering
better. The processes' logs go to FERRY_HOME/demo/logs; the demo prints its own story.
"""

from __future__ import annotations

import asyncio
import json
import logging
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
from schemas import DLQ_TOPIC, Request, requests_topic
from schemas.topics import shadow_results_topic
from streams.front.client import FerryClient
from streams.shadow.report import format_table, read_comparisons, summarize

DEPLOYMENT = "tiny"  # the training run's last checkpoint
CANDIDATE = "tiny-candidate"  # its first checkpoint, as a shadow candidate
STEPS, EVERY = 300, 100
PROMPTS = ["The ship left the harbour", "Kafka topics are", "Once upon a time",
           "A batch of requests", "Tensor parallel ranks", "The checkpoint was"]


def run_demo(n_requests: int = 8) -> int:
    home = ferry_home() / "demo"
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # one line per call: noise
    trained = _trained(home / "trained")
    broker = LocalBroker(home / "broker", port=free_port())
    shutil.rmtree(broker.data_dir, ignore_errors=True)  # a demo starts from empty topics
    print(f"[demo] starting Kafka {broker.data_dir} ...", flush=True)
    bootstrap = broker.up()
    print(f"[demo] bootstrap={bootstrap}", flush=True)
    metrics_port = free_port()
    processes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> Path:
        log = logs / f"{name}.log"
        with log.open("w") as out:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "ferry.cli", *args, "--bootstrap", bootstrap],
                stdout=out, stderr=subprocess.STDOUT))
        return log

    primary, candidate = trained / f"checkpoint-{STEPS}", trained / f"checkpoint-{EVERY}"
    try:
        start("worker-tiny", "worker", "--model", str(primary), "--deployment", DEPLOYMENT,
              "--metrics-port", str(metrics_port))
        # The candidate loads now, beside the primary: a shadow report that timed its start
        # would compare loading, not serving.
        candidate_log = start("worker-candidate", "worker", "--model", str(candidate),
                              "--deployment", CANDIDATE, "--shadow",
                              "--metrics-port", str(free_port()))
        print(f"[demo] worker {DEPLOYMENT!r} serves {primary.name}, shadow candidate "
              f"{CANDIDATE!r} serves {candidate.name} (logs in {logs})", flush=True)
        asyncio.run(_traffic(bootstrap, n_requests))
        _print_metrics(metrics_port)
        router_log = start("router", "router", "--log-level", "INFO",
                           "--metrics-port", str(free_port()))
        start("comparator", "comparator", "--candidate", CANDIDATE, "--window", "120",
              "--metrics-port", str(free_port()))
        asyncio.run(_front_door(bootstrap, router_log, candidate_log))
        asyncio.run(_checkpoints(bootstrap, home, trained))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)
        broker.down()
        print(f"[demo] workers, router and broker stopped; their logs are in {logs}",
              flush=True)
    return 0


def _trained(run: Path) -> Path:
    """The demo's training run, made once: `ferry train` writes a checkpoint every EVERY
    steps (its COMPLETE marker last, so a run cut short is trained again)."""
    from models.trainer import COMPLETE

    if (run / f"checkpoint-{STEPS}" / COMPLETE).exists():
        print(f"[demo] the small model's checkpoints, trained before: {run}", flush=True)
        return run
    shutil.rmtree(run, ignore_errors=True)
    print(f"[demo] training a small model once ({STEPS} steps, a checkpoint every {EVERY}; "
          f"cached in {run})", flush=True)
    trainer = subprocess.Popen(
        [sys.executable, "-m", "ferry.cli", "train", str(run), "--steps", str(STEPS),
         "--every", str(EVERY)], stdout=subprocess.PIPE, text=True)
    assert trainer.stdout is not None
    for line in trainer.stdout:
        print(f"[train] {line.strip()}", flush=True)
    if trainer.wait() != 0:
        raise RuntimeError(f"training failed (exit {trainer.returncode})")
    return run


def _wait_for_line(log: Path, text: str, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready; see {log}")
        time.sleep(0.2)


async def _front_door(bootstrap: str, router_log: Path, candidate_log: Path) -> None:
    from streams.front.gateway import GatewaySettings, create_app
    from streams.routing.keys import add_key
    from streams.routing.routes import set_route
    from streams.routing.shadows import set_shadow

    api_key = await add_key(bootstrap, "demo", rpm=600, tpm=100_000)
    await set_route(bootstrap, "chat", {DEPLOYMENT: 100})
    await set_shadow(bootstrap, "chat", [CANDIDATE], 100)
    print(f"\n[demo] front door: key for tenant 'demo', route chat -> {DEPLOYMENT}, "
          f"100% shadow to {CANDIDATE}; waiting for the router", flush=True)
    await asyncio.to_thread(_wait_for_line, router_log, "router ready", "the router")
    await asyncio.to_thread(_wait_for_line, candidate_log, "assigned partitions",
                            "the shadow candidate")
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
            ids.append(await _stream_one(http, url, api_key))
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
    print(f"[demo] ferry shadow report {CANDIDATE} (checkpoint-{EVERY} against the primary's "
          f"checkpoint-{STEPS}):")
    print(format_table(summarize(CANDIDATE, records)), flush=True)


async def _stream_one(http: aiohttp.ClientSession, url: str, api_key: str) -> str:
    """One chat call with `stream: true`: its text arrives chunk by chunk, as generated."""
    body = {"model": "chat", "max_tokens": 24, "stream": True,
            "messages": [{"role": "user", "content": PROMPTS[4]}]}
    start, first, pieces, call_id = time.perf_counter(), None, [], ""
    async with http.post(url, json=body, headers={"Authorization": f"Bearer {api_key}"}) as resp:
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            call_id = chunk.get("id", "")
            choices = chunk.get("choices") or [{}]
            if text := choices[0].get("delta", {}).get("content"):
                first = first if first is not None else time.perf_counter() - start
                pieces.append(text)
    total = time.perf_counter() - start
    print(f"[demo] stream: {len(pieces)} text chunks, the first after {1000 * (first or 0):.0f} "
          f"ms, the last after {1000 * total:.0f} ms: {''.join(pieces)!r}", flush=True)
    return call_id


async def _checkpoints(bootstrap: str, home: Path, trained: Path) -> None:
    from models.trainer import COMPLETE
    from streams.front.gateway import GATEWAY, GatewaySettings, create_app
    from streams.rollout.deployer import Deployer, Policy
    from streams.rollout.launchers import LocalLauncher
    from workers.tokenizer import load_tokenizer

    run, store = home / "run", home / "store"
    for directory in (run, store):
        shutil.rmtree(directory, ignore_errors=True)
    run.mkdir(parents=True)
    print(f"\n[demo] every checkpoint deployed: the training run's checkpoints arrive in "
          f"{run} one at a time, as a trainer writes them; the deployer keeps 2", flush=True)

    def arrive(version: str) -> None:
        """Written as `ferry train` writes one: files in place, COMPLETE last."""
        shutil.copytree(trained / version, run / version, ignore=shutil.ignore_patterns(COMPLETE))
        (run / version / COMPLETE).touch()

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
            for step in range(EVERY, STEPS + 1, EVERY):
                version = f"checkpoint-{step}"
                await asyncio.to_thread(arrive, version)
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
        while (first := deployer.record(f"checkpoint-{EVERY}")) and first.status != "retired":
            await asyncio.sleep(0.2)  # keep=2: the oldest drains, then retires
        print("[demo] ferry deployments:")
        for v in range(EVERY, STEPS + 1, EVERY):
            record = deployer.record(f"checkpoint-{v}")
            assert record is not None
            print(f"    {record.id:24} {record.status:8} "
                  f"/v1/models/tinylm/versions/checkpoint-{v}/completions", flush=True)
    finally:
        await runner.cleanup()
        deploying.cancel()
        await asyncio.gather(deploying, return_exceptions=True)


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
              f"ferry.dlq: {await _dead_letter_reason(bootstrap)!r}", flush=True)


async def _dead_letter_reason(bootstrap: str, timeout_s: float = 30.0) -> str:
    consumer = AIOKafkaConsumer(DLQ_TOPIC, bootstrap_servers=bootstrap, **client_options(),
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout_s)
        return str(json.loads(record.value)["reason"])
    finally:
        await consumer.stop()


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
