"""Values of the compacted control tables: routes, shadow, API keys and tenants, the
deployment registry, quota buckets.

Each table is a compacted topic read whole by every router and gateway (`edge/tables.py`);
the key names the row, a record without a value deletes it. Writers build these records,
readers validate them (`schemas.fields.from_dict`) and skip (logging) a row that does not fit.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

from schemas.errors import SchemaError
from schemas.fields import spec

SCHEMA_VERSION = 1
# Deployment and alias names: topic-safe (a deployment's topic is ferry.requests.NAME), and
# `@` for NAME@VERSION of a deployed checkpoint.
NAME_PATTERN = r"^[a-zA-Z0-9._@-]{1,200}$"
DEPLOYMENT_PATTERN = r"^[a-zA-Z0-9._-]{1,200}$"


def _version() -> Any:
    return field(default=SCHEMA_VERSION, metadata=spec(
        "Version of this schema.", minimum=1, maximum=SCHEMA_VERSION))


def _updated_at() -> Any:
    return field(default_factory=time.time, metadata=spec(
        "Unix time the row was written.", minimum=0.0))


@dataclass(frozen=True)
class RouteRecord:
    """`ferry.routes`, key = the alias: its deployments and their weights."""

    alias: str = field(metadata=spec("The alias (its key).", pattern=NAME_PATTERN))
    weights: dict[str, int] = field(metadata=spec(
        "Deployment -> weight: its share is weight / sum of weights; 0 attaches it without "
        "traffic.", minProperties=1, propertyNames={"pattern": DEPLOYMENT_PATTERN},
        additionalProperties={"minimum": 0}))
    updated_at: float = _updated_at()
    schema_version: int = _version()

    def __post_init__(self) -> None:
        if not self.weights:
            raise SchemaError("weights", "must name at least one deployment")


@dataclass(frozen=True)
class ShadowRecord:
    """`ferry.shadow`, key = the alias: which candidates get a copy of its traffic."""

    candidates: list[str] = field(metadata=spec(
        "Candidate deployments; each gets every mirrored request on ferry.mirror.NAME.",
        minItems=1, items={"pattern": DEPLOYMENT_PATTERN}))
    percent: float = field(metadata=spec(
        "Share of the alias's requests mirrored (chosen by a hash of the request id).",
        exclusiveMinimum=0.0, maximum=100.0))
    updated_at: float = _updated_at()
    schema_version: int = _version()


@dataclass(frozen=True)
class ApiKeyRecord:
    """`ferry.keys`, key = `key:<key id>`: an API key, stored as its SHA-256 only."""

    tenant: str = field(metadata=spec("The tenant the key belongs to.",
                                      pattern=r"^[a-zA-Z0-9._-]{1,100}$"))
    sha256: str = field(metadata=spec("SHA-256 (hex) of the whole key fk_<id>_<secret>.",
                                      pattern=r"^[0-9a-f]{64}$"))
    created_at: float = field(default_factory=time.time, metadata=spec(
        "Unix time the key was made.", minimum=0.0))
    schema_version: int = _version()


@dataclass(frozen=True)
class TenantRecord:
    """`ferry.keys`, key = `tenant:<name>`: a tenant's limits."""

    rpm: int | None = field(default=None, metadata=spec(
        "Requests per minute; unset = unlimited.", minimum=1))
    tpm: int | None = field(default=None, metadata=spec(
        "Tokens (prompt + max_new_tokens) per minute; unset = unlimited.", minimum=1))
    reply_prefix: str | None = field(default=None, metadata=spec(
        "Reply topics the tenant may name besides ferry.results and ferry.replies.*; unset: "
        "any topic outside ferry.*.", pattern=r"^[a-zA-Z0-9._-]{1,100}$"))
    updated_at: float = _updated_at()
    schema_version: int = _version()


Status = Literal["pending", "loading", "rendered", "ready", "draining", "retired", "failed"]
# rendered: manifests written for someone else to apply (`--launcher manifests`); becomes
# ready when a worker answers, like loading, but is never failed for taking long.
STATUSES: tuple[str, ...] = get_args(Status)
LIVE = ("pending", "loading", "rendered", "ready", "draining")  # a worker runs (or may soon)


def deployment_name(name: str, version: str) -> str:
    """The topic-safe name of NAME@VERSION; also what version paths resolve to."""
    return f"{name}-{version}"


@dataclass(frozen=True)
class DeploymentRecord:
    """`ferry.registry`, key = NAME@VERSION: one deployed checkpoint and where it stands."""

    name: str = field(metadata=spec("Model name.", minLength=1, maxLength=100))
    version: str = field(metadata=spec("Version in the model store (the checkpoint).",
                                       minLength=1, maxLength=100))
    store_path: str = field(metadata=spec("STORE/NAME/VERSION it is served from."))
    status: Status = field(default="pending", metadata=spec(
        "pending -> loading (or rendered) -> ready -> draining -> retired, or failed; only "
        "ready deployments get new requests."))
    replicas: int = field(default=1, metadata=spec("Worker replicas.", minimum=1))
    times: dict[str, float] = field(default_factory=dict, metadata=spec(
        "Status -> unix time it was entered."))
    durations: dict[str, float] = field(default_factory=dict, metadata=spec(
        "Seconds each stage took: verify_s, upload_s, load_s."))
    restarts: int = field(default=0, metadata=spec("Replica restarts so far.", minimum=0))
    error: str | None = field(default=None, metadata=spec("Why it failed."))
    schema_version: int = _version()

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


@dataclass(frozen=True)
class QuotaState:
    """`<router app id>.quotas`, key = tenant: its token buckets when last charged."""

    at: float = field(metadata=spec("Unix time of the levels below."))
    r: float | None = field(default=None, metadata=spec(
        "Requests left in the rpm bucket (refills at rpm per minute up to rpm)."))
    t: float | None = field(default=None, metadata=spec(
        "Tokens left in the tpm bucket (refills at tpm per minute up to tpm)."))

