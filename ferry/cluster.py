"""A local multi-node Apache Kafka cluster (KRaft, each node broker+controller) without Docker.

For the fault suite: nodes are killed with SIGKILL and restarted while clients keep working.
It reuses `ferry/broker.py`'s jars, JVM flags and readiness check; every node has its own
ports and directory, so it never touches the dev broker (`ferry kafka up`, :9092).

A node may also expose a second listener, EXTERNAL, advertised at another address (a TCP
proxy the caller controls): clients that bootstrap there learn only proxied addresses, so
cutting the proxy partitions them from the cluster while other clients carry on.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

from ferry.broker import LocalBroker, _pid_alive, _wait_ready, fetch_jars, free_port
from schemas.topics import DEFAULT_PARTITIONS

log = logging.getLogger("ferry.cluster")

_NODE_PROPERTIES = """\
process.roles=broker,controller
node.id={node_id}
controller.quorum.voters={voters}
listeners={listeners}
advertised.listeners={advertised}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,EXTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data}
num.partitions={partitions}
# Replication follows the cluster: topics (Ferry creates its own with the broker's default)
# and the internal ones get every node, acks=all needs two in sync.
default.replication.factor={rf}
min.insync.replicas={min_isr}
offsets.topic.replication.factor={rf}
offsets.topic.num.partitions=4
transaction.state.log.replication.factor={rf}
transaction.state.log.min.isr={min_isr}
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor={rf}
share.coordinator.state.topic.min.isr={min_isr}
group.initial.rebalance.delay.ms=0
# A killed node is fenced (its leaderships move) after this, not after the default 9 s.
broker.session.timeout.ms=4000
broker.heartbeat.interval.ms=1000
"""


@dataclass
class ClusterNode:
    node_id: int
    port: int
    controller_port: int
    data_dir: Path
    external_port: int | None = None       # the EXTERNAL listener, if any
    external_advertised: str | None = None  # what it advertises (host:port of a proxy)
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and _pid_alive(self.proc.pid)


@dataclass
class LocalCluster:
    """`size` KRaft nodes on 127.0.0.1, files under `data_dir`; `extra` lines are appended to
    every node's server.properties (e.g. group or transaction timeouts for a test)."""

    data_dir: Path
    size: int = 3
    partitions: int = DEFAULT_PARTITIONS
    heap: str = "384m"
    extra: str = ""
    external: dict[int, str] = field(default_factory=dict)  # node id -> advertised host:port
    nodes: list[ClusterNode] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.nodes = [ClusterNode(i + 1, free_port(), free_port(), self.data_dir / f"node-{i + 1}",
                                  free_port() if i + 1 in self.external else None,
                                  self.external.get(i + 1))
                      for i in range(self.size)]

    @property
    def bootstrap(self) -> str:
        return ",".join(n.bootstrap for n in self.nodes)

    def node(self, node_id: int) -> ClusterNode:
        return self.nodes[node_id - 1]

    def up(self, timeout: float = 120.0) -> str:
        """Format every node (once), start them all, wait until each answers metadata."""
        libs = fetch_jars()
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        for node in self.nodes:
            config = self._write_config(node)
            if not (node.data_dir / "data" / "meta.properties").exists():
                subprocess.run(
                    ["java", "-cp", f"{libs}/*", *self._jvm_flags(node),
                     "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
                     "-c", str(config)], check=True, stdout=subprocess.DEVNULL)
        for node in self.nodes:
            self.start(node.node_id)
        try:
            asyncio.run(self.wait_ready(timeout))
        except BaseException:
            self.down()
            raise
        log.info("kafka cluster of %d up at %s", self.size, self.bootstrap)
        return self.bootstrap

    def start(self, node_id: int) -> None:
        """Start one node's JVM (not waiting for it: see `wait_ready`)."""
        node = self.node(node_id)
        assert not node.alive, f"node {node_id} is running"
        libs = fetch_jars()
        with open(node.data_dir / "broker.log", "ab") as out:
            node.proc = subprocess.Popen(
                ["java", f"-Xms{self.heap}", f"-Xmx{self.heap}", *self._jvm_flags(node),
                 "-cp", f"{libs}/*", "kafka.Kafka", str(node.data_dir / "server.properties")],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

    async def wait_ready(self, timeout: float = 120.0, node_id: int | None = None) -> None:
        """Each node (or `node_id`) answers metadata, and lists every node as a broker (a
        topic with one replica per node cannot be created before)."""
        nodes = self.nodes if node_id is None else [self.node(node_id)]
        await asyncio.gather(*(_wait_ready(n.bootstrap, n.proc, timeout) for n in nodes))
        deadline = time.monotonic() + timeout
        while True:
            admin = AIOKafkaAdminClient(bootstrap_servers=nodes[0].bootstrap)
            try:
                await admin.start()
                if len((await admin.describe_cluster())["brokers"]) == self.size:
                    return
            finally:
                await admin.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"not every node of {self.bootstrap} registered in {timeout}s")
            await asyncio.sleep(0.2)

    def kill(self, node_id: int) -> None:
        """SIGKILL one node (no controlled shutdown: its leaderships move when it is fenced)."""
        node = self.node(node_id)
        assert node.proc is not None
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait(timeout=30)

    def down(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            if node.alive:
                assert node.proc is not None
                node.proc.terminate()
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait()

    def _jvm_flags(self, node: ClusterNode) -> list[str]:
        return LocalBroker(node.data_dir)._jvm_flags()  # same logging and JIT flags

    def _write_config(self, node: ClusterNode) -> Path:
        node.data_dir.mkdir(parents=True, exist_ok=True)
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        listeners = [f"PLAINTEXT://127.0.0.1:{node.port}"]
        advertised = [f"PLAINTEXT://127.0.0.1:{node.port}"]
        if node.external_port is not None:
            listeners.append(f"EXTERNAL://127.0.0.1:{node.external_port}")
            advertised.append(f"EXTERNAL://{node.external_advertised}")
        listeners.append(f"CONTROLLER://127.0.0.1:{node.controller_port}")
        rf = min(3, self.size)
        config = node.data_dir / "server.properties"
        config.write_text(_NODE_PROPERTIES.format(
            node_id=node.node_id, voters=voters, listeners=",".join(listeners),
            advertised=",".join(advertised), data=node.data_dir / "data",
            partitions=self.partitions, rf=rf, min_isr=min(2, rf)) + self.extra)
        return config
