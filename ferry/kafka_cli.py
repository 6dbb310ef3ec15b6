"""`ferry kafka ...`: the local broker (plain, or secure with SCRAM and ACLs)."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from ferry import kafka_acls
from ferry.broker import (
    DEFAULT_PORT, DEFAULT_SECURE_PORT, LocalBroker, SecureBroker, default_data_dir,
    default_secure_data_dir,
)
from ferry.common import CliError
from schemas.topics import INGRESS_TOPIC


def register(sub: Any) -> None:
    kafka = sub.add_parser("kafka", help="the local Kafka broker (no Docker)")
    kafka.set_defaults(func=_kafka)
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
    tadd = tsub.add_parser("add", help="create NAME's principal and ACLs and its API key, "
                                       "both confined to one reply prefix; prints the "
                                       "credentials once")
    tadd.add_argument("name")
    tadd.add_argument("--reply-prefix", default=None,
                      help="its reply topics and consumer groups, for the principal and the "
                           "API key alike (default NAME.)")
    tadd.add_argument("--rpm", type=int, default=None, help="the API key's requests per minute")
    tadd.add_argument("--tpm", type=int, default=None, help="the API key's tokens per minute")
    tadd.add_argument("--no-api-key", action="store_true",
                      help="only the principal (a key made later with `ferry keys add NAME "
                           "--reply-prefix` must name the same prefix)")
    tremove = tsub.add_parser("remove", help="delete NAME's credentials and ACLs")
    tremove.add_argument("name")
    acl = ksub.add_parser("acl", help="ACLs of the secure broker")
    asub = acl.add_subparsers(dest="acl_action", required=True)
    for action in (*plain, kenv, tadd, tremove, asub.add_parser("list", help="every binding")):
        action.add_argument("--data", type=Path, default=None,
                            help=f"broker directory (default {default_data_dir()}; secure: "
                                 f"{default_secure_data_dir()})")


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
            exports = {"KAFKA_BOOTSTRAP": broker.bootstrap, **security.env()}
            if not args.no_api_key:  # one prefix for both: the router checks the key's
                exports["FERRY_API_KEY"] = asyncio.run(_tenant_key(broker, args, prefix))
            print(_exports(exports))
            print(f"(tenant {args.name}: writes {INGRESS_TOPIC}, reads {prefix}*"
                  + ("" if args.no_api_key else f"; its API key sends replies to {prefix}*")
                  + "; the password is not stored and will not be shown again)",
                  file=sys.stderr)
            return 0
        if broker.remove_tenant(args.name):
            print(f"removed tenant {args.name}")
            return 0
        print(f"no tenant {args.name}", file=sys.stderr)
        return 1
    except ValueError as exc:
        raise CliError(str(exc)) from None


async def _tenant_key(broker: SecureBroker, args: argparse.Namespace, prefix: str) -> str:
    """The tenant's API key, written to the keys table as the broker's admin."""
    from streams.routing.keys import add_key

    saved = {k: os.environ.get(k) for k in broker.env("admin")}
    os.environ.update(broker.env("admin"))
    try:
        return await add_key(broker.bootstrap, args.name, args.rpm, args.tpm,
                             reply_prefix=prefix)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _exports(env: dict[str, str]) -> str:
    return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
