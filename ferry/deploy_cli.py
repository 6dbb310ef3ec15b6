"""`ferry deployer`, `ferry deployments`, `ferry deploy`, `ferry undeploy`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

from edge.metrics_server import add_metrics_port
from ferry.broker import default_bootstrap
from ferry.flags import add_flags, describe, from_args

log = logging.getLogger("ferry.deployer")


def add_parsers(sub: Any, bootstrap_arg: Any) -> None:
    from streams.rollout.deployer import DeployerConfig

    d = sub.add_parser("deployer", help="deploy every finished checkpoint of a training run")
    add_flags(d, DeployerConfig)
    add_metrics_port(d, "deployer")
    bootstrap_arg(d)
    lst = sub.add_parser("deployments", help="deployments with status, age, lag, endpoint")
    dep = sub.add_parser("deploy", help="deploy STORE/NAME/VERSION (through its deployer)")
    dep.add_argument("target", type=Path)
    und = sub.add_parser("undeploy", help="drain and retire NAME@VERSION")
    und.add_argument("id")
    for parser in (lst, dep, und):
        bootstrap_arg(parser)


def dispatch(args: argparse.Namespace) -> int | None:
    if args.command not in ("deployer", "deployments", "deploy", "undeploy"):
        return None
    bootstrap = args.bootstrap or default_bootstrap()
    try:
        if args.command == "deployer":
            asyncio.run(_deployer(args, bootstrap))
        elif args.command == "deployments":
            asyncio.run(_list(bootstrap))
        elif args.command == "deploy":
            from streams.rollout.deployer import request_deploy

            print(f"asked to deploy {asyncio.run(request_deploy(bootstrap, args.target))}")
        else:
            from streams.rollout.deployer import request_undeploy

            asyncio.run(request_undeploy(bootstrap, args.id))
            print(f"asked to undeploy {args.id}")
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


async def _deployer(args: argparse.Namespace, bootstrap: str) -> None:
    from edge.metrics_server import serve_metrics
    from streams.rollout.deployer import Deployer, DeployerConfig
    from streams.rollout.launchers import Launcher, LocalLauncher, ManifestLauncher
    from streams.rollout.metrics import deployer_registry

    config = from_args(DeployerConfig, args)
    log.info("deployer config: bootstrap=%s metrics_port=%s %s", bootstrap, args.metrics_port,
             describe(config))
    launcher: Launcher = (ManifestLauncher(bootstrap, config.manifests)
                          if config.launcher == "manifests" else
                          LocalLauncher(bootstrap, config.logs or config.store / ".logs"))
    deployer = Deployer(bootstrap, config.model, config.store, launcher, config.policy,
                        watch=config.watch)
    serve_metrics(args.metrics_port, deployer_registry(deployer))
    await deployer.run()


async def _list(bootstrap: str) -> None:
    from streams.routing.backlog import BacklogProbe
    from streams.routing.registry import read_registry

    records = sorted(await read_registry(bootstrap), key=lambda r: r.id)
    probe = BacklogProbe(bootstrap)
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
