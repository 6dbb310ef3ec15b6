"""`ferry comparator`, `ferry shadow ...`, `ferry replay ...`: shadow candidates and their
judging."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from edge.metrics_server import add_metrics_port
from ferry.common import bootstrap, bootstrap_arg, run_command
from ferry.control_cli import force_arg
from ferry.flags import add_flags, describe, from_args

log = logging.getLogger("ferry.comparator")


def register(sub: Any) -> None:
    comp = sub.add_parser("comparator", help="pair primary and shadow results; publish "
                                             "comparisons to ferry.comparisons")
    comp.defer(_add_comparator_flags)  # when `ferry comparator` is used: faust loads then
    comp.set_defaults(func=_comparator)

    shadow = sub.add_parser("shadow", help="shadow traffic to candidate deployments")
    shadow.set_defaults(func=_shadow)
    ssub = shadow.add_subparsers(dest="action", required=True)
    rep = ssub.add_parser("report", help="how CANDIDATE compares with its primary")
    rep.add_argument("candidate")
    rep.add_argument("--since", default=None, help="ISO time or a duration ago: 30m, 1h, 2d")
    rep.add_argument("--png", type=Path, default=None, help="also write a figure here")
    bootstrap_arg(rep)
    sset = ssub.add_parser("set", help="mirror a share of ALIAS's traffic to candidates")
    sset.add_argument("alias")
    sset.add_argument("--candidate", action="append", required=True, dest="candidates",
                      metavar="DEPLOYMENT", help="a candidate deployment (repeat for several)")
    sset.add_argument("--percent", type=float, default=100.0,
                      help="share of ALIAS's requests copied to every candidate")
    force_arg(sset)
    soff = ssub.add_parser("off", help="stop mirroring ALIAS")
    soff.add_argument("alias")
    for parser in (sset, soff, ssub.add_parser("show", help="every alias's candidates")):
        bootstrap_arg(parser)

    replay = sub.add_parser("replay", help="re-send recorded mirror traffic to a candidate; "
                                           "`replay export` writes it to a file")
    replay.set_defaults(func=lambda args: run_command(_replay(args)))
    _range_args(replay)
    replay.add_argument("--file", type=Path, default=None,
                        help="replay this exported JSONL file instead of a topic")
    replay.add_argument("--candidate", default=None, metavar="DEPLOYMENT")
    replay.add_argument("--rate", type=float, default=None, help="requests per second")
    bootstrap_arg(replay)
    rsub = replay.add_subparsers(dest="action")
    export = rsub.add_parser("export", help="write recorded mirror traffic to a JSONL file")
    _range_args(export)
    export.add_argument("--file", type=Path, required=True)
    bootstrap_arg(export)


def _range_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", default=None, metavar="TOPIC",
                        help="mirror topic to read, e.g. ferry.mirror.dep-b")
    parser.add_argument("--since", default=None, help="ISO time or a duration ago: 30m, 1h")
    parser.add_argument("--until", default=None, help="ISO time or a duration ago")


def _add_comparator_flags(parser: argparse.ArgumentParser) -> None:
    from streams.shadow.comparator import ComparatorConfig

    add_flags(parser, ComparatorConfig)
    add_metrics_port(parser, "comparator")
    bootstrap_arg(parser)


def _comparator(args: argparse.Namespace) -> int:
    from streams.shadow.comparator import ComparatorConfig, run_comparator

    servers, config = bootstrap(args), from_args(ComparatorConfig, args)
    log.info("comparator config: bootstrap=%s metrics_port=%s %s", servers, args.metrics_port,
             describe(config))
    run_comparator(servers, config, metrics_port=args.metrics_port)
    return 0


def _shadow(args: argparse.Namespace) -> int:
    if args.action == "report":
        return run_command(_report(args))
    return run_command(_control(args))


def _times(args: argparse.Namespace) -> tuple[float | None, float | None]:
    from streams.shadow.report import parse_time

    since = parse_time(args.since) if getattr(args, "since", None) else None
    until = parse_time(args.until) if getattr(args, "until", None) else None
    return since, until


async def _report(args: argparse.Namespace) -> None:
    from streams.shadow.report import format_table, report

    summary = await report(bootstrap(args), args.candidate,
                           _times(args)[0], args.png)
    print(format_table(summary))
    if args.png is not None:
        print(f"figure: {args.png}")


async def _replay(args: argparse.Namespace) -> None:
    from streams.shadow.replay import collect, read_entries, replay, write_entries

    servers = bootstrap(args)
    since, until = _times(args)
    if args.action == "export":
        if not args.source:
            raise ValueError("--from: the mirror topic to export is needed")
        entries = await collect(servers, args.source, since, until)
        write_entries(entries, args.file)
        print(f"exported {len(entries)} requests to {args.file}")
        return
    if not args.candidate:
        raise ValueError("--candidate: the deployment to replay to is needed")
    if args.file is not None:
        entries = read_entries(args.file)
    elif args.source:
        entries = await collect(servers, args.source, since, until)
    else:
        raise ValueError("--from TOPIC or --file FILE: something to replay is needed")
    sent, results = await replay(servers, args.candidate, entries, args.rate)
    print(f"replayed {sent} requests to {args.candidate} ({results} primary results re-posted)")


async def _control(args: argparse.Namespace) -> None:
    """`shadow set|off|show`: the shadow table."""
    from streams.routing.catalog import check_deployments
    from streams.routing.routes import parse_weights
    from streams.routing.shadows import read_shadows, set_shadow, shadow_off

    servers = bootstrap(args)
    if args.action == "set":
        parse_weights(args.candidates)  # valid names first, then whether they exist
        if not args.force:
            await check_deployments(servers, args.candidates, candidates=True)
        shadow = await set_shadow(servers, args.alias, args.candidates, args.percent)
        print(f"{shadow.alias}: {shadow.percent:g}% mirrored to {', '.join(shadow.candidates)}")
    elif args.action == "off":
        await shadow_off(servers, args.alias)
        print(f"{args.alias}: shadow off")
    else:
        for alias, shadow in sorted((await read_shadows(servers)).items()):
            print(f"{alias}: {shadow.percent:g}% mirrored to {', '.join(shadow.candidates)}")
