"""The deployment registry: one record per deployed checkpoint, in the compacted `ferry.registry`.

A deployment `NAME@VERSION` (e.g. `tiny@checkpoint-1200`) serves the store version
`STORE/NAME/VERSION` from the topic `ferry.requests.NAME-VERSION` (topic names have no `@`).
Its status moves pending -> loading (or rendered) -> ready -> draining -> retired (or
failed), each with the time it was entered, so `ferry deployments` and the measurements
read one place. Only a
`ready` deployment takes new requests from the gateway and the router; a `draining` one
answers what is already queued for it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from schemas.topics import REGISTRY_TOPIC
from streams.control import ControlTable, put

# rendered: manifests written for someone else to apply (`--launcher manifests`); becomes
# ready when a worker answers, like loading, but is never failed for taking long.
STATUSES = ("pending", "loading", "rendered", "ready", "draining", "retired", "failed")
LIVE = ("pending", "loading", "rendered", "ready", "draining")  # a worker runs (or may soon)


def deployment_name(name: str, version: str) -> str:
    """The topic-safe name of NAME@VERSION; also what version paths resolve to."""
    return f"{name}-{version}"


@dataclass(frozen=True)
class DeploymentRecord:
    name: str
    version: str
    store_path: str
    status: str = "pending"
    replicas: int = 1
    times: dict[str, float] = field(default_factory=dict)  # status -> unix time entered
    durations: dict[str, float] = field(default_factory=dict)  # verify/upload/load/ready s
    restarts: int = 0
    error: str | None = None

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def deployment(self) -> str:
        return deployment_name(self.name, self.version)

    def moved(self, status: str, **changes: Any) -> DeploymentRecord:
        assert status in STATUSES, status
        return replace(self, status=status, times={**self.times, status: time.time()},
                       **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeploymentRecord | None:
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except TypeError:
            return None


async def publish(bootstrap: str, record: DeploymentRecord) -> None:
    await put(bootstrap, REGISTRY_TOPIC, record.id, record.to_dict())


class Registry(ControlTable):
    """The live registry, keyed by NAME@VERSION and looked up by topic-safe name."""

    topic = REGISTRY_TOPIC

    def __init__(self, bootstrap: str) -> None:
        super().__init__(bootstrap)
        # Decoded once per change, not per lookup: the gateway and the router ask per request.
        self._records: dict[str, DeploymentRecord] = {}  # by topic-safe deployment name
        self.view.on_change.append(self._changed)

    def _changed(self, key: str, value: dict[str, Any] | None) -> None:
        name, _, version = key.partition("@")
        record = DeploymentRecord.from_dict(value) if value is not None else None
        if record is None:
            self._records.pop(deployment_name(name, version), None)
        else:
            self._records[record.deployment] = record

    def records(self) -> list[DeploymentRecord]:
        return list(self._records.values())

    def by_deployment(self, deployment: str) -> DeploymentRecord | None:
        return self._records.get(deployment)

    def accepts_new(self, deployment: str) -> bool:
        """Deployments the deployer manages take new requests only when ready; others (started
        by hand) are not in the registry and are judged by their topic alone."""
        record = self.by_deployment(deployment)
        return record is None or record.status == "ready"


async def read_registry(bootstrap: str) -> list[DeploymentRecord]:
    async with Registry.snapshot(bootstrap) as registry:
        return registry.records()
