"""Front-door benchmark: what the router and the HTTP gateway add on top of posting a request
straight to its deployment topic.

Four paths to the same in-process worker (tiny Llama on CPU, max_batch 8), one after
another in one run on one broker:
  (a) kafka direct:   FerryClient -> ferry.requests.<dep> (the baseline)
  (b) kafka + router: FerryClient -> router ingress (API key, alias) -> ferry.requests.<dep>
  (c) http direct:    aiohttp -> gateway (auth=False) -> ferry.requests.<dep>
  (d) http + router:  aiohttp -> gateway (API key) -> router ingress (alias) -> ferry.requests.<dep>
Two phases: sequential requests (one in flight; the paths take turns request by request, so
drift hits them all alike) for the added latency, then CONCURRENCY clients in a loop for
throughput. "+p50/+p99" are the path's e2e percentiles minus the baseline's from the same
phase; "-model" is e2e minus the Result's `timings.inference_ms`, only for the Kafka paths
(the OpenAI response carries no timings).

The router runs as its own process (`ferry router`), as deployed; the gateways, the worker
and the clients share this process and its event loop. Broker, router, gateway, worker and
clients all share the machine's cores (2 on the dev box), so under load the front door's
CPU comes out of the worker's: read the ratios, not the absolute numbers.

Run: `make bench` (starts its own broker unless KAFKA_BOOTSTRAP is set). Results go to
tests/bench/results/gateway.json.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from ferry.broker import free_port
from models.factory import build_tiny_checkpoint
from schemas import Request
from schemas.topics import API_KEY_HEADER
from streams.front.client import FerryClient
from streams.front.gateway import GatewaySettings, create_app
from streams.routing.keys import add_key
from streams.routing.routes import set_route
from tests.bench.common import kafka_and_tmp, pct, router_process, write_results
from workers.config import WorkerConfig
from workers.engine import Engine, GenerationInput, SamplingParams
from workers.worker import Worker

SEQUENTIAL = int(os.environ.get("BENCH_SEQUENTIAL", "100"))  # per path
CONCURRENT = int(os.environ.get("BENCH_CONCURRENT", "512"))  # per path
CONCURRENCY = 64
MAX_BATCH = 8
MAX_NEW_TOKENS = 16
TIMEOUT_S = 60.0
WARM_UP_S = 60.0
RESULTS = Path(__file__).parent / "results" / "gateway.json"
PROMPTS = [f"request number {i} asks the model about topic {i % 7}" for i in range(64)]

# One call: (e2e seconds, model ms when the path returns a Result, else None).
Call = Callable[[int], Awaitable[tuple[float, float | None]]]


def kafka_call(client: FerryClient, model: str, topic: str | None = None,
               api_key: str | None = None, tenant: str | None = None) -> Call:
    headers = [(API_KEY_HEADER, api_key.encode())] if api_key else None
    key = tenant.encode() if tenant else None

    async def call(i: int) -> tuple[float, float | None]:
        request = Request(id=uuid.uuid4().hex, model=model, prompt=PROMPTS[i % len(PROMPTS)],
                          max_new_tokens=MAX_NEW_TOKENS)
        start = time.perf_counter()
        future = await client.submit(request, topic, key=key, headers=headers)
        result = await asyncio.wait_for(future, TIMEOUT_S)
        elapsed = time.perf_counter() - start
        assert result.error is None, result.error
        return elapsed, result.timings.inference_ms

    return call


def http_call(http: aiohttp.ClientSession, url: str, model: str,
              api_key: str | None = None) -> Call:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def call(i: int) -> tuple[float, float | None]:
        body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": MAX_NEW_TOKENS}
        start = time.perf_counter()
        async with http.post(f"{url}/v1/completions", json=body, headers=headers) as resp:
            answer = await resp.json()
        elapsed = time.perf_counter() - start
        assert resp.status == 200, answer
        return elapsed, None

    return call


async def until_served(name: str, call: Call) -> None:
    """Warm a path up. A fresh key and route take a moment to reach the router and gateway,
    and on a fresh broker a first request can go unanswered, so each try is short."""
    deadline = time.monotonic() + WARM_UP_S
    while True:
        try:
            await asyncio.wait_for(call(0), 5)
            return
        except (AssertionError, asyncio.TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: not served within {WARM_UP_S:g}s: {exc!r}") from exc
            if isinstance(exc, asyncio.TimeoutError):  # odd enough to show; a 401 is expected
                print(f"warm-up: {name}: no answer within 5s, trying again")
            await asyncio.sleep(0.2)


def summary(phase: str, path: str, samples: list[tuple[float, float | None]],
            wall: float) -> dict:
    e2e = [s * 1000 for s, _ in samples]
    row = {"phase": phase, "path": path, "requests": len(e2e), "req_per_s": len(e2e) / wall,
           "p50_ms": pct(e2e, 50), "p99_ms": pct(e2e, 99), "max_ms": max(e2e),
           "p50_minus_model_ms": None, "p99_minus_model_ms": None}
    if all(m is not None for _, m in samples):
        rest = [s * 1000 - m for s, m in samples if m is not None]
        row["p50_minus_model_ms"], row["p99_minus_model_ms"] = pct(rest, 50), pct(rest, 99)
    return row


async def sequential(paths: dict[str, Call]) -> list[dict]:
    samples: dict[str, list[tuple[float, float | None]]] = {name: [] for name in paths}
    walls = dict.fromkeys(paths, 0.0)
    for i in range(SEQUENTIAL):
        for name, call in paths.items():
            start = time.perf_counter()
            samples[name].append(await call(i))
            walls[name] += time.perf_counter() - start
    return [summary("sequential", name, samples[name], walls[name]) for name in paths]


async def concurrent(name: str, call: Call) -> dict:
    samples: list[tuple[float, float | None]] = []
    counter = iter(range(CONCURRENT))

    async def client() -> None:
        for i in counter:  # shared: the clients take the next request number until none is left
            samples.append(await call(i))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return summary(f"{CONCURRENCY} clients", name, samples, time.perf_counter() - start)


async def serve_gateway(bootstrap: str, settings: GatewaySettings) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(create_app(bootstrap, settings, registry=CollectorRegistry()))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def run_paths(bootstrap: str, model_dir: Path, ingress: str) -> list[dict]:
    tag = uuid.uuid4().hex[:8]
    dep, alias, tenant = f"bench-gw-{tag}", f"bench-alias-{tag}", f"bench-tenant-{tag}"
    engine = Engine.from_dir(model_dir)
    engine.generate([GenerationInput(engine.encode("warm up"), SamplingParams())])
    worker = Worker(WorkerConfig(model_dir=model_dir, deployment=dep, bootstrap=bootstrap,
                                 max_num_seqs=MAX_BATCH),
                    engine, registry=CollectorRegistry())
    worker_task = asyncio.create_task(worker.run())
    runners: list[web.AppRunner] = []
    try:
        await asyncio.wait_for(worker.ready.wait(), 60)
        await set_route(bootstrap, alias, {dep: 100})
        api_key = await add_key(bootstrap, tenant)
        direct_gw, direct_url = await serve_gateway(bootstrap, GatewaySettings(auth=False))
        runners.append(direct_gw)
        auth_gw, auth_url = await serve_gateway(bootstrap, GatewaySettings(ingress=ingress))
        runners.append(auth_gw)
        async with FerryClient(bootstrap, reply_to=f"ferry.replies.bench-{tag}") as client, \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            paths = {
                "(a) kafka direct": kafka_call(client, dep),
                "(b) kafka + router": kafka_call(client, alias, ingress, api_key, tenant),
                "(c) http direct": http_call(http, direct_url, dep),
                "(d) http + router": http_call(http, auth_url, alias, api_key),
            }
            for name, call in paths.items():
                await until_served(name, call)
            rows = await sequential(paths)
            rows += [await concurrent(name, call) for name, call in paths.items()]
    finally:
        for runner in runners:
            await runner.cleanup()
        worker_task.cancel()
        await asyncio.gather(worker_task, return_exceptions=True)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Each row against the baseline (a) of its own phase."""
    for row in rows:
        base = next(r for r in rows if r["phase"] == row["phase"] and r["path"].startswith("(a)"))
        row["added_p50_ms"] = row["p50_ms"] - base["p50_ms"]
        row["added_p99_ms"] = row["p99_ms"] - base["p99_ms"]
        row["throughput_ratio_vs_direct"] = row["req_per_s"] / base["req_per_s"]
        row["p50_ratio_vs_direct"] = row["p50_ms"] / base["p50_ms"]
        row["p99_ratio_vs_direct"] = row["p99_ms"] / base["p99_ms"]


def print_table(rows: list[dict]) -> None:
    def ms(value: float | None) -> str:
        return f"{value:>9.1f}" if value is not None else f"{'-':>9}"

    print(f"\n{SEQUENTIAL} sequential + {CONCURRENT} concurrent requests per path, "
          f"{CONCURRENCY} clients, max_batch={MAX_BATCH}, max_new_tokens={MAX_NEW_TOKENS}, "
          f"tiny Llama on CPU ({os.cpu_count()} cores)\n")
    print(f"{'phase':<12}{'path':<20}{'req/s':>8}{'p50':>9}{'p99':>9}{'max':>9}{'+p50':>9}"
          f"{'+p99':>9}{'p50-mdl':>9}{'p99-mdl':>9}{'req/s x':>9}{'p50 x':>8}{'p99 x':>8}")
    for row in rows:
        print(f"{row['phase']:<12}{row['path']:<20}{row['req_per_s']:>8.1f}{ms(row['p50_ms'])}"
              f"{ms(row['p99_ms'])}{ms(row['max_ms'])}{ms(row['added_p50_ms'])}"
              f"{ms(row['added_p99_ms'])}{ms(row['p50_minus_model_ms'])}"
              f"{ms(row['p99_minus_model_ms'])}{row['throughput_ratio_vs_direct']:>8.2f}x"
              f"{row['p50_ratio_vs_direct']:>7.2f}x{row['p99_ratio_vs_direct']:>7.2f}x")
    print("(ms; +p50/+p99: minus (a) in the same phase; -mdl: e2e minus the Result's "
          "inference_ms, Kafka paths only; x: path / (a))")


def main() -> None:
    with kafka_and_tmp() as (bootstrap, tmp):
        model_dir = build_tiny_checkpoint(tmp / "model", seed=0)
        with router_process(bootstrap, tmp) as router:
            rows = asyncio.run(run_paths(bootstrap, model_dir, router.ingress))
    add_ratios(rows)
    print_table(rows)
    write_results(RESULTS, sequential_per_path=SEQUENTIAL, concurrent_per_path=CONCURRENT,
                  concurrency=CONCURRENCY, max_batch=MAX_BATCH, max_new_tokens=MAX_NEW_TOKENS,
                  rows=rows)


if __name__ == "__main__":
    main()
