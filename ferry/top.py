"""`ferry top`: the running system at a glance, refreshed in place (rich's Live display).

Per deployment: status and replicas (the deployment registry; `static` for a worker group no
deployer manages), replicas reporting metrics, Kafka lag (the worker group's, as the
gateway's busy check reads it), requests/s, tokens/s, TTFT and e2e p99, errors/s. Per alias:
route weights and shadow candidates. Kafka gives the state; rates and latencies come from
two scrapes of the components' /metrics (`--metrics URL`, repeatable; default the local
default ports), so the first frame shows state only.
"""

from __future__ import annotations

import asyncio
import math
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from edge.metrics_server import DEFAULT_PORTS
from streams.routing.backlog import BacklogProbe
from streams.routing.registry import read_registry
from streams.routing.routes import read_routes
from streams.routing.shadows import read_shadows

DEFAULT_METRICS = [f"http://127.0.0.1:{DEFAULT_PORTS[c]}/metrics"
                   for c in ("worker", "router", "gateway")]

# (series, labels) -> value, summed over every scraped endpoint
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Scrape:
    at: float
    samples: Samples
    reporting: dict[str, int] = field(default_factory=dict)  # model_name -> workers reporting
    failed: list[str] = field(default_factory=list)  # endpoints that did not answer


def scrape(urls: Iterable[str], timeout_s: float = 2.0) -> Scrape:
    samples: Samples = defaultdict(float)
    reporting: dict[str, int] = defaultdict(int)
    failed = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as page:
                text = page.read().decode()
        except OSError:
            failed.append(url)
            continue
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith("vllm:") or s.name.startswith("ferry_"):
                    samples[(s.name, tuple(sorted(s.labels.items())))] += s.value
                if s.name == "vllm:num_requests_running":
                    reporting[s.labels.get("model_name", "")] += 1
    return Scrape(time.monotonic(), dict(samples), dict(reporting), failed)


def _by(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for (series, labels), value in samples.items():
        if series == name:
            out[dict(labels).get(label, "")] += value
    return out


def rate(new: Scrape, old: Scrape | None, name: str, label: str) -> dict[str, float]:
    """Per second between two scrapes, by label (a restarted counter counts from 0)."""
    if old is None or new.at <= old.at:
        return {}
    before = _by(old.samples, name, label)
    return {k: max(0.0, v - before.get(k, 0.0)) / (new.at - old.at)
            for k, v in _by(new.samples, name, label).items()}


def p99(new: Scrape, old: Scrape | None, histogram: str, label: str = "model_name"
        ) -> dict[str, float]:
    """The 0.99 quantile of what was observed between two scrapes, as Prometheus'
    histogram_quantile interpolates within a bucket."""
    if old is None:
        return {}
    buckets: dict[str, dict[float, float]] = defaultdict(dict)
    for scrape_, sign in ((new, 1.0), (old, -1.0)):
        for (series, labels), value in scrape_.samples.items():
            if series == f"{histogram}_bucket":
                d = dict(labels)
                le = float(d["le"])
                key = d.get(label, "")
                buckets[key][le] = buckets[key].get(le, 0.0) + sign * value
    out = {}
    for key, counts in buckets.items():
        bounds = sorted(counts)
        total = counts[bounds[-1]] if bounds else 0.0
        if total <= 0:
            continue
        rank, lower, below = 0.99 * total, 0.0, 0.0
        for bound in bounds:
            if counts[bound] >= rank:
                if math.isinf(bound):
                    out[key] = lower  # past the last finite bucket: its upper bound
                else:
                    share = (rank - below) / max(counts[bound] - below, 1e-12)
                    out[key] = lower + (bound - lower) * share
                break
            lower, below = bound, counts[bound]
    return out


@dataclass
class Frame:
    deployments: Table
    aliases: Table
    note: str


async def frame(bootstrap: str, probe: BacklogProbe, new: Scrape, old: Scrape | None) -> Frame:
    records = {r.deployment: r for r in await read_registry(bootstrap)}
    routes = await read_routes(bootstrap)
    shadows = await read_shadows(bootstrap)
    names = set(records) | {d for r in routes.values() for d in r.weights} | set(new.reporting)
    names |= {c for s in shadows.values() for c in s.candidates}
    rps = rate(new, old, "vllm:request_success_total", "model_name")
    tps = rate(new, old, "vllm:generation_tokens_total", "model_name")
    errors = rate(new, old, "ferry_errors_total", "deployment")
    ttft = p99(new, old, "vllm:time_to_first_token_seconds")
    e2e = p99(new, old, "vllm:e2e_request_latency_seconds")

    deployments = Table(title="deployments", expand=True)
    for column in ("deployment", "status", "replicas", "reporting", "lag", "req/s", "tok/s",
                   "TTFT p99", "e2e p99", "err/s"):
        deployments.add_column(column, justify="left" if column in ("deployment", "status")
                               else "right")
    shown = sorted(n for n in names if n not in records or records[n].status != "retired")
    lags = await asyncio.gather(*(probe.sample(n) for n in shown))
    for name, sample in zip(shown, lags):
        record, lag = records.get(name), sample.lag
        deployments.add_row(
            name, record.status if record else "static",
            str(record.replicas) if record else "-", str(new.reporting.get(name, 0)), str(lag),
            _num(rps.get(name)), _num(tps.get(name)), _secs(ttft.get(name)),
            _secs(e2e.get(name)), _num(errors.get(name)))

    aliases = Table(title="aliases", expand=True)
    for column in ("alias", "weights", "shadow"):
        aliases.add_column(column)
    for alias in sorted(set(routes) | set(shadows)):
        weights = routes[alias].weights if alias in routes else {}
        shadow = shadows.get(alias)
        aliases.add_row(alias, " ".join(f"{d}={w}" for d, w in sorted(weights.items())) or "-",
                        f"{', '.join(shadow.candidates)} @ {shadow.percent:g}%" if shadow
                        else "-")
    note = time.strftime("%H:%M:%S") + (f"  no metrics from: {', '.join(new.failed)}"
                                        if new.failed else "")
    if old is None:
        note += "  (rates from the next refresh)"
    return Frame(deployments, aliases, note)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def render(f: Frame) -> Group:
    return Group(f.deployments, f.aliases, f.note)


async def run_top(bootstrap: str, urls: list[str], interval_s: float = 2.0, once: bool = False,
                  console: Console | None = None) -> None:
    console = console or Console()
    probe = BacklogProbe(bootstrap)
    await probe.start()
    try:
        old: Scrape | None = None
        new = await asyncio.to_thread(scrape, urls)
        if once:  # two scrapes a moment apart, so rates are there
            await asyncio.sleep(min(interval_s, 1.0))
            old, new = new, await asyncio.to_thread(scrape, urls)
            console.print(render(await frame(bootstrap, probe, new, old)))
            return
        with Live(render(await frame(bootstrap, probe, new, old)), console=console,
                  refresh_per_second=4, screen=False) as live:
            while True:
                await asyncio.sleep(interval_s)
                old, new = new, await asyncio.to_thread(scrape, urls)
                live.update(render(await frame(bootstrap, probe, new, old)))
    finally:
        await probe.close()
