"""`ferry comparator`, `ferry shadow report`, `ferry replay ...`: judging shadow candidates."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edge.metrics_server import add_metrics_port
from ferry.broker import default_bootstrap
from ferry.control_cli import run_command


def add_parsers(sub: Any, bootstrap_arg: Any) -> Any:
    """Add the commands; returns the `shadow` subparsers, for other modules' `shadow` actions."""
    comp = sub.add_parser("comparator", help="pair primary and shadow results; publish "
                                             "comparisons to ferry.comparisons")
    comp.add_argument("--app-id", default="ferry-comparator", help="faust app id (group)")
    comp.add_argument("--candidate", action="append", required=True, metavar="DEPLOYMENT",
                      help="a shadow deployment to compare (repeat for several)")
    comp.add_argument("--window", type=float, default=300.0,
                      help="seconds a request waits for all of its results")
    comp.add_argument("--score-timeout", type=float, default=30.0,
                      help="seconds to wait for a candidate's teacher-forced score")
    comp.add_argument("--stats-window", type=float, default=600.0,
                      help="seconds of comparisons behind the Prometheus gauges")
    add_metrics_port(comp, "comparator")
    comp.add_argument("--log-level", default="WARNING")
    bootstrap_arg(comp)

    shadow = sub.add_parser("shadow", help="shadow traffic to candidate deployments")
    ssub = shadow.add_subparsers(dest="action", required=True)
    rep = ssub.add_parser("report", help="how CANDIDATE compares with its primary")
    rep.add_argument("candidate")
    rep.add_argument("--since", default=None, help="ISO time or a duration ago: 30m, 1h, 2d")
    rep.add_argument("--png", type=Path, default=None, help="also write a figure here")
    bootstrap_arg(rep)

    replay = sub.add_parser("replay", help="re-send recorded mirror traffic to a candidate; "
                                           "`replay export` writes it to a file")
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
    return ssub


def _range_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", default=None, metavar="TOPIC",
                        help="mirror topic to read, e.g. ferry.mirror.dep-b")
    parser.add_argument("--since", default=None, help="ISO time or a duration ago: 30m, 1h")
    parser.add_argument("--until", default=None, help="ISO time or a duration ago")


def dispatch(args: argparse.Namespace) -> int | None:
    """Run the command if it is one of these; None when it is not."""
    if args.command == "comparator":
        from streams.shadow.comparator import run_comparator

        run_comparator(args.bootstrap or default_bootstrap(), args.candidate,
                       app_id=args.app_id, window_s=args.window,
                       score_timeout_s=args.score_timeout, stats_window_s=args.stats_window,
                       metrics_port=args.metrics_port, loglevel=args.log_level)
        return 0
    if args.command == "shadow" and args.action == "report":
        return run_command(_report(args))
    if args.command == "replay":
        return run_command(_replay(args))
    return None


def _times(args: argparse.Namespace) -> tuple[float | None, float | None]:
    from streams.shadow.report import parse_time

    since = parse_time(args.since) if getattr(args, "since", None) else None
    until = parse_time(args.until) if getattr(args, "until", None) else None
    return since, until


async def _report(args: argparse.Namespace) -> None:
    from streams.shadow.report import format_table, report

    summary = await report(args.bootstrap or default_bootstrap(), args.candidate,
                           _times(args)[0], args.png)
    print(format_table(summary))
    if args.png is not None:
        print(f"figure: {args.png}")


async def _replay(args: argparse.Namespace) -> None:
    from streams.shadow.replay import collect, read_entries, replay, write_entries

    bootstrap = args.bootstrap or default_bootstrap()
    since, until = _times(args)
    if args.action == "export":
        if not args.source:
            raise ValueError("--from: the mirror topic to export is needed")
        entries = await collect(bootstrap, args.source, since, until)
        write_entries(entries, args.file)
        print(f"exported {len(entries)} requests to {args.file}")
        return
    if not args.candidate:
        raise ValueError("--candidate: the deployment to replay to is needed")
    if args.file is not None:
        entries = read_entries(args.file)
    elif args.source:
        entries = await collect(bootstrap, args.source, since, until)
    else:
        raise ValueError("--from TOPIC or --file FILE: something to replay is needed")
    sent, results = await replay(bootstrap, args.candidate, entries, args.rate)
    print(f"replayed {sent} requests to {args.candidate} ({results} primary results re-posted)")
