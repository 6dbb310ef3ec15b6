"""A local Apache Kafka broker (KRaft, broker+controller in one JVM) without Docker.

The jars come from Maven Central through `compose/kafka/pom.xml` (Apache's download site is
out of reach here), are cached once under FERRY_HOME, and `kafka.Kafka` runs from them with
the machine's Java 17. State (pid, port) lives in the data directory, so `down` and
`status` find a broker started by another process.
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
    partitions: int = 4
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
                 "format", f"--cluster-id={cluster_id}", "-c", str(config)],
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
            asyncio.run(_wait_ready(self.bootstrap, proc, timeout))
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


async def _wait_ready(bootstrap: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kafka broker exited with {proc.returncode}; see its log")
        if not _port_open(bootstrap):
            await asyncio.sleep(0.2)
            continue
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
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
