"""`ferry deployer`, `ferry deployments`, `ferry deploy`, `ferry undeploy`, `ferry canary`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

from edge.metrics_server import add_metrics_port
from ferry.common import bootstrap, bootstrap_arg
from ferry.flags import add_flags, describe, from_args

log = logging.getLogger("ferry.deployer")


def register(sub: Any) -> None:
    d = sub.add_parser("deployer", help="deploy every finished checkpoint of a training run")
    d.defer(_add_deployer_flags)  # when `ferry deployer` is used: no config import otherwise
    lst = sub.add_parser("deployments", help="deployments with status, age, lag, endpoint")
    dep = sub.add_parser("deploy", help="deploy STORE/NAME/VERSION (through its deployer)")
    dep.add_argument("target", type=Path)
    und = sub.add_parser("undeploy", help="drain and retire NAME@VERSION")
    und.add_argument("id")
    for parser in (lst, dep, und):
        bootstrap_arg(parser)
    for parser in (d, lst, dep, und):
        parser.set_defaults(func=_run)

    canary = sub.add_parser("canary", help="shift an alias to a deployment step by step; roll "
                                           "back on worse errors or latency")
    canary.add_argument("alias")
    canary.add_argument("--to", required=True, metavar="DEPLOYMENT",
                        help="the deployment the alias's traffic moves to")
    canary.defer(_add_canary_flags)  # the policy's module imports aiokafka: only for `canary`
    bootstrap_arg(canary)
    canary.set_defaults(func=_canary)


def _add_deployer_flags(parser: argparse.ArgumentParser) -> None:
    from streams.rollout.deployer import DeployerConfig

    add_flags(parser, DeployerConfig)
    add_metrics_port(parser, "deployer")
    bootstrap_arg(parser)


def _add_canary_flags(parser: argparse.ArgumentParser) -> None:
    from streams.rollout.canary import CanaryPolicy

    add_flags(parser, CanaryPolicy)


def _run(args: argparse.Namespace) -> int:
    servers = bootstrap(args)
    try:
        if args.command == "deployer":
            asyncio.run(_deployer(args, servers))
        elif args.command == "deployments":
            asyncio.run(_list(servers))
        elif args.command == "deploy":
            from streams.rollout.deployer import request_deploy

            print(f"asked to deploy {asyncio.run(request_deploy(servers, args.target))}")
        else:
            from streams.rollout.deployer import request_undeploy

            asyncio.run(request_undeploy(servers, args.id))
            print(f"asked to undeploy {args.id}")
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _canary(args: argparse.Namespace) -> int:
    from streams.rollout.canary import CanaryPolicy, run_canary

    try:
        policy = from_args(CanaryPolicy, args)  # its checks raise ValueError
        outcome = asyncio.run(run_canary(bootstrap(args), args.alias,
                                         args.to, policy, log_fn=print))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if outcome.status == "rolled_back":
        print(f"rolled back at {outcome.step}%: {outcome.reason}; route restored to "
              f"{outcome.weights}")
        return 1
    print(f"completed: {args.alias} -> {outcome.weights}")
    return 0


async def _deployer(args: argparse.Namespace, servers: str) -> None:
    from edge.metrics_server import serve_metrics
    from streams.rollout.deployer import Deployer, DeployerConfig
    from streams.rollout.launchers import Launcher, LocalLauncher, ManifestLauncher
    from streams.rollout.metrics import deployer_registry

    config = from_args(DeployerConfig, args)
    log.info("deployer config: bootstrap=%s metrics_port=%s %s", servers, args.metrics_port,
             describe(config))
    launcher: Launcher = (ManifestLauncher(servers, config.manifests)
                          if config.launcher == "manifests" else
                          LocalLauncher(servers, config.logs or config.store / ".logs"))
    deployer = Deployer(servers, config.model, config.store, launcher, config.policy,
                        watch=config.watch)
    serve_metrics(args.metrics_port, deployer_registry(deployer))
    await deployer.run()


async def _list(servers: str) -> None:
    from streams.routing.backlog import BacklogProbe
    from streams.routing.registry import read_registry

    records = sorted(await read_registry(servers), key=lambda r: r.id)
    probe = BacklogProbe(servers)
    await probe.start()
    try:
        print(f"{'DEPLOYMENT':34} {'STATUS':9} {'AGE':>7} {'REPL':>4} {'LAG':>5}  ENDPOINT")
        for r in records:
            lag = (await probe.sample(r.deployment)).lag if r.status != "retired" else 0
            age = time.time() - r.times.get("pending", time.time())
            print(f"{r.id:34} {r.status:9} {_age(age):>7} {r.replicas:>4} {lag:>5}  "
                  f"/v1/models/{r.name}/versions/{r.version}/completions")
    finally:
        await probe.close()


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"
