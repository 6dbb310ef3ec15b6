"""What every `ferry` command group shares: the one-line error, --bootstrap, signals, logs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from ferry.broker import default_bootstrap


class CliError(Exception):
    """A failure the user can fix: printed as one line, exit status 2."""


def bootstrap_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", default=None,
                        help="Kafka bootstrap servers (default: $KAFKA_BOOTSTRAP, else the "
                             "local broker of `ferry kafka up`)")


def bootstrap(args: argparse.Namespace) -> str:
    """--bootstrap, else $KAFKA_BOOTSTRAP, else the local broker's."""
    return args.bootstrap or default_bootstrap()


async def run_until_signalled(coro: Coroutine[Any, Any, Any]) -> None:
    """Await `coro`; SIGINT or SIGTERM cancels it, and that ends it quietly."""
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass


def run_command(coro: Coroutine[Any, Any, Any]) -> int:
    """Run a command's coroutine; a ValueError is the user's mistake: print it, exit 1."""
    try:
        asyncio.run(coro)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


class RetriedKafkaErrors(logging.Filter):
    """aiokafka logs at ERROR some conditions it retries by itself: no leader yet for a topic
    created a moment ago, no group coordinator yet on a fresh broker. They are shown at INFO,
    so a healthy start prints no ERROR line while a lasting failure still shows (as what
    stops working, in Ferry's own lines)."""

    RETRIED = ("NotLeaderForPartitionError", "LeaderNotAvailableError",
               "GroupCoordinatorNotAvailableError", "NotCoordinatorForGroupError",
               "CoordinatorLoadInProgressError")

    def filter(self, record: logging.LogRecord) -> bool:
        if (record.name.startswith("aiokafka") and record.levelno > logging.INFO
                and any(name in record.getMessage() for name in self.RETRIED)):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("FERRY_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:  # handler filters see child loggers too
        handler.addFilter(RetriedKafkaErrors())
