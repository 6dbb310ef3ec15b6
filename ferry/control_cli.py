"""`ferry router`, `ferry keys ...`, `ferry route ...`: the router and its control tables."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime, timezone
from typing import Any

from edge.metrics_server import add_metrics_port
from ferry.common import bootstrap, bootstrap_arg, run_command
from ferry.flags import add_flags, describe, from_args

log = logging.getLogger("ferry.router")


def register(sub: Any) -> None:
    router = sub.add_parser("router", help="the router stream: ingress -> auth, quota, route")
    router.defer(_add_router_flags)  # when `ferry router` is used: no config import otherwise
    router.set_defaults(func=_router)

    keys = sub.add_parser("keys", help="API keys of tenants")
    keys.set_defaults(func=lambda args: run_command(_keys(args)))
    ksub = keys.add_subparsers(dest="action", required=True)
    add = ksub.add_parser("add", help="create a key for TENANT; prints it once")
    add.add_argument("tenant")
    add.add_argument("--rpm", type=int, default=None, help="requests per minute")
    add.add_argument("--tpm", type=int, default=None, help="tokens per minute")
    add.add_argument("--reply-prefix", default=None,
                     help="confine the tenant's reply topics (besides ferry.results) to this "
                          "prefix")
    revoke = ksub.add_parser("revoke", help="revoke a key (by key or key id)")
    revoke.add_argument("key")
    for parser in (add, revoke, ksub.add_parser("list")):
        bootstrap_arg(parser)

    route = sub.add_parser("route", help="aliases -> weighted deployments")
    route.set_defaults(func=lambda args: run_command(_route(args)))
    rsub = route.add_subparsers(dest="action", required=True)
    rset = rsub.add_parser("set", help="ferry route set ALIAS dep-a=90 dep-b=10")
    rset.add_argument("alias")
    rset.add_argument("weights", nargs="+", metavar="DEPLOYMENT=WEIGHT",
                      help="a deployment and its share (a bare name weighs 100; 0 attaches "
                           "it without traffic)")
    force_arg(rset)
    rdel = rsub.add_parser("delete", help="remove ALIAS's route")
    rdel.add_argument("alias")
    for parser in (rset, rdel, rsub.add_parser("show", help="every alias and its weights")):
        bootstrap_arg(parser)


def force_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="name deployments that do not exist yet (one about to be "
                             "deployed: a first route set before its workers start)")


def _add_router_flags(parser: argparse.ArgumentParser) -> None:
    from streams.routing.router import RouterConfig

    add_flags(parser, RouterConfig)
    add_metrics_port(parser, "router")
    bootstrap_arg(parser)


def _router(args: argparse.Namespace) -> int:
    from streams.routing.router import RouterConfig, run_router

    servers = bootstrap(args)
    config = from_args(RouterConfig, args)
    log.info("router config: bootstrap=%s metrics_port=%s %s", servers, args.metrics_port,
             describe(config))
    run_router(servers, config, metrics_port=args.metrics_port)
    return 0


async def _keys(args: argparse.Namespace) -> None:
    from streams.routing.keys import add_key, list_keys, revoke_key

    servers = bootstrap(args)
    if args.action == "add":
        print(await add_key(servers, args.tenant, args.rpm, args.tpm, args.reply_prefix))
        print(f"(key for tenant {args.tenant}; it is not stored and will not be shown again)",
              file=sys.stderr)
    elif args.action == "revoke":
        print(f"revoked {await revoke_key(servers, args.key)}")
    else:
        print(f"{'KEY ID':14} {'TENANT':20} {'RPM':>8} {'TPM':>10}  CREATED")
        for row in await list_keys(servers):
            stamp = row["created_at"]
            created = datetime.fromtimestamp(stamp if isinstance(stamp, float) else 0,
                                             timezone.utc)
            print(f"{row['id']!s:14} {row['tenant']!s:20} {row['rpm'] or '-'!s:>8} "
                  f"{row['tpm'] or '-'!s:>10}  {created:%Y-%m-%d %H:%M:%SZ}")


async def _route(args: argparse.Namespace) -> None:
    from streams.routing.catalog import check_deployments
    from streams.routing.routes import (
        delete_route,
        parse_weights,
        read_routes,
        set_route,
    )

    servers = bootstrap(args)
    if args.action == "set":
        weights = parse_weights(args.weights)
        if not args.force:
            await check_deployments(servers, weights)
        route = await set_route(servers, args.alias, weights)
        print(f"{route.alias} -> {_weights(route.weights)}")
    elif args.action == "delete":
        await delete_route(servers, args.alias)
        print(f"deleted route {args.alias}")
    else:
        for alias, route in sorted((await read_routes(servers)).items()):
            print(f"{alias} -> {_weights(route.weights)}")


def _weights(weights: dict[str, int]) -> str:
    total = sum(weights.values()) or 1
    return ", ".join(f"{d}={w} ({100 * w / total:.0f}%)" for d, w in weights.items())
