"""Launchers start and stop the worker replicas of a deployment; the deployer uses one.

One small interface, so a Kubernetes operator can replace the local launcher later:
- `LocalLauncher` (the default) runs `ferry worker` processes on this machine and supervises
  them: a replica that exits unasked is restarted with exponential backoff.
- `ManifestLauncher` renders a compose service and a Kubernetes Deployment per deployment
  into a directory (files to apply, not a running cluster).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Protocol

from streams.registry import DeploymentRecord

log = logging.getLogger("ferry.launcher")


class Launcher(Protocol):
    async def start(self, record: DeploymentRecord) -> None: ...
    async def stop(self, record: DeploymentRecord) -> None: ...
    def restarts(self, deployment: str) -> int: ...
    async def close(self) -> None: ...


def worker_args(record: DeploymentRecord, bootstrap: str) -> list[str]:
    """`ferry worker` arguments for one replica of a stored version."""
    store = str(Path(record.store_path).parent.parent)
    return ["worker", "--store", store, "--model", f"{record.name}/{record.version}",
            "--deployment", record.deployment, "--bootstrap", bootstrap]


class LocalLauncher:
    """Worker processes on this machine, restarted on crash (backoff 1 s doubling to 30 s)."""

    def __init__(self, bootstrap: str, log_dir: Path, extra_args: tuple[str, ...] = (),
                 backoff_s: tuple[float, float] = (1.0, 30.0)) -> None:
        self.bootstrap, self.log_dir, self.extra_args = bootstrap, log_dir, extra_args
        self.backoff_s = backoff_s
        self._replicas: dict[str, list[_Replica]] = {}

    async def start(self, record: DeploymentRecord) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "ferry.cli", *worker_args(record, self.bootstrap),
               *self.extra_args]
        replicas = [_Replica(cmd, self.log_dir / f"{record.deployment}.{i}.log",
                             self.backoff_s) for i in range(record.replicas)]
        self._replicas[record.deployment] = replicas
        for replica in replicas:
            replica.task = asyncio.create_task(replica.supervise(), name=record.deployment)

    async def stop(self, record: DeploymentRecord) -> None:
        await asyncio.gather(*(r.stop() for r in self._replicas.pop(record.deployment, [])))

    def restarts(self, deployment: str) -> int:
        return sum(r.restarts for r in self._replicas.get(deployment, []))

    def pids(self, deployment: str) -> list[int]:
        return [r.process.pid for r in self._replicas.get(deployment, [])
                if r.process is not None and r.process.returncode is None]

    async def close(self) -> None:
        replicas = [r for rs in self._replicas.values() for r in rs]
        self._replicas.clear()
        await asyncio.gather(*(r.stop() for r in replicas))


class _Replica:
    def __init__(self, cmd: list[str], log_file: Path, backoff_s: tuple[float, float]) -> None:
        self.cmd, self.log_file, self.backoff_s = cmd, log_file, backoff_s
        self.process: asyncio.subprocess.Process | None = None
        self.task: asyncio.Task | None = None
        self.restarts = 0
        self._stopping = False

    async def supervise(self) -> None:
        delay = self.backoff_s[0]
        while not self._stopping:
            started = time.monotonic()
            with self.log_file.open("ab") as out:
                self.process = await asyncio.create_subprocess_exec(
                    *self.cmd, stdout=out, stderr=asyncio.subprocess.STDOUT)
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
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


COMPOSE = """\
services:
  {deployment}:
    image: ferry-worker:latest
    command: {command}
    deploy:
      replicas: {replicas}
    volumes:
      - {store}:{store}:ro
"""

KUBERNETES = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {deployment}
  labels: {{app: ferry-worker, ferry/model: {name}, ferry/version: {version}}}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{ferry/deployment: {deployment}}}
  template:
    metadata:
      labels: {{ferry/deployment: {deployment}}}
    spec:
      containers:
        - name: worker
          image: ferry-worker:latest
          args: {command}
          volumeMounts: [{{name: models, mountPath: {store}, readOnly: true}}]
      volumes:
        - name: models
          persistentVolumeClaim: {{claimName: ferry-models, readOnly: true}}
"""


class ManifestLauncher:
    """Writes `DEPLOYMENT.compose.yml` and `DEPLOYMENT.k8s.yaml` into a directory."""

    def __init__(self, bootstrap: str, out_dir: Path) -> None:
        self.bootstrap, self.out_dir = bootstrap, out_dir

    async def start(self, record: DeploymentRecord) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        args = worker_args(record, self.bootstrap)
        fields = {"deployment": record.deployment, "name": record.name,
                  "version": record.version, "replicas": record.replicas,
                  "store": str(Path(record.store_path).parent.parent),
                  "command": "[" + ", ".join(f'"{a}"' for a in ["ferry", *args]) + "]"}
        (self.out_dir / f"{record.deployment}.compose.yml").write_text(COMPOSE.format(**fields))
        fields["command"] = "[" + ", ".join(f'"{a}"' for a in args) + "]"
        (self.out_dir / f"{record.deployment}.k8s.yaml").write_text(KUBERNETES.format(**fields))

    async def stop(self, record: DeploymentRecord) -> None:
        for suffix in ("compose.yml", "k8s.yaml"):
            (self.out_dir / f"{record.deployment}.{suffix}").unlink(missing_ok=True)

    def restarts(self, deployment: str) -> int:
        return 0

    async def close(self) -> None:
        return None
