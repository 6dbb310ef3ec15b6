"""Killing a worker process mid-stream loses no request: its partitions' uncommitted
requests are served by the next member of the group."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from schemas import Request


def spawn_worker(model: Path, deployment: str, bootstrap: str,
                 *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ferry.cli", "worker", "--model", str(model),
         "--deployment", deployment, "--bootstrap", bootstrap, "--max-num-seqs", "2",
         "--metrics-port", "off", *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("flags", [("--no-exactly-once",), ()], ids=["at-least-once",
                                                              "exactly-once"])
async def test_sigkill_mid_stream_loses_no_request(client, kafka_bootstrap, tiny_model,
                                                   unique, flags) -> None:
    dep = unique("crash")
    n = 40
    futures = [await client.submit(Request(id=f"c{i}", model=dep, prompt=f"request {i}",
                                           max_new_tokens=24)) for i in range(n)]
    first = spawn_worker(tiny_model, dep, kafka_bootstrap, *flags)
    second = None
    try:
        # Kill the first worker as soon as it has answered something (it is mid-stream).
        done, _ = await asyncio.wait(futures, timeout=90, return_when=asyncio.FIRST_COMPLETED)
        assert done, "first worker answered nothing within 90s"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        answered_before_kill = sum(f.done() for f in futures)
        assert answered_before_kill < n, "the kill came too late to test anything"
        second = spawn_worker(tiny_model, dep, kafka_bootstrap, *flags)
        results = await asyncio.wait_for(asyncio.gather(*futures), 180)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
    assert sorted(r.id for r in results) == sorted(f"c{i}" for i in range(n))
    assert all(r.error is None and r.usage.completion_tokens > 0 for r in results)
