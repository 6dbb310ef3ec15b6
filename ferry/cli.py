"""`ferry`: the one command for users and operators.

Each command group is a module with `register(subparsers)`, whose parsers name their handler
with `set_defaults(func=...)` (a handler takes the parsed arguments, returns the exit
status); `COMMANDS` lists them in `ferry --help` order."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys

from aiokafka.errors import KafkaConnectionError

from ferry import (
    control_cli, deploy_cli, gateway_cli, kafka_cli, model_cli, shadow_cli, tools_cli, worker_cli,
)
from ferry.broker import default_bootstrap
from ferry.common import CliError, RetriedKafkaErrors, run_until_signalled, setup_logging
from ferry.flags import DeferredParser

COMMANDS = (kafka_cli, worker_cli, model_cli, gateway_cli, deploy_cli, control_cli,
            shadow_cli, tools_cli)

# Names other code imports from here.
_RetriedKafkaErrors = RetriedKafkaErrors
_run_until_signalled = run_until_signalled
_setup_logging = setup_logging
__all__ = ["COMMANDS", "CliError", "main"]


def _parser() -> argparse.ArgumentParser:
    p = DeferredParser(prog="ferry", description="Kafka-native serving for LLMs")
    p.add_argument("--version", action="version", version=f"ferry {_version()}")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of a failure instead of one line")
    sub = p.add_subparsers(dest="command", required=True)
    for group in COMMANDS:
        group.register(sub)
    return p


def _version() -> str:
    try:
        return importlib.metadata.version("ferry")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from models.trainer import main as train_main

        return train_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.debug:
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except CliError as exc:
        print(f"ferry: {exc}", file=sys.stderr)
        return 2
    except KafkaConnectionError as exc:
        where = getattr(args, "bootstrap", None) or default_bootstrap()
        print(f"ferry: cannot reach Kafka at {where} ({exc}); start a local broker with "
              "`ferry kafka up`, or pass --bootstrap / set KAFKA_BOOTSTRAP", file=sys.stderr)
        return 2
    except OSError as exc:  # a port in use, a missing model directory, ...
        print(f"ferry: {exc.strerror or exc}: {exc.filename or ''} (--debug shows where)",
              file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"ferry: {type(exc).__name__}: {exc} (--debug shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
