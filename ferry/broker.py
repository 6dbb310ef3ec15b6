"""A local Apache Kafka broker (KRaft, broker+controller in one JVM) without Docker.

The jars come from Maven Central through `compose/kafka/pom.xml` (Apache's download site is
out of reach here), are cached once under FERRY_HOME, and `kafka.Kafka` runs from them with
the machine's Java 17. State (pid, port) lives in the data directory, so `down` and
`status` find a broker started by another process.

Why one long module: the plain and the secure broker share the jar fetch, the storage
format and the start/stop protocol of one JVM.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

from edge.kafka_clients import KafkaSecurity, client_options
from schemas.topics import DEFAULT_PARTITIONS

log = logging.getLogger("ferry.broker")

POM = Path(__file__).resolve().parents[1] / "compose" / "kafka" / "pom.xml"
DEFAULT_PORT = 9092


def ferry_home() -> Path:
    return Path(os.environ.get("FERRY_HOME", Path.home() / ".ferry"))


def default_data_dir() -> Path:
    return ferry_home() / "broker"


def kafka_version() -> str:
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    if match is None:
        raise RuntimeError(f"{POM}: no <kafka.version> property")
    return match.group(1)


def fetch_jars() -> Path:
    """Resolve the broker's jars from Maven Central once; later calls reuse the cache."""
    libs = ferry_home() / "kafka-jars" / kafka_version()
    if libs.is_dir() and any(libs.glob("kafka_2.13-*.jar")):
        return libs
    if shutil.which("mvn") is None:
        raise RuntimeError("Maven (mvn) is needed once to fetch the Kafka jars: apt-get install maven")
    staging = libs.with_name(libs.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    log.info("fetching Apache Kafka %s jars from Maven Central into %s", kafka_version(), libs)
    subprocess.run(
        ["mvn", "-q", "-B", "-Dstyle.color=never", "-f", str(POM), "dependency:copy-dependencies",
         f"-DoutputDirectory={staging}", "-DincludeScope=runtime"],
        check=True,
    )
    staging.rename(libs)  # atomic: a half-fetched cache is never taken for a full one
    return libs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); /proc tells it apart.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


_SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data}
num.partitions={partitions}
# One broker: internal topics cannot be replicated, and few partitions start faster.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
"""

_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
"""


@dataclass
class LocalBroker:
    """One KRaft broker on 127.0.0.1, its files under `data_dir`."""

    data_dir: Path
    port: int = DEFAULT_PORT
    partitions: int = DEFAULT_PARTITIONS
    heap: str = "512m"
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "broker.log"

    @property
    def _state_file(self) -> Path:
        return self.data_dir / "broker.json"

    def state(self) -> dict | None:
        """{pid, port} of the running broker, or None when none runs from this directory."""
        try:
            state = json.loads(self._state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return state if _pid_alive(state["pid"]) else None

    def up(self, timeout: float = 90.0) -> str:
        """Start the broker (or find it running) and wait until it answers metadata."""
        running = self.state()
        if running:
            self.port = running["port"]
            return self.bootstrap
        libs = fetch_jars()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        classpath = f"{libs}/*"
        if not (self.data_dir / "data" / "meta.properties").exists():
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            subprocess.run(
                ["java", "-cp", classpath, *self._jvm_flags(), "kafka.tools.StorageTool",
                 "format", f"--cluster-id={cluster_id}", "-c", str(config),
                 *self._format_args()],
                check=True, stdout=subprocess.DEVNULL,
            )
        with open(self.log_file, "ab") as out:
            proc = subprocess.Popen(
                ["java", f"-Xms{self.heap}", f"-Xmx{self.heap}", *self._jvm_flags(),
                 "-cp", classpath, "kafka.Kafka", str(config)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the caller's terminal is not the broker's
            )
        self._proc = proc  # kept so `down` reaps it (an unreaped child warns on collection)
        self._state_file.write_text(json.dumps({"pid": proc.pid, "port": self.port}))
        try:
            asyncio.run(_wait_ready(self.bootstrap, proc, timeout, self.client_options()))
            self._set_up()
        except BaseException:
            self.down()
            raise
        log.info("kafka broker up at %s (pid %d, logs %s)", self.bootstrap, proc.pid, self.log_file)
        return self.bootstrap

    def down(self, timeout: float = 30.0) -> bool:
        """Stop the broker by its pid; True when one was running."""
        running = self.state()
        self._state_file.unlink(missing_ok=True)
        if not running:
            return False
        pid = running["pid"]
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.1)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        _reap(pid)
        if self._proc is not None:
            self._proc.wait(timeout=timeout)
            self._proc = None
        return True

    def client_options(self) -> dict:
        """aiokafka options for the broker's own checks (plaintext: none)."""
        return client_options(KafkaSecurity())

    def _format_args(self) -> list[str]:
        return []

    def _set_up(self) -> None:
        """After the broker answers, before `up` returns (a secure broker's principals)."""

    def _jvm_flags(self) -> list[str]:
        log4j = self.data_dir / "log4j2.properties"
        log4j.write_text(_LOG4J2.format(log=self.log_file))
        return [f"-Dlog4j2.configurationFile={log4j}", f"-Dkafka.logs.dir={self.data_dir}",
                "-XX:+UseG1GC", "-XX:TieredStopAtLevel=1", "-Xshare:auto"]

    def _write_config(self) -> Path:
        config = self.data_dir / "server.properties"
        config.write_text(_SERVER_PROPERTIES.format(
            port=self.port, controller_port=free_port(), data=self.data_dir / "data",
            partitions=self.partitions))
        return config


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: its own parent reaps it


def _port_open(bootstrap: str) -> bool:
    host, port = bootstrap.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


async def _wait_ready(bootstrap: str, proc: subprocess.Popen, timeout: float,
                      options: dict | None = None) -> None:
    """Wait until the broker answers metadata, connecting with `options` (aiokafka
    security settings; plaintext when none)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kafka broker exited with {proc.returncode}; see its log")
        if not _port_open(bootstrap):
            await asyncio.sleep(0.2)
            continue
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000,
                                    **(options or client_options(KafkaSecurity())))
        try:
            await admin.start()
            await admin.describe_cluster()
            return
        except Exception:  # not listening yet: any connection error means "try again"
            await asyncio.sleep(0.3)
        finally:
            await admin.close()
    raise TimeoutError(f"kafka broker at {bootstrap} did not answer within {timeout:.0f}s")


def default_bootstrap() -> str:
    """KAFKA_BOOTSTRAP, else the local broker started by `ferry kafka up`, else :9092."""
    if env := os.environ.get("KAFKA_BOOTSTRAP"):
        return env
    running = LocalBroker(default_data_dir()).state()
    port = running["port"] if running else DEFAULT_PORT
    return f"127.0.0.1:{port}"


# ---- the secure broker: SASL/SCRAM and ACLs ---------------------------------------------

DEFAULT_SECURE_PORT = 9094
SCRAM = "SCRAM-SHA-512"


def default_secure_data_dir() -> Path:
    return ferry_home() / "broker-secure"


# Appended to _SERVER_PROPERTIES: java.util.Properties keeps a key's last value, so these
# lines replace the plaintext listeners above.
_SECURE_PROPERTIES = """\
listeners=SASL_PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=SASL_PLAINTEXT://127.0.0.1:{port}
listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT
inter.broker.listener.name=SASL_PLAINTEXT
sasl.enabled.mechanisms={scram}
sasl.mechanism.inter.broker.protocol={scram}
listener.name.sasl_plaintext.{scram_lower}.sasl.jaas.config=\
org.apache.kafka.common.security.scram.ScramLoginModule required \
username="{admin}" password="{password}";
# The controller listener (loopback) takes the same admin with PLAIN: a controller cannot
# check SCRAM, whose credentials live in the metadata it serves. No anonymous principal.
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.sasl.enabled.mechanisms=PLAIN
listener.name.controller.plain.sasl.jaas.config=\
org.apache.kafka.common.security.plain.PlainLoginModule required \
username="{admin}" password="{password}" user_{admin}="{password}";
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:{admin}
"""


@dataclass
class SecureBroker(LocalBroker):
    """A LocalBroker that authenticates every client (SASL/SCRAM-SHA-512) and authorizes it
    (StandardAuthorizer, deny unless an ACL allows). The broker's `admin` (its only super
    user) is bootstrapped into the storage at format time; on start, every component of
    `ferry.kafka_acls` gets a SCRAM credential and its ACLs. Passwords are generated once
    and kept in `credentials.json` in the data directory (mode 0600)."""

    data_dir: Path = field(default_factory=default_secure_data_dir)
    port: int = DEFAULT_SECURE_PORT

    @property
    def credentials_file(self) -> Path:
        return self.data_dir / "credentials.json"

    def passwords(self) -> dict[str, str]:
        """principal -> password of the admin and every component (made on first use)."""
        from ferry import kafka_acls
        from ferry.kafka_admin import new_password

        try:
            stored = json.loads(self.credentials_file.read_text())
        except FileNotFoundError:
            if (self.data_dir / "data" / "meta.properties").exists():
                raise RuntimeError(f"{self.data_dir} holds a broker but no credentials.json: "
                                   "remove the directory to start afresh") from None
            stored = {}
        wanted = [kafka_acls.ADMIN, *kafka_acls.COMPONENTS]
        if missing := [p for p in wanted if p not in stored]:
            stored.update({p: new_password() for p in missing})
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.credentials_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump(stored, out, indent=1)
        return stored

    def security(self, principal: str = "admin") -> KafkaSecurity:
        """How `principal` (the admin or a component) connects."""
        passwords = self.passwords()
        if principal not in passwords:
            raise ValueError(f"principal {principal!r}: not one of {', '.join(passwords)} "
                             "(a tenant's password is shown once, by `ferry kafka tenant add`)")
        return KafkaSecurity("SASL_PLAINTEXT", SCRAM, principal, passwords[principal])

    def env(self, principal: str) -> dict[str, str]:
        """Environment variables that make a Ferry process connect as `principal`."""
        return {"KAFKA_BOOTSTRAP": self.bootstrap, **self.security(principal).env()}

    def client_options(self) -> dict:
        return client_options(self.security())

    def add_tenant(self, tenant: str, reply_prefix: str | None = None) -> tuple[KafkaSecurity, str]:
        """A tenant principal with its ACLs (`ferry.kafka_acls.tenant_grants`): its
        credentials (the password exists only in this return value) and reply prefix."""
        from ferry.kafka_admin import add_tenant

        password, prefix = add_tenant(self._running(), self.security(), tenant, reply_prefix)
        return KafkaSecurity("SASL_PLAINTEXT", SCRAM, tenant, password), prefix

    def remove_tenant(self, tenant: str) -> bool:
        from ferry.kafka_admin import remove_tenant

        return remove_tenant(self._running(), self.security(), tenant)

    def acls(self) -> list[dict[str, str]]:
        from ferry.kafka_admin import list_acls

        return list_acls(self._running(), self.security())

    def _running(self) -> str:
        running = self.state()
        if running is None:
            raise RuntimeError(f"no secure broker runs from {self.data_dir}: "
                               "`ferry kafka up --secure` starts one")
        self.port = running["port"]
        return self.bootstrap

    def _write_config(self) -> Path:
        config = super()._write_config()
        text = config.read_text()
        controller_port = re.search(r"^controller\.quorum\.voters=1@127\.0\.0\.1:(\d+)$", text,
                                    re.M).group(1)  # type: ignore[union-attr]
        fd = os.open(config, os.O_WRONLY | os.O_TRUNC, 0o600)  # it holds the admin password
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text + _SECURE_PROPERTIES.format(
                port=self.port, controller_port=controller_port, scram=SCRAM,
                scram_lower=SCRAM.lower(), admin="admin", password=self.passwords()["admin"]))
        return config

    def _format_args(self) -> list[str]:
        # Bootstrapped into the metadata log, so the broker can authenticate to itself.
        return ["--add-scram", f"{SCRAM}=[name=admin,password={self.passwords()['admin']}]"]

    def _set_up(self) -> None:
        from ferry import kafka_acls
        from ferry.kafka_admin import set_up_components

        passwords = self.passwords()
        set_up_components(self.bootstrap, self.security(),
                          {p: passwords[p] for p in kafka_acls.COMPONENTS})
        log.info("secure broker: %d component principals and their ACLs set up",
                 len(kafka_acls.COMPONENTS))
