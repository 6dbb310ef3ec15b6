"""The one way Ferry makes a faust-streaming app: the broker, its credentials and the
settings every Ferry app shares, so a new stream processor cannot forget one of them."""

from __future__ import annotations

from typing import Any

import faust

from edge.kafka_clients import faust_options


def faust_app(app_id: str, bootstrap: str, **settings: Any) -> faust.App:
    """A faust app on `bootstrap` (credentials from FERRY_KAFKA_*), holding no state on disk
    (tables, if any, are rebuilt from their changelog), with no web server (components serve
    their own metrics) and writes acknowledged by every in-sync replica. `settings` add to
    or override those."""
    defaults: dict[str, Any] = {"store": "memory://", "web_enabled": False,
                                "producer_acks": -1, **faust_options()}
    return faust.App(app_id, broker=f"kafka://{bootstrap}", **{**defaults, **settings})


def run_app(app: faust.App, loglevel: str = "info") -> None:
    """Run `app` in this process until it is stopped (blocks; owns the event loop)."""
    faust.Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()
