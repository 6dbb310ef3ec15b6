"""Launchers start and stop the worker replicas of a deployment; the deployer uses one.

One small interface, so a Kubernetes operator can replace the local launcher later:
- `LocalLauncher` (the default) runs `ferry worker` processes on this machine and supervises
  them: a replica that exits unasked is restarted with exponential backoff.
- `ManifestLauncher` renders a compose service and a Kubernetes Deployment per deployment
  into a directory and runs nothing: whoever reads the directory applies them (the `apply`
  sidecar of the deployer pod in compose/k8s, or an operator: `kubectl apply -f DIR`,
  `docker compose -f compose/docker-compose.yml -f DIR/X.compose.yml up -d`). It says so
  (`runs_replicas` false), and the deployer records such a deployment as `rendered`: ready
  when a replica answers its probe, never failed for waiting.

What every replica gets besides its model (image, device, GPUs, resources, where the model
store is mounted from) is a `WorkerTemplate`, read from the deployer's environment: the
compose file's `environment`, the `ferry-config` ConfigMap in Kubernetes.

A replica connects to Kafka as the worker's principal, never as the deployer's: local ones
get the deployer's FERRY_KAFKA_* settings with each FERRY_WORKER_KAFKA_* in its place
(`worker_kafka_env`); rendered compose services get the same settings, username and password
as `${FERRY_WORKER_KAFKA_USERNAME}`/`${FERRY_WORKER_KAFKA_PASSWORD}` for compose to fill in;
Kubernetes ones as the static worker does: protocol and mechanism from the `ferry-config`
ConfigMap, username and password from the `ferry-worker-kafka` Secret.

Why one long module: the two launchers and the templates they render share one worker
command line and one set of Kafka settings; the tests check them against each other.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from edge.kafka_clients import KafkaSecurityError, security_from_env
from edge.metrics_server import free_port
from streams.routing.registry import DeploymentRecord

log = logging.getLogger("ferry.launcher")


class Launcher(Protocol):
    # True when `start` makes replicas run (so the deployer may time their loading out);
    # False when it only writes what someone else applies.
    runs_replicas: bool

    async def start(self, record: DeploymentRecord) -> None: ...
    async def stop(self, record: DeploymentRecord) -> None: ...
    def restarts(self, deployment: str) -> int: ...
    async def close(self) -> None: ...


def _version() -> str:
    try:
        return metadata.version("ferry")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0.1.0"


# What a rendered Kubernetes replica reads from the ConfigMap, and from the worker's Secret.
_CONFIG_VARS = ("KAFKA_BOOTSTRAP", "FERRY_KAFKA_SECURITY_PROTOCOL", "FERRY_KAFKA_SASL_MECHANISM")
_SECRET_VARS = ("FERRY_KAFKA_USERNAME", "FERRY_KAFKA_PASSWORD")

@dataclass(frozen=True)
class WorkerTemplate:
    """What every replica gets besides its model. Each field is read from the environment
    variable in its metadata; the defaults match compose/docker-compose.yml."""

    image: str = field(default=f"ferry:{_version()}-cuda", metadata={"env": "FERRY_IMAGE"})
    device: str = field(default="", metadata={"env": "FERRY_WORKER_DEVICE"})  # --device
    args: tuple[str, ...] = field(default=(), metadata={"env": "FERRY_WORKER_ARGS"})  # more flags
    gpus: int = field(default=0, metadata={"env": "FERRY_WORKER_GPUS"})  # nvidia.com/gpu each
    cpu: str = field(default="1", metadata={"env": "FERRY_WORKER_CPU"})  # request
    memory: str = field(default="4Gi", metadata={"env": "FERRY_WORKER_MEMORY"})  # request = limit
    metrics_port: int = field(default=9100, metadata={"env": "FERRY_WORKER_METRICS_PORT"})
    models_claim: str = field(default="ferry-models", metadata={"env": "FERRY_MODELS_CLAIM"})
    models_volume: str = field(default="models", metadata={"env": "FERRY_MODELS_VOLUME"})
    config_map: str = field(default="ferry-config", metadata={"env": "FERRY_CONFIG_MAP"})
    # Kafka for rendered compose replicas (Kubernetes ones read the ConfigMap).
    bootstrap: str = field(default="", metadata={"env": "FERRY_WORKER_BOOTSTRAP"})
    # FERRY_KAFKA_* of Kubernetes replicas (the worker's SCRAM principal, say).
    kafka_secret: str = field(default="ferry-worker-kafka",
                              metadata={"env": "FERRY_WORKER_SECRET"})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerTemplate:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f.metadata["env"], "").strip()
            if raw:
                values[f.name] = (int(raw) if isinstance(f.default, int) else
                                  tuple(shlex.split(raw)) if isinstance(f.default, tuple) else raw)
        return cls(**values)

    def worker_flags(self) -> list[str]:
        """The `ferry worker` flags every replica gets."""
        return [*(["--device", self.device] if self.device else []), *self.args]


KAFKA_ENV, WORKER_KAFKA_ENV = "FERRY_KAFKA_", "FERRY_WORKER_KAFKA_"


def _merged_kafka_env(env: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """The deployer's FERRY_KAFKA_* with each FERRY_WORKER_KAFKA_* in its place, and those."""
    own = {k: v for k, v in env.items() if k.startswith(KAFKA_ENV)}
    worker = {KAFKA_ENV + k.removeprefix(WORKER_KAFKA_ENV): v for k, v in env.items()
              if k.startswith(WORKER_KAFKA_ENV)}
    return {**own, **worker}, worker


def worker_kafka_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The FERRY_KAFKA_* settings a local worker connects with: the deployer's own, each
    replaced by its FERRY_WORKER_KAFKA_* (`FERRY_WORKER_KAFKA_USERNAME` for
    `FERRY_KAFKA_USERNAME`...). With SASL the worker's username and password must be given
    that way: a worker never connects as the deployer (whose ACLs are not a worker's)."""
    merged, worker = _merged_kafka_env(os.environ if env is None else env)
    if merged.get(f"{KAFKA_ENV}SECURITY_PROTOCOL", "").strip().upper().startswith("SASL_"):
        missing = [f"{WORKER_KAFKA_ENV}{name}" for name in ("USERNAME", "PASSWORD")
                   if not worker.get(KAFKA_ENV + name)]
        if missing:
            raise KafkaSecurityError(
                f"the deployer connects with SASL: set {' and '.join(missing)} for the "
                "workers it launches (the ferry-worker principal: `ferry kafka env "
                "ferry-worker`)")
    security_from_env(merged)  # usable: one error now rather than a crash-looping worker
    return merged


def compose_kafka_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """FERRY_KAFKA_* of a rendered compose replica: the settings of `worker_kafka_env`, the
    username and password as interpolations that `docker compose` fills in from its own
    FERRY_WORKER_KAFKA_USERNAME/PASSWORD: no credentials in the file (nor needed here)."""
    merged, _ = _merged_kafka_env(os.environ if env is None else env)
    settings = {k: v.replace("$", "$$") for k, v in merged.items()
                if k not in (f"{KAFKA_ENV}USERNAME", f"{KAFKA_ENV}PASSWORD")}
    protocol = merged.get(f"{KAFKA_ENV}SECURITY_PROTOCOL", "").strip().upper()
    if protocol.startswith("SASL_"):
        for name in ("USERNAME", "PASSWORD"):
            variable = f"{WORKER_KAFKA_ENV}{name}"
            settings[f"{KAFKA_ENV}{name}"] = f"${{{variable}:?set {variable}}}"
    return settings


def store_dir(record: DeploymentRecord) -> str:
    """The model store a stored version lives in (`STORE/NAME/VERSION`)."""
    return str(Path(record.store_path).parent.parent)


def worker_args(record: DeploymentRecord, bootstrap: str | None = None) -> list[str]:
    """`ferry worker` arguments for one replica of a stored version; without `bootstrap` the
    replica reads KAFKA_BOOTSTRAP from its environment."""
    args = ["worker", "--store", store_dir(record), "--model", f"{record.name}/{record.version}",
            "--deployment", record.deployment]
    return args + (["--bootstrap", bootstrap] if bootstrap else [])


class LocalLauncher:
    """Worker processes on this machine, restarted on crash (backoff 1 s doubling to 30 s)."""

    runs_replicas = True

    def __init__(self, bootstrap: str, log_dir: Path, extra_args: tuple[str, ...] | None = None,
                 backoff_s: tuple[float, float] = (1.0, 30.0)) -> None:
        self.bootstrap, self.log_dir = bootstrap, log_dir
        # No metrics port from the template: local replicas share one network namespace,
        # so each gets a free port of its own (logged, and in `metrics_ports`).
        self.extra_args = (tuple(WorkerTemplate.from_env().worker_flags())
                           if extra_args is None else extra_args)
        self.backoff_s = backoff_s
        # The deployer's environment, its Kafka principal swapped for the worker's.
        self.env = {**{k: v for k, v in os.environ.items()
                       if not k.startswith((KAFKA_ENV, WORKER_KAFKA_ENV))},
                    **worker_kafka_env()}
        self._replicas: dict[str, list[_Replica]] = {}

    async def start(self, record: DeploymentRecord) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "ferry.cli", *worker_args(record, self.bootstrap),
               *self.extra_args]
        replicas = [_Replica([*cmd, "--metrics-port", str(free_port())],
                             self.log_dir / f"{record.deployment}.{i}.log", self.backoff_s,
                             self.env)
                    for i in range(record.replicas)]
        log.info("%s: replicas' metrics on ports %s", record.deployment,
                 [r.metrics_port for r in replicas])
        self._replicas[record.deployment] = replicas
        for replica in replicas:
            replica.task = asyncio.create_task(replica.supervise(), name=record.deployment)

    async def stop(self, record: DeploymentRecord) -> None:
        await asyncio.gather(*(r.stop() for r in self._replicas.pop(record.deployment, [])))

    def restarts(self, deployment: str) -> int:
        return sum(r.restarts for r in self._replicas.get(deployment, []))

    def metrics_ports(self, deployment: str) -> list[int]:
        return [r.metrics_port for r in self._replicas.get(deployment, [])]

    def pids(self, deployment: str) -> list[int]:
        return [r.process.pid for r in self._replicas.get(deployment, [])
                if r.process is not None and r.process.returncode is None]

    async def close(self) -> None:
        replicas = [r for rs in self._replicas.values() for r in rs]
        self._replicas.clear()
        await asyncio.gather(*(r.stop() for r in replicas))


class _Replica:
    def __init__(self, cmd: list[str], log_file: Path, backoff_s: tuple[float, float],
                 env: dict[str, str] | None = None) -> None:
        self.cmd, self.log_file, self.backoff_s, self.env = cmd, log_file, backoff_s, env
        self.process: asyncio.subprocess.Process | None = None
        self.task: asyncio.Task | None = None
        self.restarts = 0
        self._stopping = False

    @property
    def metrics_port(self) -> int:
        return int(self.cmd[-1])  # appended last by LocalLauncher.start: it wins

    async def supervise(self) -> None:
        delay = self.backoff_s[0]
        while not self._stopping:
            started = time.monotonic()
            with self.log_file.open("ab") as out:
                self.process = await asyncio.create_subprocess_exec(
                    *self.cmd, stdout=out, stderr=asyncio.subprocess.STDOUT, env=self.env)
            code = await self.process.wait()
            if self._stopping:
                return
            if time.monotonic() - started > 60:
                delay = self.backoff_s[0]  # it ran a while: this crash starts a new series
            self.restarts += 1
            log.warning("worker %s exited with %s; restart %d in %.0fs (log %s)",
                        self.cmd[self.cmd.index("--deployment") + 1], code, self.restarts,
                        delay, self.log_file)
            await asyncio.sleep(delay)  # backoff: a crash loop must not spin
            delay = min(delay * 2, self.backoff_s[1])

    async def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping = True
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()  # the worker stops cleanly: uncommitted work is re-served
            try:
                await asyncio.wait_for(self.process.wait(), timeout_s)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


MANAGED_BY = "ferry-deployer"  # the label the deployer pod's applier prunes by
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def k8s_name(name: str) -> str:
    """`name` as a DNS-1123 label (Kubernetes names and label values, compose services):
    lower case, other characters as '-', plus a hash of the original when that changed it
    or it was too long, so two deployments never share a name."""
    if _NAME.fullmatch(name):
        return name
    safe = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:54].strip("-")
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{safe}-{digest}" if safe else f"d-{digest}"


def _http_probe(port: int, path: str) -> str:
    """A healthcheck for an image without curl: Python fetches the page or exits non-zero."""
    return (f"import urllib.request; "
            f"urllib.request.urlopen('http://localhost:{port}{path}', timeout=3)")


def kubernetes_deployment(record: DeploymentRecord, t: WorkerTemplate) -> dict[str, Any]:
    """A Deployment for the namespace of compose/k8s: bootstrap from the ConfigMap, the model
    store's claim mounted read-only, probes on the metrics port."""
    name, port = k8s_name(record.deployment), t.metrics_port
    labels = {"app.kubernetes.io/name": "ferry-worker", "app.kubernetes.io/part-of": "ferry",
              "app.kubernetes.io/managed-by": MANAGED_BY, "ferry/deployment": name}
    limits = {"memory": t.memory, **({"nvidia.com/gpu": str(t.gpus)} if t.gpus else {})}

    def probe(**timing: int) -> dict[str, Any]:
        return {"httpGet": {"path": "/metrics", "port": "metrics"}, "timeoutSeconds": 3,
                **timing}

    container = {
        "name": "worker", "image": t.image, "command": ["ferry"],
        "args": [*worker_args(record), "--metrics-port", str(port), *t.worker_flags()],
        # As the static worker: the stack's settings from the ConfigMap, the worker's
        # principal from its Secret (a pod without its credentials never starts).
        "env": [*({"name": var, "valueFrom": {"configMapKeyRef": {
                    "name": t.config_map, "key": var}}} for var in _CONFIG_VARS),
                *({"name": var, "valueFrom": {"secretKeyRef": {
                    "name": t.kafka_secret, "key": var, "optional": False}}}
                  for var in _SECRET_VARS)],
        "ports": [{"name": "metrics", "containerPort": port}],
        "resources": {"requests": {"cpu": t.cpu, "memory": t.memory}, "limits": limits},
        # The metrics port opens once the weights are loaded: startup allows a long load.
        "startupProbe": probe(periodSeconds=10, failureThreshold=90),
        "readinessProbe": probe(periodSeconds=10, failureThreshold=3),
        "livenessProbe": probe(periodSeconds=20, failureThreshold=3),
        "volumeMounts": [{"name": "models", "mountPath": store_dir(record), "readOnly": True}],
    }
    pod: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True},
        "terminationGracePeriodSeconds": 60,  # SIGTERM: the worker leaves its group cleanly
        "containers": [container],
        "volumes": [{"name": "models", "persistentVolumeClaim": {
            "claimName": t.models_claim, "readOnly": True}}]}
    if t.gpus:  # GPU nodes are commonly tainted so that only GPU work lands there
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists",
                               "effect": "NoSchedule"}]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": {**labels, "ferry/model": k8s_name(record.name),
                                              "ferry/version": k8s_name(record.version)},
                     "annotations": {"ferry/id": record.id}},
        "spec": {"replicas": record.replicas,
                 "selector": {"matchLabels": {"ferry/deployment": name}},
                 "template": {"metadata": {"labels": labels, "annotations": {
                     "prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                     "prometheus.io/path": "/metrics"}}, "spec": pod}}}


def compose_service(record: DeploymentRecord, t: WorkerTemplate, bootstrap: str,
                    kafka_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A service to add to compose/docker-compose.yml's project (same network, same store);
    `kafka_env` (`compose_kafka_env`) is its Kafka security."""
    port = t.metrics_port
    deploy: dict[str, Any] = {"replicas": record.replicas}
    if t.gpus:
        deploy["resources"] = {"reservations": {"devices": [
            {"driver": "nvidia", "count": t.gpus, "capabilities": ["gpu"]}]}}
    service = {
        "image": t.image,  # its ENTRYPOINT is `ferry`
        "command": [*worker_args(record), "--metrics-port", str(port), *t.worker_flags()],
        "environment": {"KAFKA_BOOTSTRAP": bootstrap, **(kafka_env or {})},
        "volumes": [f"{t.models_volume}:{store_dir(record)}:ro"],
        "labels": {"ferry.id": record.id},
        "restart": "unless-stopped",
        "healthcheck": {"test": ["CMD", "python", "-c", _http_probe(port, "/metrics")],
                        "interval": "10s", "timeout": "5s", "retries": 3,
                        "start_period": "15m"},  # the port opens once the weights are loaded
        "deploy": deploy,
    }
    return {"services": {k8s_name(record.deployment): service},
            "volumes": {t.models_volume: {}}}


def is_loopback(bootstrap: str) -> bool:
    """True when any server of a bootstrap list is this host only (useless to a container)."""
    for server in bootstrap.split(","):
        host = server.strip().rsplit(":", 1)[0].strip("[]")
        try:
            if ipaddress.ip_address(host).is_loopback or host == "0.0.0.0":
                return True
        except ValueError:
            if host == "localhost":
                return True
    return False


class ManifestLauncher:
    """Writes `DEPLOYMENT.compose.yml` and `DEPLOYMENT.k8s.yaml` into a directory, and
    deletes them when the deployment stops; applying them is someone else's job."""

    runs_replicas = False

    def __init__(self, bootstrap: str, out_dir: Path,
                 template: WorkerTemplate | None = None) -> None:
        self.out_dir = out_dir
        self.template = template or WorkerTemplate.from_env()
        # A replica never gets the deployer's own loopback address: it would be its own.
        self.compose_bootstrap = self.template.bootstrap or (
            "kafka:9092" if is_loopback(bootstrap) else bootstrap)
        self.kafka_env = compose_kafka_env()

    async def start(self, record: DeploymentRecord) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        header = f"# Rendered by the Ferry deployer for {record.id}; deleted when it retires.\n"
        self._write(record, "compose.yml", header + to_yaml(
            compose_service(record, self.template, self.compose_bootstrap, self.kafka_env)))
        self._write(record, "k8s.yaml", header + to_yaml(
            kubernetes_deployment(record, self.template)))

    def _write(self, record: DeploymentRecord, suffix: str, text: str) -> None:
        # Whole files only: an applier reading the directory never sees half of one.
        tmp = self.out_dir / f".{record.deployment}.{suffix}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.out_dir / f"{record.deployment}.{suffix}")

    async def stop(self, record: DeploymentRecord) -> None:
        for suffix in ("compose.yml", "k8s.yaml"):
            (self.out_dir / f"{record.deployment}.{suffix}").unlink(missing_ok=True)

    def restarts(self, deployment: str) -> int:
        return 0

    async def close(self) -> None:
        return None


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")


def to_yaml(value: dict[str, Any]) -> str:
    """Block YAML for mappings and lists of mappings, JSON (a subset of YAML) for scalars
    and lists of scalars: enough for manifests, without a YAML library at run time."""
    return "\n".join(_yaml_lines(value, "")) + "\n"


def _is_block(value: Any) -> bool:
    return bool(value) and (isinstance(value, dict) or (
        isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value)))


def _yaml_lines(value: Any, indent: str) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            name = key if _PLAIN_KEY.fullmatch(key) else json.dumps(key)
            if _is_block(item):
                yield f"{indent}{name}:"
                yield from _yaml_lines(item, indent + "  ")
            else:
                yield f"{indent}{name}: {json.dumps(item)}"
        return
    for item in value:
        if _is_block(item):
            first, *rest = _yaml_lines(item, indent + "  ")
            yield f"{indent}- {first.lstrip()}"
            yield from rest
        else:
            yield f"{indent}- {json.dumps(item)}"
