"""The `ferry` command fails like a tool: one line naming the fix, a non-zero exit."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import orjson

from edge.topic_admin import ensure_topics, list_topics
from schemas import requests_topic
from schemas.topics import mirror_topic
from streams.routing.registry import DeploymentRecord, publish
from streams.routing.routes import read_routes
from streams.routing.shadows import read_shadows


def ferry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ferry.cli", *args], capture_output=True,
                          text=True, timeout=120)


async def aferry(*args: str) -> subprocess.CompletedProcess[str]:
    """`ferry ARGS` without blocking the test's event loop."""
    return await asyncio.to_thread(ferry, *args)


def test_version() -> None:
    done = ferry("--version")
    assert done.returncode == 0 and done.stdout.startswith("ferry 0.")


def test_no_broker_is_one_line_with_the_fix() -> None:
    done = ferry("send", "hello", "--model", "m", "--bootstrap", "127.0.0.1:1")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    [line] = [x for x in done.stderr.splitlines() if x.startswith("ferry:")]
    assert "cannot reach Kafka at 127.0.0.1:1" in line and "ferry kafka up" in line


def test_debug_keeps_the_traceback() -> None:
    done = ferry("--debug", "send", "hello", "--model", "m", "--bootstrap", "127.0.0.1:1")
    assert done.returncode != 0 and "Traceback" in done.stderr


async def test_send_to_an_unknown_deployment_refuses_and_creates_no_topic(
        kafka_bootstrap, unique) -> None:
    name = unique("typo")
    done = ferry("send", "hello", "--model", name, "--bootstrap", kafka_bootstrap)
    assert done.returncode == 2, done.stderr
    assert f"no deployment {name!r}" in done.stderr and "Traceback" not in done.stderr
    assert f"ferry.requests.{name}" not in await list_topics(kafka_bootstrap)


async def test_send_prints_results_and_exits_1_on_an_error_result(start_worker, kafka_bootstrap,
                                                                  unique) -> None:
    dep = unique("cli")
    await start_worker(dep)

    async def send(*extra: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ferry.cli", "send", "hello", "--model", dep,
            "--bootstrap", kafka_bootstrap, *extra, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    code, out = await send("--max-new-tokens", "4")
    assert code == 0 and orjson.loads(out)["usage"]["completion_tokens"] == 4
    code, out = await send("--max-new-tokens", "1000000")  # beyond the model's context
    assert code == 1 and orjson.loads(out)["error"]["code"] == "prompt_too_long"


async def test_route_set_refuses_a_deployment_that_does_not_exist(kafka_bootstrap,
                                                                 unique) -> None:
    alias, real, typo = unique("alias"), unique("dep"), unique("typo")
    await ensure_topics(kafka_bootstrap, {requests_topic(real): 1})
    done = await aferry("route", "set", alias, f"{real}=90", f"{typo}=10",
                        "--bootstrap", kafka_bootstrap)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert f"no deployment {typo!r}" in line and "--force" in line
    assert alias not in await read_routes(kafka_bootstrap)  # nothing written

    done = await aferry("route", "set", alias, f"{real}=90", "--bootstrap", kafka_bootstrap)
    assert done.returncode == 0, done.stderr
    assert (await read_routes(kafka_bootstrap))[alias].weights == {real: 90}
    # --force: a first route to a deployment whose workers are not up yet.
    done = await aferry("route", "set", alias, f"{typo}=100", "--force",
                        "--bootstrap", kafka_bootstrap)
    assert done.returncode == 0, done.stderr
    assert (await read_routes(kafka_bootstrap))[alias].weights == {typo: 100}
    assert requests_topic(typo) not in await list_topics(kafka_bootstrap)  # no side effect


async def test_route_set_refuses_a_retired_deployment(kafka_bootstrap, unique) -> None:
    alias, model = unique("alias"), unique("llm")
    record = DeploymentRecord(model, "step-1", f"/models/{model}/step-1").moved("retired")
    await ensure_topics(kafka_bootstrap, {requests_topic(record.deployment): 1})
    await publish(kafka_bootstrap, record)
    done = await aferry("route", "set", alias, record.deployment, "--bootstrap", kafka_bootstrap)
    assert done.returncode == 1
    assert f"deployment {record.deployment!r} is retired" in done.stderr
    assert alias not in await read_routes(kafka_bootstrap)


async def test_shadow_set_checks_its_candidates(kafka_bootstrap, unique) -> None:
    alias, candidate, typo = unique("alias"), unique("cand"), unique("typo")
    # A `--shadow` worker started by hand has only its mirror topic: that is a candidate.
    await ensure_topics(kafka_bootstrap, {mirror_topic(candidate): 1})
    done = await aferry("shadow", "set", alias, "--candidate", candidate, "--candidate", typo,
                        "--bootstrap", kafka_bootstrap)
    assert done.returncode == 1 and f"no deployment {typo!r}" in done.stderr
    assert alias not in await read_shadows(kafka_bootstrap)
    done = await aferry("shadow", "set", alias, "--candidate", candidate, "--percent", "25",
                        "--bootstrap", kafka_bootstrap)
    assert done.returncode == 0, done.stderr
    shadow = (await read_shadows(kafka_bootstrap))[alias]
    assert shadow.candidates == (candidate,) and shadow.percent == 25
