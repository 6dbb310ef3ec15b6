"""The `ferry` command fails like a tool: one line naming the fix, a non-zero exit."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import orjson

from workers.topic_admin import list_topics


def ferry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ferry.cli", *args], capture_output=True,
                          text=True, timeout=120)


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
