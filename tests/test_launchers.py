"""The manifests launcher runs nothing, and the deployer says so: a deployment it renders is
`rendered` until someone applies the files and a replica answers, however long that takes."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import yaml

from models.factory import build_tiny_checkpoint
from models.judge import COMPLETE
from streams.rollout.deployer import Deployer, Policy, announce_checkpoint, request_undeploy
from streams.rollout.launchers import LocalLauncher, ManifestLauncher
from tests.conftest import wait_for


def checkpoint(directory: Path, seed: int) -> Path:
    build_tiny_checkpoint(directory, seed=seed)
    (directory / COMPLETE).touch()
    return directory


def test_only_the_local_launcher_runs_replicas(tmp_path: Path) -> None:
    assert LocalLauncher("127.0.0.1:9092", tmp_path).runs_replicas
    assert not ManifestLauncher("127.0.0.1:9092", tmp_path).runs_replicas


async def test_rendered_deployment_waits_for_whoever_applies_it(kafka_bootstrap, unique,
                                                                tmp_path) -> None:
    model, out = unique("llm"), tmp_path / "manifests"
    policy = Policy(keep=3, load_timeout_s=0.5)  # a local launcher would fail it by now
    deployer = Deployer(kafka_bootstrap, model, tmp_path / "store",
                        ManifestLauncher(kafka_bootstrap, out), policy, poll_s=0.2)
    running = asyncio.create_task(deployer.run())
    worker: asyncio.subprocess.Process | None = None

    def status(version: str) -> str | None:
        record = deployer.record(version)
        return record.status if record else None

    try:
        await wait_for(lambda: deployer.registry.view._caught_up.is_set(), 30, "the deployer")
        for n, version in enumerate(("step-1", "step-2")):
            await announce_checkpoint(kafka_bootstrap, model,
                                      checkpoint(tmp_path / "run" / version, seed=n))
        await wait_for(lambda: status("step-2") == "rendered", 120, "both rendered")
        assert status("step-1") == "rendered"
        first = deployer.record("step-1")
        compose = out / f"{first.deployment}.compose.yml"
        assert compose.exists() and (out / f"{first.deployment}.k8s.yaml").exists()
        rendered_at = first.times["rendered"]
        await wait_for(lambda: time.time() > rendered_at + 2 * policy.load_timeout_s, 10,
                       "the load timeout to pass")
        assert status("step-1") == "rendered"  # not failed: nobody has applied it yet

        # Apply step-1 as an applier would: run the rendered service's command.
        [service] = yaml.safe_load(compose.read_text())["services"].values()
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ferry.cli", *service["command"], "--metrics-port", "off",
            env={**os.environ, "KAFKA_BOOTSTRAP": kafka_bootstrap},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await wait_for(lambda: status("step-1") == "ready", 120, "the applied deployment")
        ready = deployer.record("step-1")
        assert ready.times["ready"] - ready.times["rendered"] > policy.load_timeout_s
        assert ready.durations["load_s"] > policy.load_timeout_s

        # A rendered deployment nobody applied retires at once on undeploy (nothing to drain).
        await request_undeploy(kafka_bootstrap, f"{model}@step-2")
        await wait_for(lambda: status("step-2") == "retired", 60, "step-2 retired")
        second = deployer.record("step-2")
        assert not (out / f"{second.deployment}.compose.yml").exists()
        assert "ready" not in second.times
        # The applied one drains like any other, and its files go with it.
        await request_undeploy(kafka_bootstrap, f"{model}@step-1")
        await wait_for(lambda: status("step-1") == "retired", 60, "step-1 retired")
        assert not list(out.iterdir())
    finally:  # the deployer first: its clients close before the worker leaves
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        if worker is not None and worker.returncode is None:
            worker.terminate()
            await asyncio.wait_for(worker.wait(), 60)
