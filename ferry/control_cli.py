"""`ferry router`, `ferry keys ...`, `ferry route ...`: the router and its control tables."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from datetime import datetime, timezone
from typing import Any

from edge.metrics_server import add_metrics_port
from ferry.broker import default_bootstrap
from ferry.flags import add_flags, describe, from_args

log = logging.getLogger("ferry.router")


def add_parsers(sub: Any, bootstrap_arg: Any) -> None:
    from streams.routing.router import RouterConfig

    router = sub.add_parser("router", help="the router stream: ingress -> auth, quota, route")
    add_flags(router, RouterConfig)
    add_metrics_port(router, "router")
    bootstrap_arg(router)

    keys = sub.add_parser("keys", help="API keys of tenants")
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
    rsub = route.add_subparsers(dest="action", required=True)
    rset = rsub.add_parser("set", help="ferry route set ALIAS dep-a=90 dep-b=10")
    rset.add_argument("alias")
    rset.add_argument("weights", nargs="+", metavar="DEPLOYMENT=WEIGHT",
                      help="a deployment and its share (a bare name weighs 100; 0 attaches "
                           "it without traffic)")
    _force_arg(rset)
    rdel = rsub.add_parser("delete", help="remove ALIAS's route")
    rdel.add_argument("alias")
    for parser in (rset, rdel, rsub.add_parser("show", help="every alias and its weights")):
        bootstrap_arg(parser)


def add_shadow_parsers(shadow_sub: Any, bootstrap_arg: Any) -> None:
    """`ferry shadow set|off|show` (next to `ferry shadow report`)."""
    sset = shadow_sub.add_parser("set", help="mirror a share of ALIAS's traffic to candidates")
    sset.add_argument("alias")
    sset.add_argument("--candidate", action="append", required=True, dest="candidates",
                      metavar="DEPLOYMENT", help="a candidate deployment (repeat for several)")
    sset.add_argument("--percent", type=float, default=100.0,
                      help="share of ALIAS's requests copied to every candidate")
    _force_arg(sset)
    soff = shadow_sub.add_parser("off", help="stop mirroring ALIAS")
    soff.add_argument("alias")
    for parser in (sset, soff, shadow_sub.add_parser("show", help="every alias's candidates")):
        bootstrap_arg(parser)


def _force_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="name deployments that do not exist yet (one about to be "
                             "deployed: a first route set before its workers start)")


def dispatch(args: argparse.Namespace) -> int | None:
    """Run the command if it is one of these; None when it is not."""
    if args.command == "router":
        from streams.routing.router import RouterConfig, run_router

        bootstrap = args.bootstrap or default_bootstrap()
        config = from_args(RouterConfig, args)
        log.info("router config: bootstrap=%s metrics_port=%s %s", bootstrap,
                 args.metrics_port, describe(config))
        run_router(bootstrap, config, metrics_port=args.metrics_port)
        return 0
    if args.command == "keys":
        return run_command(_keys(args))
    if args.command == "route":
        return run_command(_route(args))
    if args.command == "shadow" and args.action in ("set", "off", "show"):
        return run_command(_shadow(args))
    return None


def run_command(coro: Any) -> int:
    """Run a command's coroutine; a ValueError is the user's mistake: print it, exit 1."""
    try:
        asyncio.run(coro)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


async def _keys(args: argparse.Namespace) -> None:
    from streams.routing.keys import add_key, list_keys, revoke_key

    bootstrap = args.bootstrap or default_bootstrap()
    if args.action == "add":
        print(await add_key(bootstrap, args.tenant, args.rpm, args.tpm, args.reply_prefix))
        print(f"(key for tenant {args.tenant}; it is not stored and will not be shown again)",
              file=sys.stderr)
    elif args.action == "revoke":
        print(f"revoked {await revoke_key(bootstrap, args.key)}")
    else:
        print(f"{'KEY ID':14} {'TENANT':20} {'RPM':>8} {'TPM':>10}  CREATED")
        for row in await list_keys(bootstrap):
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

    bootstrap = args.bootstrap or default_bootstrap()
    if args.action == "set":
        weights = parse_weights(args.weights)
        if not args.force:
            await check_deployments(bootstrap, weights)
        route = await set_route(bootstrap, args.alias, weights)
        print(f"{route.alias} -> {_weights(route.weights)}")
    elif args.action == "delete":
        await delete_route(bootstrap, args.alias)
        print(f"deleted route {args.alias}")
    else:
        for alias, route in sorted((await read_routes(bootstrap)).items()):
            print(f"{alias} -> {_weights(route.weights)}")


def _weights(weights: dict[str, int]) -> str:
    total = sum(weights.values()) or 1
    return ", ".join(f"{d}={w} ({100 * w / total:.0f}%)" for d, w in weights.items())


async def _shadow(args: argparse.Namespace) -> None:
    from streams.routing.catalog import check_deployments
    from streams.routing.routes import parse_weights
    from streams.routing.shadows import read_shadows, set_shadow, shadow_off

    bootstrap = args.bootstrap or default_bootstrap()
    if args.action == "set":
        parse_weights(args.candidates)  # valid names first, then whether they exist
        if not args.force:
            await check_deployments(bootstrap, args.candidates, candidates=True)
        shadow = await set_shadow(bootstrap, args.alias, args.candidates, args.percent)
        print(f"{shadow.alias}: {shadow.percent:g}% mirrored to {', '.join(shadow.candidates)}")
    elif args.action == "off":
        await shadow_off(bootstrap, args.alias)
        print(f"{args.alias}: shadow off")
    else:
        for alias, shadow in sorted((await read_shadows(bootstrap)).items()):
            print(f"{alias}: {shadow.percent:g}% mirrored to {', '.join(shadow.candidates)}")
