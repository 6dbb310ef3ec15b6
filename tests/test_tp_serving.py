"""Tensor-parallel replicas on the real broker: a TP=2 replica answers with the same tokens
as TP=1, and when one of its ranks dies the replica stops and another replica of the
deployment serves every request."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from schemas import Request
from workers.engine import GenerationInput, SamplingParams
from workers.reshard import reshard


def spawn_worker(model: Path, deployment: str, bootstrap: str, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ferry.cli", "worker", "--model", str(model), "--deployment",
         deployment, "--bootstrap", bootstrap, "--max-num-seqs", "2",
         "--metrics-port", "off", *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"})


def rank_pids(launcher: subprocess.Popen) -> list[int]:
    """The launcher's spawned rank processes, in start order (rank 0 first)."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    ranks = [int(pid) for pid in children
             if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return sorted(ranks)


def stop(*procs: subprocess.Popen | None) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)


async def test_tp2_replica_gives_tp1_tokens(client, kafka_bootstrap, tiny_model, engine,
                                            tmp_path, unique) -> None:
    sliced = reshard(tiny_model, 2, tmp_path / "tp2")
    dep = unique("tp")
    replica = spawn_worker(sliced, dep, kafka_bootstrap, "--tp", "2")
    prompts = ["Once upon a time", "Kafka", "Tensor parallel ranks talk"]
    try:
        futures = [await client.submit(Request(id=f"t{i}", model=dep, prompt=p,
                                               max_new_tokens=10)) for i, p in enumerate(prompts)]
        results = await asyncio.wait_for(asyncio.gather(*futures), 120)
    finally:
        stop(replica)
    assert replica.returncode == 0  # a clean SIGTERM shut rank 0 and its follower down
    expected = engine.generate([GenerationInput(engine.encode(p), SamplingParams(max_new_tokens=10))
                                for p in prompts])
    assert [r.output_ids for r in results] == [e.output_ids for e in expected]


async def test_dead_rank_stops_the_replica_and_loses_nothing(
        client, kafka_bootstrap, tiny_model, unique) -> None:
    dep = unique("tpkill")
    n = 30
    futures = [await client.submit(Request(id=f"k{i}", model=dep, prompt=f"request {i}",
                                           max_new_tokens=24)) for i in range(n)]
    replica = spawn_worker(tiny_model, dep, kafka_bootstrap, "--tp", "2", "--tp-timeout", "10")
    survivor = None
    try:
        done, _ = await asyncio.wait(futures, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        assert done, "the TP=2 replica answered nothing within 120s"
        ranks = rank_pids(replica)
        assert len(ranks) == 2
        os.kill(ranks[1], signal.SIGKILL)
        killed_at = time.monotonic()
        exit_code = await asyncio.to_thread(replica.wait, 60)
        stopped_after = time.monotonic() - killed_at
        assert exit_code != 0 and stopped_after < 30, (exit_code, stopped_after)
        assert sum(f.done() for f in futures) < n, "the kill came too late to test anything"
        survivor = spawn_worker(tiny_model, dep, kafka_bootstrap)
        results = await asyncio.wait_for(asyncio.gather(*futures), 180)
    finally:
        stop(replica, survivor)
    assert sorted(r.id for r in results) == sorted(f"k{i}" for i in range(n))
    assert all(r.error is None for r in results)
