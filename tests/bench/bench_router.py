"""Router benchmark: what forwarding through `ferry router` adds, as a `read_committed` reader
of the requests topic (a worker) sees it. No model: the time from posting a request until it
is readable on `ferry.requests.<dep>`.

Paths, taking turns request by request (sequential) and run by run (throughput), so drift
hits them alike:
  (a) direct:   FerryClient -> ferry.requests.<dep>
  (b) router:   FerryClient -> router ingress (API key) -> ferry.requests.<dep>, this tree
  (c) baseline: the same through the router of another source tree (BENCH_ROUTER_BASELINE=DIR,
                e.g. an export of the commit before a router change); left out when unset
Sequential: one request in flight, p50/p99 of BENCH_SEQUENTIAL each. Throughput:
BENCH_BURST requests posted at once, until the last is readable; BENCH_ROUNDS rounds.

Run: `make bench` or `python -m tests.bench.bench_router` (starts its own broker unless
KAFKA_BOOTSTRAP is set). Results go to tests/bench/results/router.json.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer

from edge.topic_admin import ensure_topics
from ferry.broker import free_port
from schemas import Request, requests_topic
from schemas.topics import API_KEY_HEADER
from streams.front.client import FerryClient
from streams.routing.keys import add_key
from tests.bench.common import kafka_and_tmp, pct, write_results

SEQUENTIAL = int(os.environ.get("BENCH_SEQUENTIAL", "100"))
BURST = int(os.environ.get("BENCH_BURST", "2000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
BASELINE = os.environ.get("BENCH_ROUTER_BASELINE")
RESULTS = Path(__file__).parent / "results" / "router.json"


@contextmanager
def router(bootstrap: str, tmp: Path, source: Path) -> Iterator[str]:
    """A `ferry router` process run from `source`'s tree; yields its ingress topic."""
    tag = uuid.uuid4().hex[:8]
    ingress, log = f"ferry.ingress.bench-{tag}", tmp / f"router-{tag}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ferry.cli", "router", "--bootstrap", bootstrap,
             "--app-id", f"ferry-router-bench-{tag}", "--ingress", ingress, "--log-level",
             "INFO", "--metrics-port", str(free_port())], cwd=source, stdout=out,
            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 90
        while "router ready" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)  # polling a log for a condition, with a deadline
        yield ingress
    finally:
        proc.terminate()
        proc.wait(30)


class Arrivals:
    """Resolves a future per request id when it is readable (read_committed) on `topic`."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                         isolation_level="read_committed",
                                         auto_offset_reset="latest", enable_auto_commit=False,
                                         fetch_max_wait_ms=20)
        self.waiting: dict[str, asyncio.Future[float]] = {}
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.consumer.start()
        await self.consumer.seek_to_end()
        for tp in self.consumer.assignment():
            await self.consumer.position(tp)
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            for msgs in (await self.consumer.getmany(timeout_ms=50)).values():
                now = time.perf_counter()
                for m in msgs:
                    future = self.waiting.pop(orjson.loads(m.value)["id"], None)
                    if future is not None and not future.done():
                        future.set_result(now)

    def expect(self, rid: str) -> asyncio.Future[float]:
        future = self.waiting[rid] = asyncio.get_running_loop().create_future()
        return future

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.consumer.stop()


async def run(bootstrap: str, ingresses: dict[str, str | None]) -> list[dict]:
    tag = uuid.uuid4().hex[:8]
    tenant = f"bench-router-{tag}"
    api_key = await add_key(bootstrap, tenant)
    deps = {name: f"bench-router-{i}-{tag}" for i, name in enumerate(ingresses)}
    await ensure_topics(bootstrap, {requests_topic(d): 4 for d in deps.values()})
    arrivals = {name: Arrivals(bootstrap, requests_topic(d)) for name, d in deps.items()}
    for a in arrivals.values():
        await a.start()
    rows = []
    async with FerryClient(bootstrap, reply_to=f"ferry.replies.bench-{tag}") as client:

        async def post(name: str, i: int) -> asyncio.Future[float]:
            request = Request(id=f"{name[:3]}-{uuid.uuid4().hex}", model=deps[name],
                              prompt=f"request {i}", max_new_tokens=16)
            arrived = arrivals[name].expect(request.id)
            ingress = ingresses[name]
            if ingress is None:
                await client.submit(request)
            else:
                await client.submit(request, ingress, key=tenant.encode(),
                                    headers=[(API_KEY_HEADER, api_key.encode())])
            return arrived

        for name in ingresses:  # warm up: topics, metadata, the router's caches
            await asyncio.wait_for(await post(name, -1), 60)
        latencies: dict[str, list[float]] = {name: [] for name in ingresses}
        for i in range(SEQUENTIAL):
            for name in ingresses:
                start = time.perf_counter()
                arrived = await asyncio.wait_for(await post(name, i), 30)
                latencies[name].append((arrived - start) * 1000)
        for name, ms in latencies.items():
            rows.append({"phase": "sequential", "path": name, "requests": len(ms),
                         "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99), "max_ms": max(ms)})
        for round_ in range(ROUNDS):
            for name in ingresses:
                start = time.perf_counter()
                futures = [await post(name, i) for i in range(BURST)]
                posted = time.perf_counter() - start
                done = await asyncio.wait_for(asyncio.gather(*futures), 300)
                wall = max(done) - start
                rows.append({"phase": f"burst {round_ + 1}", "path": name, "requests": BURST,
                             "post_s": posted, "wall_s": wall, "req_per_s": BURST / wall})
    for a in arrivals.values():
        await a.stop()
    return rows


def main() -> None:
    here = Path(__file__).resolve().parents[2]
    with kafka_and_tmp() as (bootstrap, tmp):
        with router(bootstrap, tmp, here) as mine:
            if BASELINE:
                with router(bootstrap, tmp, Path(BASELINE)) as theirs:
                    rows = asyncio.run(run(bootstrap, {"(a) direct": None, "(b) router": mine,
                                                       "(c) baseline": theirs}))
            else:
                rows = asyncio.run(run(bootstrap, {"(a) direct": None, "(b) router": mine}))
    print(f"\n{SEQUENTIAL} sequential, {ROUNDS} x {BURST} burst per path "
          f"({os.cpu_count()} cores; baseline: {BASELINE or 'none'})")
    for row in rows:
        if row["phase"] == "sequential":
            print(f"{row['phase']:<12}{row['path']:<16}p50 {row['p50_ms']:7.1f} ms  "
                  f"p99 {row['p99_ms']:7.1f} ms  max {row['max_ms']:7.1f} ms")
        else:
            print(f"{row['phase']:<12}{row['path']:<16}{row['req_per_s']:8.0f} req/s  "
                  f"(posted in {row['post_s']:.2f}s, all readable after {row['wall_s']:.2f}s)")
    write_results(RESULTS, sequential=SEQUENTIAL, burst=BURST, rounds=ROUNDS,
                  baseline=BASELINE, rows=rows)


if __name__ == "__main__":
    main()
