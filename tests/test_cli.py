"""The `ferry` command fails like a tool: one line naming the fix, a non-zero exit."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
import pytest

from edge.topic_admin import ensure_topics, list_topics
from ferry.cli import _parser
from ferry.flags import DeferredParser, add_flags, describe, flag_name, from_args
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


# ---- flags generated from the components' config dataclasses ----------------------------

@dataclass(frozen=True)
class _Inner:
    depth: int = field(default=2, metadata={"help": "nested"})


@dataclass(frozen=True)
class _Sample:
    name: str = field(metadata={"help": "required: no default"})
    count: int = field(default=3, metadata={"help": "an int"})
    ratio: float = field(default=0.5, metadata={"help": "a float"})
    where: Path = field(default=Path("out"), metadata={"help": "a path"})
    limit: int | None = field(default=None, metadata={"help": "optional"})
    verbose: bool = field(default=False, metadata={"help": "off unless given"})
    cache: bool = field(default=True, metadata={"help": "--no-cache turns it off"})
    auth: bool = field(default=True, metadata={"flag": "--open", "negate": True, "help": "no"})
    timeout_s: float = field(default=1.0, metadata={"flag": "--timeout", "help": "renamed"})
    member: str | None = field(default=None, metadata={"env": "FERRY_TEST_MEMBER", "help": "e"})
    tags: tuple[str, ...] = field(default=(), metadata={"help": "repeat"})
    routes: dict[str, str] = field(default_factory=dict, metadata={"help": "K=V, repeat"})
    mode: Literal["a", "b"] = field(default="a", metadata={"help": "a choice"})
    password: str = field(default="", metadata={"secret": True, "help": "masked"})
    inner: _Inner = field(default_factory=_Inner)


def _sample_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_flags(parser, _Sample)
    return parser


def test_add_flags_and_from_args_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FERRY_TEST_MEMBER", raising=False)
    parser = _sample_parser()
    assert from_args(_Sample, parser.parse_args(["--name", "n"])) == _Sample(name="n")
    args = parser.parse_args([
        "--name", "n", "--count", "7", "--ratio", "2.5", "--where", "/tmp/x", "--limit", "9",
        "--verbose", "--no-cache", "--open", "--timeout", "4", "--tags", "x", "--tags", "y",
        "--routes", "h=m", "--routes", "g=k=v", "--mode", "b", "--password", "pw",
        "--depth", "5"])
    config = from_args(_Sample, args, count=8)  # an override wins over the flag
    assert config == _Sample(
        name="n", count=8, ratio=2.5, where=Path("/tmp/x"), limit=9, verbose=True, cache=False,
        auth=False, timeout_s=4.0, tags=("x", "y"), routes={"h": "m", "g": "k=v"}, mode="b",
        password="pw", inner=_Inner(depth=5))
    assert "password=***" in describe(config) and "pw" not in describe(config).split()
    assert "depth=5" in describe(config)
    with pytest.raises(TypeError, match="no field nmae"):
        from_args(_Sample, args, nmae="x")


def test_add_flags_refuses_what_the_type_does_not_allow(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    parser = _sample_parser()
    for argv in ([], ["--name", "n", "--count", "x"], ["--name", "n", "--mode", "c"],
                 ["--name", "n", "--routes", "no-equals"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    assert "--name" in capsys.readouterr().err


def test_an_env_default_replaces_the_field_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_TEST_MEMBER", "pod-0")
    parser = _sample_parser()  # read when the flags are added, as `ferry` builds its parser
    assert from_args(_Sample, parser.parse_args(["--name", "n"])).member == "pod-0"
    assert from_args(_Sample, parser.parse_args(["--name", "n", "--member", "x"])).member == "x"
    help_text = parser.format_help()
    assert "$FERRY_TEST_MEMBER" in help_text and "(default: 3)" in help_text


def test_a_parse_flag_reads_its_own_syntax(capsys: pytest.CaptureFixture[str]) -> None:
    from streams.rollout.canary import CanaryPolicy

    parser = argparse.ArgumentParser()
    add_flags(parser, CanaryPolicy)
    args = parser.parse_args(["--steps", "5,50,100", "--every", "2m"])
    assert from_args(CanaryPolicy, args) == CanaryPolicy(steps=(5, 50, 100), every_s=120.0)
    assert "(default: 5,25,50,100)" in parser.format_help()  # `format`: in the flag's syntax
    for argv in (["--steps", "5,x"], ["--every", "soon"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    assert "'soon' is not like 60s" in capsys.readouterr().err  # parse's message, not argparse's
    with pytest.raises(ValueError, match="must end at 100"):  # the policy still checks itself
        from_args(CanaryPolicy, parser.parse_args(["--steps", "5,50"]))


def _component_commands() -> dict[str, tuple[type, list[str], dict[str, Any]]]:
    """Each converted command: its config class, the required flags, what its handler passes
    besides the flags."""
    from streams.front.gateway import GatewaySettings
    from streams.rollout.canary import CanaryPolicy
    from streams.rollout.deployer import DeployerConfig
    from streams.routing.router import RouterConfig
    from streams.shadow.comparator import ComparatorConfig
    from workers.config import WorkerConfig

    return {
        "worker": (WorkerConfig, ["--model", "m", "--deployment", "d"],
                   {"bootstrap": "b", "metrics_port": None}),
        "gateway": (GatewaySettings, [], {}),
        "router": (RouterConfig, [], {}),
        "deployer": (DeployerConfig, ["--model", "m", "--store", "s"], {}),
        "comparator": (ComparatorConfig, ["--candidate", "c"], {}),
        "canary": (CanaryPolicy, ["alias", "--to", "d"], {}),
    }


def _subparser(command: str) -> argparse.ArgumentParser:
    [sub] = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    parser = sub.choices[command]
    assert isinstance(parser, DeferredParser)
    return parser.ready()  # its flags are added when it is first used


@pytest.mark.parametrize("command", ["worker", "gateway", "router", "deployer", "comparator",
                                     "canary"])
def test_every_option_has_help(command: str) -> None:
    parser = _subparser(command)
    missing = [a.option_strings[0] for a in parser._actions
               if a.option_strings and not (a.help or "").strip()]
    assert not missing, f"ferry {command}: no help for {missing}"


@pytest.mark.parametrize("command", ["worker", "gateway", "router", "deployer", "comparator",
                                     "canary"])
def test_parser_defaults_are_the_config_defaults(command: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("FERRY_GROUP_INSTANCE_ID", "FERRY_ROUTER_INSTANCE_ID"):
        monkeypatch.delenv(var, raising=False)
    cls, required, passed = _component_commands()[command]
    args = _parser().parse_args([command, *required])
    given = {k: v for k, v in vars(args).items() if k in {"model", "deployment", "store"}}
    if command == "worker":
        given["model_dir"] = Path(given.pop("model"))
    if command == "comparator":
        given["candidates"] = ("c",)
    built = from_args(cls, args, **passed)
    assert built == cls(**given, **passed)  # no flag default differs from its field's
    parser = _subparser(command)
    flags = {opt for a in parser._actions for opt in a.option_strings}
    # every setting is a flag (the ones the handler passes excepted)
    assert {flag_name(f) for f in _leaf_fields(cls) if f.name not in passed} <= flags


def _leaf_fields(cls: type) -> list[dataclasses.Field[Any]]:
    out: list[dataclasses.Field[Any]] = []
    for f in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[f.name]
        out += _leaf_fields(kind) if dataclasses.is_dataclass(kind) else [f]
    return out


def test_a_command_imports_only_its_own_component() -> None:
    """Component flags are added when their command is used: `ferry keys list` (or
    `--version`) does not import the gateway's aiohttp nor the worker's torch."""
    probe = ("import sys; from ferry.cli import _parser; _parser().parse_args(%r); "
             "print(sorted(m for m in ('aiohttp', 'torch', 'streams.front.gateway') "
             "if m in sys.modules))")
    for argv, loaded in ((["keys", "list"], "[]"),
                         (["gateway"], "['aiohttp', 'streams.front.gateway']")):
        done = subprocess.run([sys.executable, "-c", probe % argv], capture_output=True,
                              text=True, timeout=60)
        assert done.stdout.strip() == loaded, done.stderr
