"""`ferry`: the one command for users and operators."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import shlex
import signal
import sys
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from aiokafka.errors import KafkaConnectionError

from edge.metrics_server import MetricsPortError, add_metrics_port
from ferry import kafka_acls
from ferry.flags import add_flags, describe, from_args
from ferry.broker import (
    DEFAULT_PORT, DEFAULT_SECURE_PORT, LocalBroker, SecureBroker, default_bootstrap,
    default_data_dir, default_secure_data_dir,
)
from schemas.topics import INGRESS_TOPIC

if TYPE_CHECKING:
    from workers.config import WorkerConfig

log = logging.getLogger("ferry.cli")


def _bootstrap_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", default=None,
                        help="Kafka bootstrap servers (default: $KAFKA_BOOTSTRAP, else the "
                             "local broker of `ferry kafka up`)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferry", description="Kafka-native serving for LLMs")
    p.add_argument("--version", action="version", version=f"ferry {_version()}")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of a failure instead of one line")
    sub = p.add_subparsers(dest="command", required=True)

    kafka = sub.add_parser("kafka", help="the local Kafka broker (no Docker)")
    ksub = kafka.add_subparsers(dest="action", required=True)
    up = ksub.add_parser("up", help="fetch jars once, format storage, start, wait until ready")
    up.add_argument("--port", type=int, default=None,
                    help=f"default {DEFAULT_PORT} ({DEFAULT_SECURE_PORT} with --secure)")
    plain = [up, ksub.add_parser("down"), ksub.add_parser("status")]
    for action in plain:
        action.add_argument("--secure", action="store_true",
                            help="the SASL/SCRAM broker with ACLs (its own port and directory)")
    kenv = ksub.add_parser("env", help="shell exports that make a process connect to the "
                                       "secure broker as a principal")
    kenv.add_argument("principal", help="ferry-router, ferry-worker, ... or admin")
    tenant = ksub.add_parser("tenant", help="tenant principals of the secure broker")
    tsub = tenant.add_subparsers(dest="tenant_action", required=True)
    tadd = tsub.add_parser("add", help="create NAME's principal and ACLs; prints its "
                                       "credentials once")
    tadd.add_argument("name")
    tadd.add_argument("--reply-prefix", default=None,
                      help="its reply topics and consumer groups (default NAME.); give "
                           "`ferry keys add` the same")
    tremove = tsub.add_parser("remove", help="delete NAME's credentials and ACLs")
    tremove.add_argument("name")
    acl = ksub.add_parser("acl", help="ACLs of the secure broker")
    asub = acl.add_subparsers(dest="acl_action", required=True)
    for action in (*plain, kenv, tadd, tremove, asub.add_parser("list", help="every binding")):
        action.add_argument("--data", type=Path, default=None,
                            help=f"broker directory (default {default_data_dir()}; secure: "
                                 f"{default_secure_data_dir()})")

    from workers.config import WorkerConfig

    w = sub.add_parser("worker", help="serve one deployment from a consumer group")
    add_flags(w, WorkerConfig, skip=("bootstrap", "metrics_port"))
    _bootstrap_arg(w)
    add_metrics_port(w, "worker")

    model = sub.add_parser("model", help="checkpoints")
    msub = model.add_subparsers(dest="action", required=True)
    tiny = msub.add_parser("tiny", help="build a small random Llama checkpoint + tokenizer")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--hidden", type=int, default=64)

    push = msub.add_parser("push", help="upload a checkpoint to a model store, in parallel")
    push.add_argument("src", type=Path)
    push.add_argument("target", help="STORE/NAME/VERSION")
    push.add_argument("--parallel", type=int, default=4)
    push.add_argument("--chunk-mb", type=int, default=64)
    reshard = msub.add_parser("reshard", help="split a checkpoint into per-rank TP slices")
    reshard.add_argument("src", type=Path)
    reshard.add_argument("--tp", type=int, required=True)
    reshard.add_argument("--out", type=Path, required=True)
    merge = msub.add_parser("merge", help="per-rank TP partitions back to one HF checkpoint")
    merge.add_argument("src", type=Path)
    merge.add_argument("--out", type=Path, required=True)
    verify = msub.add_parser("verify", help="check every file of a stored version")
    verify.add_argument("target", help="STORE/NAME/VERSION")
    verify.add_argument("--sizes-only", action="store_true")

    send = sub.add_parser("send", help="post prompts to a deployment and print the results")
    send.add_argument("prompts", nargs="+")
    send.add_argument("--model", required=True, help="deployment name")
    _bootstrap_arg(send)
    send.add_argument("--max-new-tokens", type=int, default=16)
    send.add_argument("--temperature", type=float, default=0.0)
    send.add_argument("--seed", type=int, default=None)
    send.add_argument("--timeout", type=float, default=60.0)
    send.add_argument("--stream", action="store_true",
                      help="print each prompt's text as it is generated, then its result")

    from streams.front.gateway import GatewaySettings

    gw = sub.add_parser("gateway", help="OpenAI-compatible HTTP gateway over Kafka")
    add_flags(gw, GatewaySettings)
    add_metrics_port(gw, "gateway")
    _bootstrap_arg(gw)

    canary = sub.add_parser("canary", help="shift an alias to a deployment step by step; roll "
                                           "back on worse errors or latency")
    canary.add_argument("alias")
    canary.add_argument("--to", required=True, metavar="DEPLOYMENT")
    canary.add_argument("--steps", default="5,25,50,100", help="percents for --to, ending at 100")
    canary.add_argument("--every", default="60s", help="watch time per step: 60s, 2m, 1.5")
    canary.add_argument("--max-error-margin", type=float, default=0.05,
                        help="roll back if new error rate > old + this (absolute)")
    canary.add_argument("--max-p99-ratio", type=float, default=1.5,
                        help="roll back if new p99 latency > old p99 x this")
    canary.add_argument("--min-requests", type=int, default=10,
                        help="results a side needs in a step before it is judged")
    _bootstrap_arg(canary)

    from ferry import control_cli, deploy_cli, shadow_cli

    control_cli.add_parsers(sub, _bootstrap_arg)
    deploy_cli.add_parsers(sub, _bootstrap_arg)
    control_cli.add_shadow_parsers(shadow_cli.add_parsers(sub, _bootstrap_arg), _bootstrap_arg)

    # Listed for --help; `main` hands its arguments to models.trainer unparsed.
    sub.add_parser("train", help="train a tiny model, writing a checkpoint every N steps "
                                 "(ferry train OUT --steps 300 --every 100; --help for more)")

    top = sub.add_parser("top", help="live view: deployments (status, lag, rates, p99s) and "
                                     "aliases (weights, shadow), refreshed in place")
    top.add_argument("--metrics", action="append", default=None, metavar="URL",
                     help="a component's /metrics (repeat; default the local worker, router "
                          "and gateway ports)")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    _bootstrap_arg(top)

    demo = sub.add_parser("demo", help="the whole pipeline on a local broker and a small model")
    demo.add_argument("--requests", type=int, default=8)

    schemas = sub.add_parser("schemas", help="message contract")
    ssub = schemas.add_subparsers(dest="action", required=True)
    export = ssub.add_parser("export", help="write the JSON Schema files and the AsyncAPI "
                                           "document (schemas/json/)")
    export.add_argument("out", type=Path, nargs="?", default=None)
    return p


def _kafka(args: argparse.Namespace) -> int:
    secure = getattr(args, "secure", True)  # env, tenant, acl: the secure broker's
    if not secure:
        broker: LocalBroker = LocalBroker(args.data or default_data_dir(),
                                          port=getattr(args, "port", None) or DEFAULT_PORT)
    else:
        broker = SecureBroker(args.data or default_secure_data_dir(),
                              port=getattr(args, "port", None) or DEFAULT_SECURE_PORT)
    if args.action == "up":
        print(f"bootstrap={broker.up()}")
        if isinstance(broker, SecureBroker):
            print(f"# credentials: {broker.credentials_file} (0600); each component's exports:")
            for principal in kafka_acls.COMPONENTS:
                print(f"{_exports(broker.env(principal))}  # {principal}")
    elif args.action == "down":
        print("stopped" if broker.down() else "not running")
    elif args.action == "status":
        state = broker.state()
        print(f"running pid={state['pid']} bootstrap=127.0.0.1:{state['port']}" if state
              else "not running")
        return 0 if state else 1
    elif args.action == "env":
        assert isinstance(broker, SecureBroker)
        running = broker.state()
        if running:
            broker.port = running["port"]
        try:
            print(_exports(broker.env(args.principal)))
        except ValueError as exc:
            raise CliError(str(exc)) from None
    elif args.action == "tenant":
        assert isinstance(broker, SecureBroker)
        return _kafka_tenant(args, broker)
    else:  # acl list
        assert isinstance(broker, SecureBroker)
        for b in sorted(broker.acls(), key=lambda b: (b["principal"], b["resource_type"],
                                                       b["name"], b["operation"])):
            print(f"{b['principal']:24} {b['operation']:16} {b['resource_type']:16} "
                  f"{b['pattern'].lower():8} {b['name']}")
    return 0


def _kafka_tenant(args: argparse.Namespace, broker: SecureBroker) -> int:
    try:
        if args.tenant_action == "add":
            security, prefix = broker.add_tenant(args.name, args.reply_prefix)
            print(_exports({"KAFKA_BOOTSTRAP": broker.bootstrap, **security.env()}))
            print(f"(tenant {args.name}: writes {INGRESS_TOPIC}, reads {prefix}*; the password "
                  "is not stored and will not be shown again; give `ferry keys add "
                  f"{args.name}` --reply-prefix {prefix})", file=sys.stderr)
            return 0
        if broker.remove_tenant(args.name):
            print(f"removed tenant {args.name}")
            return 0
        print(f"no tenant {args.name}", file=sys.stderr)
        return 1
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _exports(env: dict[str, str]) -> str:
    return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())


async def _run_until_signalled(coro) -> None:  # type: ignore[no-untyped-def]
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass


def _worker(args: argparse.Namespace) -> int:
    from workers.chat_template import ChatTemplateError
    from workers.config import WorkerConfig
    from workers.engine import Engine
    from workers.worker import Worker

    config = from_args(WorkerConfig, args, bootstrap=args.bootstrap or default_bootstrap(),
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
        asyncio.run(_run_until_signalled(worker.run()))
    except MetricsPortError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _serve_ranks(config: "WorkerConfig", timeout_s: float) -> None:
    """One rank's process: rank 0 runs the Kafka worker, the others follow its batches."""
    from workers.ranks import serve_rank
    from workers.worker import Worker

    _setup_logging()  # a spawned rank starts with a fresh interpreter

    def serve(engine) -> None:  # type: ignore[no-untyped-def]
        asyncio.run(_run_until_signalled(Worker(config, engine).run()))

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


def _gateway(args: argparse.Namespace) -> int:
    from streams.front.gateway import GatewaySettings, serve

    bootstrap = args.bootstrap or default_bootstrap()
    settings = from_args(GatewaySettings, args)
    log.info("gateway config: bootstrap=%s metrics_port=%s %s", bootstrap, args.metrics_port,
             describe(settings))
    try:
        asyncio.run(_run_until_signalled(serve(
            bootstrap, settings.port, settings.host, settings,
            max_body_bytes=settings.max_body_bytes, header_timeout_s=settings.header_timeout_s,
            max_connections=settings.max_connections, metrics_port=args.metrics_port,
            metrics_route=False)))  # tenants' names are not for callers to read
    except MetricsPortError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _canary(args: argparse.Namespace) -> int:
    from streams.rollout.canary import CanaryPolicy, parse_seconds, run_canary

    try:
        policy = CanaryPolicy(
            steps=[int(s) for s in args.steps.split(",")], every_s=parse_seconds(args.every),
            max_error_rate_margin=args.max_error_margin, max_p99_ratio=args.max_p99_ratio,
            min_requests=args.min_requests)
        outcome = asyncio.run(run_canary(args.bootstrap or default_bootstrap(), args.alias,
                                         args.to, policy, log_fn=print))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if outcome.status == "rolled_back":
        print(f"rolled back at {outcome.step}%: {outcome.reason}; route restored to "
              f"{outcome.weights}")
        return 1
    print(f"completed: {args.alias} -> {outcome.weights}")
    return 0


def _send(args: argparse.Namespace) -> int:
    from edge.topic_admin import list_topics
    from schemas import Delta, Request, encode, requests_topic
    from streams.front.client import FerryClient

    bootstrap = args.bootstrap or default_bootstrap()

    async def go() -> int:
        # Never create a topic for a typo or an alias (the router resolves aliases).
        topic = requests_topic(args.model)
        if topic not in await list_topics(bootstrap):
            raise CliError(f"no deployment {args.model!r} (no topic {topic}): `ferry "
                           "deployments` lists them; an alias is served through the router "
                           "(`ferry gateway`, or post to ferry.ingress)")
        failed = 0
        async with FerryClient(bootstrap) as client:
            requests = [Request(id=uuid.uuid4().hex, model=args.model, prompt=prompt,
                                max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, seed=args.seed)
                        for prompt in args.prompts]
            if args.stream:
                for request in requests:
                    async for event in client.stream(request, args.timeout):
                        if isinstance(event, Delta):
                            print(event.text, end="", flush=True)
                        else:
                            print("\n" + encode(event).decode())
                            failed += event.error is not None
                return int(failed > 0)
            futures = [await client.submit(request) for request in requests]
            try:
                results = await asyncio.wait_for(asyncio.gather(*futures), args.timeout)
            except TimeoutError:
                raise CliError(f"no result within {args.timeout:g}s: is a worker serving "
                               f"{args.model!r}? (`ferry deployments`)") from None
            for result in results:
                print(encode(result).decode())
                failed += result.error is not None
            return int(failed > 0)  # an error result is a failed send

    return asyncio.run(go())


def _model(args: argparse.Namespace) -> int:
    from models.store import StoreError, parse_target, push, verify

    try:
        if args.action == "tiny":
            from models.factory import build_tiny_checkpoint

            print(build_tiny_checkpoint(args.out, seed=args.seed, num_hidden_layers=args.layers,
                                        hidden_size=args.hidden))
        elif args.action == "push":
            manifest = push(args.src, args.target, parallel=args.parallel,
                            chunk_bytes=args.chunk_mb << 20, progress=_progress_bar())
            size = sum(f.size for f in manifest.files)
            print(f"\npublished {args.target}: {len(manifest.files)} files, {size / 2**20:.1f} MiB")
        elif args.action == "reshard":
            from workers.reshard import reshard

            print(reshard(args.src, args.tp, args.out))
        elif args.action == "merge":
            from workers.reshard import merge

            print(merge(args.src, args.out))
        elif args.action == "verify":
            store, name, version = parse_target(args.target)
            manifest = verify(store / name / version, full=not args.sizes_only)
            print(f"ok {args.target}: {len(manifest.files)} files verified")
    except (StoreError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _progress_bar():  # type: ignore[no-untyped-def]
    def show(done: int, total: int) -> None:
        pct = 100 * done / total if total else 100
        print(f"\r{done / 2**20:8.1f} / {total / 2**20:.1f} MiB ({pct:5.1f}%)", end="",
              file=sys.stderr, flush=True)
    return show


class _RetriedKafkaErrors(logging.Filter):
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


def _setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("FERRY_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:  # handler filters see child loggers too
        handler.addFilter(_RetriedKafkaErrors())


class CliError(Exception):
    """A failure the user can fix: printed as one line, exit status 2."""


def _version() -> str:
    try:
        return importlib.metadata.version("ferry")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from models.trainer import main as train_main

        return train_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.debug:
        return _dispatch(args)
    try:
        return _dispatch(args)
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


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "kafka":
        return _kafka(args)
    if args.command == "worker":
        return _worker(args)
    if args.command == "send":
        return _send(args)
    if args.command == "gateway":
        return _gateway(args)
    if args.command == "canary":
        return _canary(args)
    if args.command == "model":
        return _model(args)
    if args.command == "top":
        from ferry.top import DEFAULT_METRICS, run_top

        asyncio.run(_run_until_signalled(run_top(
            args.bootstrap or default_bootstrap(), args.metrics or DEFAULT_METRICS,
            args.interval, args.once)))
        return 0
    from ferry import control_cli, deploy_cli, shadow_cli

    for module in (control_cli, deploy_cli, shadow_cli):
        if (code := module.dispatch(args)) is not None:
            return code
    if args.command == "demo":
        from ferry.demo import run_demo

        return run_demo(args.requests)
    if args.command == "schemas":
        from schemas.export import JSON_DIR, write

        for path in write(args.out or JSON_DIR):
            print(path)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
