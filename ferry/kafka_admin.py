"""SCRAM users and ACLs on a secure cluster, through Kafka's Java Admin client.

aiokafka has no ACL or SCRAM calls, so `compose/kafka/FerryKafkaAdmin.java` (compiled
once against the broker's jars) does them: the spec goes in on stdin, so no password is on a
command line. The principal these calls run as needs ALTER on the cluster (the broker's
`admin`, a super user).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

from edge.kafka_clients import KafkaSecurity
from ferry import kafka_acls
from ferry.broker import ferry_home, fetch_jars, kafka_version

_HERE = Path(__file__).resolve().parents[1] / "compose" / "kafka"
SOURCE = _HERE / "FerryKafkaAdmin.java"
LOG4J = _HERE / "admin-log4j2.properties"
MECHANISM = "SCRAM-SHA-512"


class KafkaAdminError(RuntimeError):
    """The cluster refused (or could not be asked) an ACL or SCRAM change."""


def new_password() -> str:
    return secrets.token_hex(24)  # hex: nothing a JAAS line or --add-scram would need quoted


def jaas_config(security: KafkaSecurity) -> str:
    module = ("org.apache.kafka.common.security.plain.PlainLoginModule"
              if security.mechanism == "PLAIN"
              else "org.apache.kafka.common.security.scram.ScramLoginModule")
    return (f'{module} required username="{security.username}" '
            f'password="{security.password}";')


def java_client_properties(security: KafkaSecurity) -> dict[str, str]:
    """The Java client's properties for the settings aiokafka gets from client_options()."""
    props = {"security.protocol": security.protocol}
    if security.sasl:
        props.update({"sasl.mechanism": str(security.mechanism),
                      "sasl.jaas.config": jaas_config(security)})
    if security.tls and security.cafile:
        props.update({"ssl.truststore.type": "PEM", "ssl.truststore.location": security.cafile})
    return props


def _program(libs: Path) -> list[str]:
    """How to run FerryKafkaAdmin: compiled once per source version into FERRY_HOME (javac),
    else from source (a JDK's java compiles it on every run, seconds more)."""
    if shutil.which("javac") is None:
        return ["-cp", f"{libs}/*", str(SOURCE)]
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    classes = ferry_home() / "kafka-admin" / f"{kafka_version()}-{digest}"
    if not (classes / "FerryKafkaAdmin.class").exists():
        staging = classes.with_name(f"{classes.name}.partial-{os.getpid()}")
        subprocess.run(["javac", "-nowarn", "-cp", f"{libs}/*", "-d", str(staging), str(SOURCE)],
                       check=True, capture_output=True)
        try:
            staging.rename(classes)  # atomic: a half-compiled class is never taken for one
        except OSError:  # another process got there first
            shutil.rmtree(staging, ignore_errors=True)
    return ["-cp", f"{libs}/*{os.pathsep}{classes}", "FerryKafkaAdmin"]


def run_admin(bootstrap: str, security: KafkaSecurity, spec: dict[str, Any],
              timeout_s: float = 120.0) -> dict[str, Any]:
    """Run one FerryKafkaAdmin spec (see the Java file) as `security`'s principal."""
    libs = fetch_jars()
    payload = json.dumps({"bootstrap": bootstrap, "client": java_client_properties(security),
                          **spec})
    try:
        done = subprocess.run(
            ["java", f"-Dlog4j2.configurationFile={LOG4J}", "-XX:TieredStopAtLevel=1",
             "-Xshare:auto", *_program(libs)],
            input=payload, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise KafkaAdminError(f"kafka admin call to {bootstrap} took over {timeout_s:g}s") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise KafkaAdminError(f"kafka admin call to {bootstrap} failed: "
                              f"{lines[-1] if lines else f'exit {done.returncode}'}")
    return json.loads(done.stdout or "{}")


def set_up_components(bootstrap: str, admin: KafkaSecurity,
                      passwords: dict[str, str]) -> None:
    """SCRAM credentials for every component in `passwords` and every component's ACLs."""
    run_admin(bootstrap, admin, {
        "upsert_scram": [{"user": name, "password": pw, "mechanism": MECHANISM}
                         for name, pw in passwords.items()],
        "create_acls": kafka_acls.component_bindings()})


def list_acls(bootstrap: str, admin: KafkaSecurity) -> list[dict[str, str]]:
    return run_admin(bootstrap, admin, {"describe_acls": True})["acls"]


def add_tenant(bootstrap: str, admin: KafkaSecurity, tenant: str,
               reply_prefix: str | None = None) -> tuple[str, str]:
    """Create (or re-key) tenant principal `tenant` with its ACLs; returns (password,
    reply prefix). The password is not stored anywhere: it is shown once."""
    kafka_acls.check_tenant(tenant)
    prefix = reply_prefix or kafka_acls.default_reply_prefix(tenant)
    existing = kafka_acls.tenant_prefixes(list_acls(bootstrap, admin))
    if tenant in existing and existing[tenant] != prefix:
        raise ValueError(f"tenant {tenant!r} already has reply prefix {existing[tenant]!r}; "
                         "`ferry kafka tenant remove` it first to change it")
    kafka_acls.check_reply_prefix(prefix, {t: p for t, p in existing.items() if t != tenant})
    password = new_password()
    run_admin(bootstrap, admin, {
        "upsert_scram": [{"user": tenant, "password": password, "mechanism": MECHANISM}],
        "create_acls": kafka_acls.tenant_bindings(tenant, prefix)})
    return password, prefix


def remove_tenant(bootstrap: str, admin: KafkaSecurity, tenant: str) -> bool:
    """Drop a tenant's credentials and ACLs (and the components' grants on its prefix);
    False when no such tenant has ACLs."""
    kafka_acls.check_tenant(tenant)
    found = run_admin(bootstrap, admin, {"describe_acls": True, "describe_users": True})
    prefix = kafka_acls.tenant_prefixes(found["acls"]).get(tenant)
    if prefix is None:
        return False
    answering = [b for b in kafka_acls.tenant_bindings(tenant, prefix)
                 if b["principal"] != f"User:{tenant}"]
    users = found.get("users", [])
    run_admin(bootstrap, admin, {
        "delete_scram": [{"user": tenant, "mechanism": MECHANISM}] if tenant in users else [],
        "delete_acls": [{"principal": f"User:{tenant}"}, *answering]})
    return True
