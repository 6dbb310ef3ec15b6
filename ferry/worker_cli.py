"""`ferry worker`: serve one deployment from its consumer group (one rank, or a TP replica)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from edge.metrics_server import MetricsPortError, add_metrics_port
from ferry.common import bootstrap, bootstrap_arg, run_until_signalled, setup_logging
from ferry.flags import add_flags, from_args

if TYPE_CHECKING:
    from workers.config import WorkerConfig


def register(sub: Any) -> None:
    w = sub.add_parser("worker", help="serve one deployment from a consumer group")
    w.defer(_add_flags)  # when `ferry worker` is used: no config import for other commands
    w.set_defaults(func=_worker)


def _add_flags(parser: argparse.ArgumentParser) -> None:
    from workers.config import WorkerConfig

    add_flags(parser, WorkerConfig, skip=("bootstrap", "metrics_port"))
    bootstrap_arg(parser)
    add_metrics_port(parser, "worker")


def _worker(args: argparse.Namespace) -> int:
    from workers.chat_template import ChatTemplateError
    from workers.config import WorkerConfig
    from workers.engine import Engine
    from workers.worker import Worker

    config = from_args(WorkerConfig, args, bootstrap=bootstrap(args),
                       metrics_port=args.metrics_port)
    if config.store is not None:
        from models.store import StoreError, open_version

        name, _, version = str(config.model_dir).partition("/")
        try:
            config = replace(config, model_dir=open_version(
                config.store, name, version, verify_hashes=config.verify_hashes))
        except StoreError as exc:  # refuse a corrupt or incomplete version, saying which file
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if config.tp * config.nnodes > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _launch_ranks(config)
    engine = Engine.from_dir(config.model_dir, device=config.device, dtype=config.dtype,
                             engine_config=config.engine_config())
    try:
        worker = Worker(config, engine)
    except ChatTemplateError as exc:  # a broken template stops the worker before it joins
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        asyncio.run(run_until_signalled(worker.run()))
    except MetricsPortError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _serve_ranks(config: "WorkerConfig", timeout_s: float) -> None:
    """One rank's process: rank 0 runs the Kafka worker, the others follow its batches."""
    from workers.ranks import serve_rank
    from workers.worker import Worker

    setup_logging()  # a spawned rank starts with a fresh interpreter

    def serve(engine) -> None:  # type: ignore[no-untyped-def]
        asyncio.run(run_until_signalled(Worker(config, engine).run()))

    serve_rank(config.model_dir, serve, timeout_s=timeout_s, device=config.device,
               dtype=config.dtype, engine_config=config.engine_config())


def _launch_ranks(config: "WorkerConfig") -> int:
    """Start this node's ranks (or, under torchrun, be one); stop all if one fails."""
    from workers.ranks import launch_local

    if "RANK" in os.environ:  # torchrun started us: this process is one rank
        _serve_ranks(config, config.tp_timeout)
        return 0
    procs = launch_local(config.tp, _serve_ranks, config, config.tp_timeout,
                         nnodes=config.nnodes, node_rank=config.node_rank,
                         master_addr=config.master_addr, master_port=config.master_port)

    def stop(*_: object) -> None:  # rank 0 (if on this node) shuts the followers down cleanly
        if procs[0].is_alive():
            os.kill(procs[0].pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while any(p.is_alive() for p in procs):
        failed = [p for p in procs if p.exitcode not in (None, 0)]
        if failed:
            logging.getLogger("ferry.worker").error(
                "rank process %d exited with %s: stopping the replica", failed[0].pid,
                failed[0].exitcode)
            for p in procs:
                if p.is_alive():
                    p.terminate()
            break
        procs[0].join(timeout=0.2)
    for p in procs:
        p.join(timeout=config.tp_timeout)
        if p.is_alive():
            p.kill()
            p.join()
    return int(any(p.exitcode != 0 for p in procs))
