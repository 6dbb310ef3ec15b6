"""Shadow-traffic benchmark: what mirroring an alias's requests costs its primary.

One broker, one `ferry router` process, one in-process primary worker (tiny Llama on CPU,
max_batch 8); three aliases route to that same primary and differ only in their shadow
setting, so the modes can take turns without waiting for a config change to reach the router:
  (a) off:         no shadow (the baseline)
  (b) 100% + cand: every request also copied to a candidate whose shadow worker runs
                   in-process on the same Engine, answering on ferry.shadow-results.<cand>
  (c) 100% no cand: every request copied to a candidate nobody serves: the router's extra
                   produce, the mirror-topic writes and the primary's ferry.primary-results
                   copies, without any candidate compute
Two phases, each in blocks that rotate the mode order round by round so drift hits all modes
alike: sequential (one request in flight) for latency, then CONCURRENCY clients for
throughput. After a (b) block the bench waits until every shadow result is in, so the
candidate's backlog never lands on the next block; "cand lag" is how long that took after the
block's last primary answer.

(b) is a worst case: the candidate shares the dev box's cores (2) with the primary, the router,
the broker and the clients; on real hardware a candidate has its own accelerator. (c) isolates
what the router and Kafka add for mirroring, apart from that compute contention.

Run: `make bench` (starts its own broker unless KAFKA_BOOTSTRAP is set). Results go to
tests/bench/results/shadow.json.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer
from prometheus_client import CollectorRegistry

from edge.topic_admin import ensure_topics
from models.factory import build_tiny_checkpoint
from schemas import Request, decode
from schemas.topics import (
    API_KEY_HEADER, INGRESS_PARTITIONS, PRIMARY_RESULTS_TOPIC, mirror_topic, shadow_results_topic,
)
from streams.front.client import FerryClient
from streams.routing.keys import add_key
from streams.routing.routes import set_route
from streams.routing.shadows import set_shadow
from tests.bench.common import kafka_and_tmp, pct, router_process, write_results
from tests.harness import RouterProcess
from workers.config import WorkerConfig
from workers.engine import Engine, GenerationInput, SamplingParams
from workers.worker import Worker

SEQUENTIAL = int(os.environ.get("BENCH_SEQUENTIAL", "100"))    # per mode
CONCURRENT = int(os.environ.get("BENCH_CONCURRENT", "512"))   # per mode
ROUNDS = 4  # blocks per mode and phase
CONCURRENCY = 32
MAX_BATCH = 8
MAX_NEW_TOKENS = 16
TIMEOUT_S = 60.0
WARM_UP_S = 60.0
DRAIN_S = 120.0
RESULTS = Path(__file__).parent / "results" / "shadow.json"
PROMPTS = [f"request number {i} asks the model about topic {i % 7}" for i in range(64)]
MODES = ("(a) off", "(b) 100% + cand", "(c) 100% no cand")


@dataclass
class Mode:
    name: str
    alias: str
    samples: list[float] = field(default_factory=list)  # e2e seconds
    model_ms: list[float] = field(default_factory=list)
    wall: float = 0.0
    ids: set[str] = field(default_factory=set)
    lags: list[float] = field(default_factory=list)  # (b): candidate lag per block, seconds


class Watcher:
    """Records when each request id shows up on the shadow-side topics (no consumer group:
    it only reads, never takes records away from the candidate worker)."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        self.consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap,
                                         auto_offset_reset="earliest",
                                         enable_auto_commit=False)
        self.seen: dict[str, dict[str, float]] = {t: {} for t in topics}
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.consumer.start()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=100)
            now = time.perf_counter()
            for tp, records in batch.items():
                for record in records:  # by the value's id: a mirror copy is keyed for batching
                    rid = decode(record.value).get("id") if record.value else None
                    if isinstance(rid, str):
                        self.seen[tp.topic].setdefault(rid, now)

    def count(self, topic: str, ids: set[str]) -> int:
        return len(ids & self.seen[topic].keys())

    async def wait_all(self, topic: str, ids: set[str], timeout: float) -> float:
        """Seconds after which the last of `ids` had arrived, from now (0 if all in)."""
        deadline = time.monotonic() + timeout
        while self.count(topic, ids) < len(ids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{topic}: {self.count(topic, ids)}/{len(ids)} within "
                                   f"{timeout:g}s")
            await asyncio.sleep(0.02)
        return max(self.seen[topic][i] for i in ids)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.consumer.stop()


class Bench:
    def __init__(self, client: FerryClient, ingress: str, api_key: str, tenant: str,
                 candidate: str) -> None:
        self.client, self.ingress = client, ingress
        self.watcher: Watcher | None = None  # started after warm-up: the topics exist by then
        self.headers = [(API_KEY_HEADER, api_key.encode())]
        self.key = tenant.encode()
        self.shadow_results = shadow_results_topic(candidate)

    async def call(self, mode: Mode, i: int) -> tuple[float, float | None]:
        request = Request(id=uuid.uuid4().hex, model=mode.alias, prompt=PROMPTS[i % len(PROMPTS)],
                          max_new_tokens=MAX_NEW_TOKENS)
        mode.ids.add(request.id)
        start = time.perf_counter()
        future = await self.client.submit(request, self.ingress, key=self.key,
                                          headers=self.headers)
        result = await asyncio.wait_for(future, TIMEOUT_S)
        elapsed = time.perf_counter() - start
        assert result.error is None, result.error
        return elapsed, result.timings.inference_ms

    async def block(self, mode: Mode, n: int, clients: int) -> None:
        counter = iter(range(n))
        before = set(mode.ids)

        async def client() -> None:
            for i in counter:  # shared: the clients take the next request number
                elapsed, model_ms = await self.call(mode, i)
                mode.samples.append(elapsed)
                if model_ms is not None:
                    mode.model_ms.append(model_ms)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        end = time.perf_counter()
        mode.wall += end - start
        if mode.name.startswith("(b)"):  # let the candidate catch up before the next block
            assert self.watcher is not None
            last = await self.watcher.wait_all(self.shadow_results, mode.ids - before, DRAIN_S)
            mode.lags.append(max(0.0, last - end))

    async def until_served(self, mode: Mode) -> None:
        """A fresh key and route take a moment to reach the router, and on a fresh broker a
        first request can go unanswered, so each try is short."""
        deadline = time.monotonic() + WARM_UP_S
        while True:
            try:
                await asyncio.wait_for(self.call(mode, 0), 5)
                return
            except (AssertionError, asyncio.TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{mode.name}: not served within {WARM_UP_S:g}s: "
                                       f"{exc!r}") from exc
                await asyncio.sleep(0.2)


def rotations(modes: list[Mode]) -> list[list[Mode]]:
    """Round r starts at mode r: no mode always runs right after (b)'s drained candidate."""
    return [modes[r % len(modes):] + modes[:r % len(modes)] for r in range(ROUNDS)]


def summary(phase: str, mode: Mode) -> dict:
    e2e = [s * 1000 for s in mode.samples]
    return {"phase": phase, "mode": mode.name, "requests": len(e2e),
            "req_per_s": len(e2e) / mode.wall, "p50_ms": pct(e2e, 50), "p99_ms": pct(e2e, 99),
            "max_ms": max(e2e), "model_p50_ms": pct(mode.model_ms, 50) if mode.model_ms else None,
            "candidate_lag_max_ms": max(mode.lags) * 1000 if mode.lags else None}


async def run_modes(bootstrap: str, model_dir: Path, router: RouterProcess) -> dict:
    tag = uuid.uuid4().hex[:8]
    primary, cand, dead = f"bench-sh-{tag}", f"bench-cand-{tag}", f"bench-dead-{tag}"
    tenant = f"bench-tenant-{tag}"
    aliases = [f"bench-{m}-{tag}" for m in ("off", "cand", "dead")]
    engine = Engine.from_dir(model_dir)
    engine.generate([GenerationInput(engine.encode("warm up"), SamplingParams())])
    workers = [Worker(WorkerConfig(model_dir=model_dir, deployment=dep, bootstrap=bootstrap,
                                   max_num_seqs=MAX_BATCH, shadow=shadow),
                      engine, registry=CollectorRegistry())
               for dep, shadow in ((primary, False), (cand, True))]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    watcher: Watcher | None = None
    try:
        await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in workers)), 60)
        for alias in aliases:
            await set_route(bootstrap, alias, {primary: 100})
        await set_shadow(bootstrap, aliases[1], [cand], 100)
        await set_shadow(bootstrap, aliases[2], [dead], 100)
        api_key = await add_key(bootstrap, tenant)
        modes = [Mode(name, alias) for name, alias in zip(MODES, aliases)]
        # As the router would on its first copy; created now so the watcher can subscribe.
        await ensure_topics(bootstrap, {mirror_topic(dead): INGRESS_PARTITIONS})
        async with FerryClient(bootstrap, reply_to=f"ferry.replies.bench-{tag}") as client:
            bench = Bench(client, router.ingress, api_key, tenant, cand)
            watcher = bench.watcher = Watcher(bootstrap, [shadow_results_topic(cand),
                                                          mirror_topic(dead),
                                                          PRIMARY_RESULTS_TOPIC])
            await watcher.start()
            for mode in modes:
                await bench.until_served(mode)
            # The router counts a copy after sending it, maybe after the primary has answered.
            await watcher.wait_all(shadow_results_topic(cand), modes[1].ids, DRAIN_S)
            await watcher.wait_all(mirror_topic(dead), modes[2].ids, 30)
            await asyncio.sleep(0.5)
            mirrored_before = {m.name: router.metric("ferry_router_mirrored_total",
                                                     {"alias": m.alias}) for m in modes}
            for mode in modes:
                mode.ids.clear()
            rows = []
            for phase, total, clients in (("sequential", SEQUENTIAL, 1),
                                          (f"{CONCURRENCY} clients", CONCURRENT, CONCURRENCY)):
                for mode in modes:
                    mode.samples, mode.model_ms, mode.wall, mode.lags = [], [], 0.0, []
                for order in rotations(modes):
                    for mode in order:
                        await bench.block(mode, total // ROUNDS, clients)
                rows += [summary(phase, mode) for mode in modes]
            # (c)'s copies have no reader but the watcher; give the last ones a moment.
            await watcher.wait_all(mirror_topic(dead), modes[2].ids, 30)
            shadow_side = {}
            for mode, topic in ((modes[1], shadow_results_topic(cand)),
                                (modes[2], mirror_topic(dead))):
                await watcher.wait_all(PRIMARY_RESULTS_TOPIC, mode.ids, 30)
                shadow_side[mode.name] = {
                    "requests": len(mode.ids),
                    "arrived_on": topic, "arrived": watcher.count(topic, mode.ids),
                    "primary_results_copies": watcher.count(PRIMARY_RESULTS_TOPIC, mode.ids),
                    "router_mirrored": router.metric("ferry_router_mirrored_total",
                                                     {"alias": mode.alias})
                    - mirrored_before[mode.name]}
            off = modes[0]
            shadow_side[off.name] = {
                "requests": len(off.ids),
                "primary_results_copies": watcher.count(PRIMARY_RESULTS_TOPIC, off.ids),
                "router_mirrored": router.metric("ferry_router_mirrored_total",
                                                 {"alias": off.alias})}
    finally:
        if watcher is not None:
            await watcher.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"rows": rows, "shadow_side": shadow_side}


def add_ratios(rows: list[dict]) -> None:
    """Each row against the baseline (a) of its own phase."""
    for row in rows:
        base = next(r for r in rows if r["phase"] == row["phase"] and r["mode"].startswith("(a)"))
        row["throughput_ratio_vs_off"] = row["req_per_s"] / base["req_per_s"]
        row["p50_ratio_vs_off"] = row["p50_ms"] / base["p50_ms"]
        row["p99_ratio_vs_off"] = row["p99_ms"] / base["p99_ms"]


def print_table(rows: list[dict], shadow_side: dict) -> None:
    def ms(value: float | None) -> str:
        return f"{value:>10.1f}" if value is not None else f"{'-':>10}"

    print(f"\n{SEQUENTIAL} sequential + {CONCURRENT} concurrent requests per mode in {ROUNDS} "
          f"rotated blocks, {CONCURRENCY} clients, max_batch={MAX_BATCH}, "
          f"max_new_tokens={MAX_NEW_TOKENS}, tiny Llama on CPU ({os.cpu_count()} cores shared "
          "by broker, router, primary, candidate and clients)\n")
    print(f"{'phase':<12}{'mode':<18}{'req/s':>8}{'p50':>10}{'p99':>10}{'max':>10}"
          f"{'model p50':>10}{'cand lag':>10}{'req/s x':>9}{'p50 x':>8}{'p99 x':>8}")
    for row in rows:
        print(f"{row['phase']:<12}{row['mode']:<18}{row['req_per_s']:>8.1f}{ms(row['p50_ms'])}"
              f"{ms(row['p99_ms'])}{ms(row['max_ms'])}{ms(row['model_p50_ms'])}"
              f"{ms(row['candidate_lag_max_ms'])}{row['throughput_ratio_vs_off']:>8.2f}x"
              f"{row['p50_ratio_vs_off']:>7.2f}x{row['p99_ratio_vs_off']:>7.2f}x")
    print("(ms; model p50: the primary's inference_ms; cand lag: longest wait, after a (b) "
          "block's last answer, for its last shadow result; x: mode / (a) in the same phase)\n")
    for name, side in shadow_side.items():
        arrived = f", {side['arrived']} on {side['arrived_on']}" if "arrived" in side else ""
        print(f"{name}: {side['requests']} requests, router mirrored "
              f"{side['router_mirrored']:g}{arrived}, {side['primary_results_copies']} "
              "primary-results copies")


def main() -> None:
    with kafka_and_tmp() as (bootstrap, tmp):
        model_dir = build_tiny_checkpoint(tmp / "model", seed=0)
        with router_process(bootstrap, tmp) as router:
            out = asyncio.run(run_modes(bootstrap, model_dir, router))
    add_ratios(out["rows"])
    print_table(out["rows"], out["shadow_side"])
    write_results(RESULTS, sequential_per_mode=SEQUENTIAL, concurrent_per_mode=CONCURRENT,
                  rounds=ROUNDS, concurrency=CONCURRENCY, max_batch=MAX_BATCH,
                  max_new_tokens=MAX_NEW_TOKENS, **out)


if __name__ == "__main__":
    main()
