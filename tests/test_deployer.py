"""Every checkpoint deployed: the watcher, the registry, local launchers, keep-last-K, crash
restarts and a rolling switch under load, on the real broker with real worker processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from models.factory import build_tiny_checkpoint
from models.judge import COMPLETE, check
from models.store import push
from streams.front.gateway import GATEWAY
from streams.rollout.deployer import (
    Deployer, Policy, announce_checkpoint, request_deploy, request_undeploy, version_order,
)
from streams.rollout.launchers import LocalLauncher, ManifestLauncher
from streams.routing.registry import DeploymentRecord
from streams.routing.routes import read_routes, set_route
from streams.routing.shadows import read_shadows
from tests.conftest import wait_for
from tests.harness import post
from workers.checkpoint_files import INDEX_FILE


def make_checkpoint(directory: Path, seed: int = 0, complete: bool = True) -> Path:
    build_tiny_checkpoint(directory, seed=seed)
    if complete:
        (directory / COMPLETE).touch()
    return directory


def status(deployer: Deployer, version: str) -> str | None:
    record = deployer.record(version)
    return record.status if record else None


def gateway_sees(gw, deployer: Deployer, version: str, wanted: str) -> Callable[[], bool]:
    """The gateway follows the registry within a fetch of the deployer's write."""
    def seen() -> bool:
        record = gw.app[GATEWAY].deployments.by_deployment(f"{deployer.model}-{version}")
        return record is not None and record.status == wanted
    return seen


class Deployers:
    """start_deployer(model, policy, watch=...) runs a Deployer in this loop; `stop` ends one
    (its launcher stops its workers); the rest end at teardown."""

    def __init__(self, bootstrap: str, tmp_path: Path) -> None:
        self.bootstrap, self.tmp_path = bootstrap, tmp_path
        self.tasks: dict[int, asyncio.Task] = {}

    def __call__(self, model: str, policy: Policy, watch: Path | None = None) -> Deployer:
        launcher = LocalLauncher(self.bootstrap, self.tmp_path / "logs", backoff_s=(0.2, 1.0))
        deployer = Deployer(self.bootstrap, model, self.tmp_path / "store", launcher, policy,
                            watch=watch, poll_s=0.2)
        self.tasks[id(deployer)] = asyncio.create_task(deployer.run())
        return deployer

    async def stop(self, deployer: Deployer) -> None:
        task = self.tasks.pop(id(deployer))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
async def start_deployer(kafka_bootstrap: str, tmp_path: Path) -> AsyncIterator[Deployers]:
    deployers = Deployers(kafka_bootstrap, tmp_path)
    yield deployers
    for task in deployers.tasks.values():
        task.cancel()
    await asyncio.gather(*deployers.tasks.values(), return_exceptions=True)


def test_finished_means_complete_or_settled_and_whole(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "checkpoint-1", complete=False)
    now = time.time()
    assert not check(ckpt, settle_s=30, now=now).complete  # just written: not settled
    assert check(ckpt, settle_s=30, now=now + 60).reason == "settled"
    (ckpt / COMPLETE).touch()
    assert check(ckpt, settle_s=30, now=now).reason == "COMPLETE marker"
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a half-written file, even with COMPLETE
    verdict = check(ckpt, settle_s=0, now=now + 60)
    assert not verdict.complete and "model.safetensors" in verdict.reason
    weights.unlink()
    assert "missing" in check(ckpt, 0, now).reason
    assert version_order("checkpoint-900") < version_order("checkpoint-1200")


def test_an_unreadable_index_is_not_finished(tmp_path: Path) -> None:
    """The loader's reading of the index (workers.checkpoint_files): a bad one is a reason
    to wait, never an exception in the deployer's scan."""
    ckpt = make_checkpoint(tmp_path / "checkpoint-1")
    for text, reason in (('{"weight_map": {"a": 1}}', "no weight_map"),
                         ("[1]", "not a JSON object"), ("{", "not valid JSON"),
                         ('{"weight_map": {"a": "gone.safetensors"}}', "is missing")):
        (ckpt / INDEX_FILE).write_text(text)
        verdict = check(ckpt, settle_s=0, now=time.time() + 60)
        assert not verdict.complete and reason in verdict.reason, (text, verdict)


async def test_checkpoints_become_endpoints_and_old_ones_retire(
        start_deployer, start_gateway, http, unique, tmp_path) -> None:
    model, watch = unique("llm"), tmp_path / "run"
    watch.mkdir()
    deployer = start_deployer(model, Policy(keep=1, settle_s=1.0), watch=watch)
    gw = await start_gateway(request_timeout_s=60)

    make_checkpoint(watch / "checkpoint-100", seed=1)
    completed = time.time()  # COMPLETE written
    await wait_for(gateway_sees(gw, deployer, "checkpoint-100", "ready"), 120, "first deploy")
    path = f"{gw.url}/v1/models/{model}/versions/checkpoint-100/completions"
    code, obj = await post(http, path, {"prompt": "hello", "max_tokens": 3})
    assert code == 200 and obj["model"] == f"{model}-checkpoint-100", obj
    answered = time.time()
    code, obj = await post(http, f"{gw.url}/v1/completions",
                           {"model": f"{model}@checkpoint-100", "prompt": "hi", "max_tokens": 2})
    assert code == 200 and obj["model"] == f"{model}-checkpoint-100"
    record = deployer.record("checkpoint-100")
    assert record is not None
    t = record.times
    print(f"checkpoint complete -> first answer {answered - completed:.2f}s: found+verify "
          f"{t['pending'] - completed:.2f}s, upload {t['loading'] - t['pending']:.2f}s, "
          f"load {t['ready'] - t['loading']:.2f}s, ready -> answered {answered - t['ready']:.2f}s")
    assert set(record.durations) == {"verify_s", "upload_s", "load_s"}

    # A half-written checkpoint (truncated weights, no COMPLETE) is not taken...
    staged = make_checkpoint(tmp_path / "staging" / "checkpoint-200", seed=2, complete=False)
    half = watch / "checkpoint-200"
    half.mkdir()
    for file in staged.iterdir():
        if file.name != "model.safetensors":
            shutil.copy(file, half / file.name)
    weights = (staged / "model.safetensors").read_bytes()
    (half / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    await wait_for(lambda: "header says" in deployer._waiting.get(str(half), ""), 30,
                   "the deployer to see the half-written checkpoint")
    assert status(deployer, "checkpoint-200") is None
    # ...until it is whole and marked complete.
    (half / "model.safetensors").write_bytes(weights)
    (half / COMPLETE).touch()
    await wait_for(gateway_sees(gw, deployer, "checkpoint-200", "ready"), 120, "second deploy")

    # keep=1: the older checkpoint drains (no new requests) and retires once its lag is 0.
    await wait_for(gateway_sees(gw, deployer, "checkpoint-100", "retired"), 60, "retirement")
    code, obj = await post(http, path, {"prompt": "hello", "max_tokens": 3})
    assert code == 503 and "retired" in obj["error"]["message"]

    # A crashed worker is restarted by the launcher and serves again.
    launcher = deployer.launcher
    assert isinstance(launcher, LocalLauncher)
    [pid] = launcher.pids(f"{model}-checkpoint-200")
    os.kill(pid, signal.SIGKILL)
    await wait_for(lambda: launcher.restarts(f"{model}-checkpoint-200") == 1, 30, "a restart")
    code, obj = await post(http, f"{gw.url}/v1/models/{model}/versions/checkpoint-200/completions",
                           {"prompt": "after the crash", "max_tokens": 3})
    assert code == 200 and obj["model"] == f"{model}-checkpoint-200"


async def test_rolling_switch_under_load_fails_nothing(
        start_deployer, start_gateway, unique, tmp_path, kafka_bootstrap) -> None:
    model, alias, watch = unique("llm"), unique("main"), tmp_path / "run"
    watch.mkdir()
    deployer = start_deployer(model, Policy(keep=1, settle_s=1.0), watch=watch)
    a, b = f"{model}-checkpoint-1", f"{model}-checkpoint-2"
    make_checkpoint(watch / "checkpoint-1", seed=1)
    await wait_for(lambda: status(deployer, "checkpoint-1") == "ready", 120, "A")
    await set_route(kafka_bootstrap, alias, {a: 100})
    await wait_for(lambda: deployer.routes.get(alias) is not None, 10, "the deployer")
    make_checkpoint(watch / "checkpoint-2", seed=2)
    await wait_for(lambda: status(deployer, "checkpoint-2") == "ready", 120, "B")
    assert status(deployer, "checkpoint-1") == "ready"  # beyond keep=1, but routed: kept
    gw = await start_gateway(request_timeout_s=120)
    await wait_for(gateway_sees(gw, deployer, "checkpoint-2", "ready"), 30, "the gateway")

    n, answered = 300, []
    async with aiohttp.ClientSession() as http:
        async def one(i: int) -> None:
            code, obj = await post(http, f"{gw.url}/v1/completions",
                                   {"model": alias, "prompt": f"request {i}", "max_tokens": 4})
            answered.append((code, obj.get("model")))

        async def load() -> None:
            pending = set()
            for i in range(n):
                pending.add(asyncio.create_task(one(i)))
                if len(pending) >= 16:
                    _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.gather(*pending)

        traffic = asyncio.create_task(load())
        await wait_for(lambda: len(answered) >= n // 3, 120, "a third of the load")
        await set_route(kafka_bootstrap, alias, {b: 100})  # the switch: A drains by itself
        await asyncio.wait_for(traffic, 180)
    assert [c for c, _ in answered if c != 200] == []
    served = {m for _, m in answered}
    assert served == {a, b}
    await wait_for(lambda: status(deployer, "checkpoint-1") == "retired", 60, "A retired")


async def test_manifest_launcher_renders_files(tmp_path) -> None:
    launcher = ManifestLauncher("kafka:9092", tmp_path / "out")
    record = DeploymentRecord("llm", "checkpoint-7", "/models/llm/checkpoint-7", replicas=2)
    await launcher.start(record)
    compose = (tmp_path / "out" / "llm-checkpoint-7.compose.yml").read_text()
    k8s = (tmp_path / "out" / "llm-checkpoint-7.k8s.yaml").read_text()
    assert '"--model", "llm/checkpoint-7"' in compose and "replicas: 2" in compose
    assert "readOnly: true" in k8s and '"--deployment", "llm-checkpoint-7"' in k8s
    await launcher.stop(record)
    assert not list((tmp_path / "out").iterdir())


async def test_announced_and_stored_checkpoints_deploy(start_deployer, unique, tmp_path,
                                                       kafka_bootstrap) -> None:
    model, shadowed, canaried = unique("llm"), unique("chat"), unique("main")
    deployer = start_deployer(model, Policy(keep=2, shadow_of=shadowed, canary_of=canaried,
                                            canary_weight=20))  # no watched dir: events only
    await wait_for(lambda: deployer.registry.view._caught_up.is_set(), 30, "the deployer")
    await announce_checkpoint(kafka_bootstrap, model,
                              make_checkpoint(tmp_path / "elsewhere" / "step-10"))
    await wait_for(lambda: status(deployer, "step-10") == "ready", 120, "announced checkpoint")
    stored = tmp_path / "store" / model / "step-20"
    push(make_checkpoint(tmp_path / "src" / "step-20", seed=3), stored)
    assert await request_deploy(kafka_bootstrap, stored) == f"{model}@step-20"
    await wait_for(lambda: status(deployer, "step-20") == "ready", 120, "stored version")
    assert deployer.record("step-20").durations["upload_s"] == 0.0

    # Policy: the newest checkpoint is the shadow candidate and a 20% canary.
    first, second = f"{model}-step-10", f"{model}-step-20"
    assert (await read_shadows(kafka_bootstrap))[shadowed].candidates == (second,)
    assert (await read_routes(kafka_bootstrap))[canaried].weights == {first: 80, second: 20}
    await request_undeploy(kafka_bootstrap, f"{model}@step-10")  # by hand, though routed
    await wait_for(lambda: status(deployer, "step-10") == "retired", 60, "undeploy")
    listing = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "ferry.cli", "deployments", "--bootstrap", kafka_bootstrap],
        capture_output=True, text=True, timeout=60)
    row = next(line for line in listing.stdout.splitlines() if f"{model}@step-20" in line)
    assert "ready" in row and f"/v1/models/{model}/versions/step-20/completions" in row


async def test_restarted_deployer_adopts_its_deployments(start_deployer, start_gateway, http,
                                                         unique, tmp_path) -> None:
    model, watch = unique("llm"), tmp_path / "run"
    watch.mkdir()
    first = start_deployer(model, Policy(keep=2, settle_s=1.0), watch=watch)
    make_checkpoint(watch / "checkpoint-5", seed=5)
    await wait_for(lambda: status(first, "checkpoint-5") == "ready", 120, "the deployment")
    await start_deployer.stop(first)  # its launcher stops the worker with it

    second = start_deployer(model, Policy(keep=2, settle_s=1.0), watch=watch)
    await wait_for(lambda: status(second, "checkpoint-5") == "ready", 120, "adoption")
    assert second.record("checkpoint-5").times["loading"] > first.record("checkpoint-5").times[
        "ready"]  # it went through loading again: ready means answering
    gw = await start_gateway(request_timeout_s=60)
    launcher = second.launcher
    assert isinstance(launcher, LocalLauncher) and launcher.pids(f"{model}-checkpoint-5")
    code, obj = await post(http, f"{gw.url}/v1/models/{model}/versions/checkpoint-5/completions",
                           {"prompt": "again", "max_tokens": 2})
    assert code == 200 and obj["model"] == f"{model}-checkpoint-5"
