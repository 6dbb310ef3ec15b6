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

import logging
from typing import Any

from edge.tables import ControlTable, put
from schemas import SchemaError
from schemas.fields import from_dict
from schemas.tables import LIVE, STATUSES, DeploymentRecord, deployment_name
from schemas.topics import REGISTRY_TOPIC

__all__ = ["LIVE", "STATUSES", "DeploymentRecord", "Registry", "deployment_name", "publish",
           "read_registry"]

log = logging.getLogger("ferry.registry")


async def publish(bootstrap: str, record: DeploymentRecord) -> None:
    await put(bootstrap, REGISTRY_TOPIC, record.id, record)


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
        record = None
        if value is not None:
            try:
                record = from_dict(DeploymentRecord, value)
            except SchemaError as exc:  # a row that does not fit: skipped, said once
                log.warning("%s: record for %r ignored: %s", REGISTRY_TOPIC, key, exc)
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
