"""`ferry top`: state from Kafka, rates and p99s from two scrapes of the components' metrics."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from rich.console import Console

from ferry.broker import free_port
from ferry.top import Scrape, p99, rate, run_top
from schemas import Request
from streams.routing.routes import set_route
from streams.routing.shadows import set_shadow
from tests.conftest import wait_for


def _scrape(at: float, total: float, buckets: dict[str, float]) -> Scrape:
    samples = {("total", (("model_name", "m"),)): total}
    for le, count in buckets.items():
        samples[("h_bucket", (("le", le), ("model_name", "m")))] = count
    return Scrape(at, samples)


def test_rates_and_p99_from_two_scrapes() -> None:
    old = _scrape(0.0, 10, {"0.1": 5, "1.0": 5, "+Inf": 5})
    new = _scrape(2.0, 30, {"0.1": 55, "1.0": 105, "+Inf": 105})
    assert rate(new, old, "total", "model_name") == {"m": 10.0}
    assert rate(new, None, "total", "model_name") == {}
    # 100 observations between the scrapes, 50 in (0, 0.1], 50 in (0.1, 1]: rank 99 lies
    # 49/50 of the way into the second bucket (Prometheus' interpolation).
    assert abs(p99(new, old, "h")["m"] - (0.1 + 0.9 * 49 / 50)) < 1e-9


async def test_top_shows_deployments_lag_rates_and_aliases(start_worker, client, unique,
                                                           kafka_bootstrap) -> None:
    dep, candidate, alias = unique("top"), unique("topc"), unique("topa")
    port = free_port()
    worker = await start_worker(dep, metrics_port=port)
    await set_route(kafka_bootstrap, alias, {dep: 100})
    await set_shadow(kafka_bootstrap, alias, [candidate], 25)
    futures = [await client.submit(Request(id=f"t{i}", model=dep, prompt=f"top {i}",
                                           max_new_tokens=64)) for i in range(6)]
    await wait_for(lambda: (worker.registry.get_sample_value(
        "ferry_tokens_generated_total", {"deployment": dep}) or 0) > 0
        or (worker.registry.get_sample_value("vllm:num_requests_running",
                                             {"model_name": dep}) or 0) > 0,
        60, "decoding to start")
    console = Console(record=True, width=200)
    view = asyncio.create_task(run_top(kafka_bootstrap, [f"http://127.0.0.1:{port}/metrics",
                                                         f"http://127.0.0.1:{free_port()}/x"],
                                       interval_s=1.0, once=True, console=console))
    results = await asyncio.wait_for(asyncio.gather(*futures), 120)
    await asyncio.wait_for(view, 60)
    assert all(r.error is None for r in results)
    text = console.export_text()
    row = next(line for line in text.splitlines() if dep in line and "static" in line)
    cells = [c.strip() for c in row.split("│")]
    assert cells[4] == "1"  # one worker reporting
    assert float(cells[7]) > 0  # tokens/s while the requests were decoding
    assert f"{dep}=100" in text and f"{candidate} @ 25%" in text
    assert "no metrics from: http://127.0.0.1:" in text  # the endpoint that did not answer


def test_cli_prints_one_frame(kafka_bootstrap: str) -> None:
    done = subprocess.run([sys.executable, "-m", "ferry.cli", "top", "--once", "--bootstrap",
                           kafka_bootstrap, "--metrics", f"http://127.0.0.1:{free_port()}/m",
                           "--interval", "0.2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "deployments" in done.stdout and "aliases" in done.stdout
