"""`ferry top` (live view), `ferry demo` (the whole pipeline locally), `ferry schemas`."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from ferry.common import bootstrap, bootstrap_arg, run_until_signalled


def register(sub: Any) -> None:
    top = sub.add_parser("top", help="live view: deployments (status, lag, rates, p99s) and "
                                     "aliases (weights, shadow), refreshed in place")
    top.add_argument("--metrics", action="append", default=None, metavar="URL",
                     help="a component's /metrics (repeat; default the local worker, router "
                          "and gateway ports)")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    bootstrap_arg(top)
    top.set_defaults(func=_top)

    demo = sub.add_parser("demo", help="the whole pipeline on a local broker and a small model")
    demo.add_argument("--requests", type=int, default=8)
    demo.set_defaults(func=_demo)

    schemas = sub.add_parser("schemas", help="message contract")
    schemas.set_defaults(func=_schemas)
    ssub = schemas.add_subparsers(dest="action", required=True)
    export = ssub.add_parser("export", help="write the JSON Schema files and the AsyncAPI "
                                           "document (schemas/json/)")
    export.add_argument("out", type=Path, nargs="?", default=None)


def _top(args: argparse.Namespace) -> int:
    from ferry.top import DEFAULT_METRICS, run_top

    asyncio.run(run_until_signalled(run_top(bootstrap(args), args.metrics or DEFAULT_METRICS,
                                            args.interval, args.once)))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ferry.demo import run_demo

    return run_demo(args.requests)


def _schemas(args: argparse.Namespace) -> int:
    from schemas.export import JSON_DIR, write

    for path in write(args.out or JSON_DIR):
        print(path)
    return 0
