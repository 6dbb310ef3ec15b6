"""A worker serves a checkpoint straight from the model store (the mounted volume), and
refuses a corrupted one."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from models.store import push
from schemas import Request
from workers.engine import GenerationInput, SamplingParams


def test_worker_refuses_a_corrupted_version(tiny_model, tmp_path) -> None:
    push(tiny_model, tmp_path / "store" / "tiny" / "v1")
    weights = tmp_path / "store" / "tiny" / "v1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])  # truncated: the size check catches it
    proc = subprocess.run(
        [sys.executable, "-m", "ferry.cli", "worker", "--store", str(tmp_path / "store"),
         "--model", "tiny/v1", "--deployment", "never", "--bootstrap", "127.0.0.1:1",
         "--metrics-port", "off"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "model.safetensors" in proc.stderr and "size" in proc.stderr


async def test_worker_loads_from_the_store(client, kafka_bootstrap, tiny_model, engine,
                                           tmp_path, unique) -> None:
    store = tmp_path / "store"
    push(tiny_model, store / "tiny" / "v1", parallel=2)
    dep = unique("stored")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ferry.cli", "worker", "--store", str(store), "--model",
         "tiny/v1", "--verify-hashes", "--deployment", dep, "--bootstrap", kafka_bootstrap,
         "--metrics-port", "off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        result = await client.request(Request(id="s1", model=dep, prompt="from the store",
                                              max_new_tokens=5), timeout=120)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 60)
    assert result.error is None
    [expected] = engine.generate([GenerationInput(engine.encode("from the store"),
                                                  SamplingParams(max_new_tokens=5))])
    assert result.output_ids == expected.output_ids

