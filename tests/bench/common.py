"""What the benchmarks share: a broker and a temp directory, a router process, percentiles,
and the results file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferry.broker import LocalBroker, free_port

if TYPE_CHECKING:
    from tests.harness import RouterProcess


@contextmanager
def kafka_and_tmp() -> Iterator[tuple[str, Path]]:
    """(bootstrap, temp dir): KAFKA_BOOTSTRAP if set, else a fresh broker under the temp dir,
    stopped on the way out. Enter it outside the event loop: the broker runs its own."""
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        if bootstrap is not None:
            yield bootstrap, tmp
            return
        broker = LocalBroker(tmp / "kafka", port=free_port())
        try:  # up() inside: down() also stops a broker that started but never answered
            yield broker.up(), tmp
        finally:
            broker.down()


@contextmanager
def router_process(bootstrap: str, tmp: Path) -> Iterator[RouterProcess]:
    """A started `ferry router` on an ingress topic of its own, its log under `tmp`."""
    from tests.harness import RouterProcess  # here: the harness pulls in the gateway and openai

    tag = uuid.uuid4().hex[:8]
    router = RouterProcess(f"ferry-router-bench-{tag}", f"ferry.ingress.bench-{tag}",
                           free_port(), tmp / "router.log")
    try:  # start() inside: stop() also ends a router that never said ready
        router.start(bootstrap)
        yield router
    finally:
        router.stop()


def pct(values: list[float], q: int) -> float:
    """The q-th percentile; a single sample is every percentile (quantiles wants two)."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 \
        else values[0]


def write_results(path: Path, **fields: Any) -> None:
    """`fields` as JSON under when/machine/cpus, so a result says where and when it ran."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                "machine": platform.platform(), "cpus": os.cpu_count(),
                                **fields}, indent=2) + "\n")
    print(f"\nwritten to {path}")
