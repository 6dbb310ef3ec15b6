"""Event records: checkpoint events for the deployer, per-batch telemetry, shadow comparisons."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from schemas.errors import ErrorCode, SchemaError
from schemas.fields import spec
from schemas.tables import SCHEMA_VERSION


def _version() -> Any:
    return field(default=SCHEMA_VERSION, metadata=spec(
        "Version of this schema.", minimum=1, maximum=SCHEMA_VERSION))


@dataclass(frozen=True)
class CheckpointEvent:
    """`ferry.checkpoints`, key = the model: ask its deployer to deploy a checkpoint
    directory (`path`, a trainer announcing it) or a version already in the store
    (`store_path`, `ferry deploy`), or to retire a deployment (`ferry undeploy`)."""

    action: Literal["deploy", "undeploy"] = field(metadata=spec("What to do."))
    model: str = field(metadata=spec("The model: only its deployer acts on the event.",
                                     minLength=1, maxLength=100))
    path: str | None = field(default=None, metadata=spec(
        "deploy: a finished checkpoint directory the deployer can read."))
    version: str | None = field(default=None, metadata=spec(
        "deploy with path: the version to store it as (default: the directory's name).",
        minLength=1, maxLength=100))
    store_path: str | None = field(default=None, metadata=spec(
        "deploy: STORE/NAME/VERSION already pushed to the model store."))
    id: str | None = field(default=None, metadata=spec(
        "undeploy: the deployment NAME@VERSION.", pattern=r"^[^@]+@[^@]+$"))
    schema_version: int = _version()

    # What __post_init__ checks, for JSON Schema (schemas/fields.py); unset = absent or null.
    json_schema_rules: ClassVar[dict[str, Any]] = {
        "if": {"properties": {"action": {"const": "deploy"}}},
        "then": {"oneOf": [
            {"required": ["path"], "properties": {"path": {"type": "string"},
                                                  "store_path": {"type": "null"}}},
            {"required": ["store_path"], "properties": {"store_path": {"type": "string"},
                                                        "path": {"type": "null"}}}]},
        "else": {"required": ["id"], "properties": {"id": {"type": "string"}}}}

    def __post_init__(self) -> None:
        if self.action == "deploy" and (self.path is None) == (self.store_path is None):
            raise SchemaError("path", "deploy needs exactly one of path and store_path")
        if self.action == "undeploy" and self.id is None:
            raise SchemaError("id", "is required to undeploy")


@dataclass(frozen=True)
class Telemetry:
    """`ferry.telemetry`, key = the deployment: one record per batch of results a worker
    delivered, for canaries and dashboards; latencies_ms[i] and errors[i] are result i's."""

    deployment: str = field(metadata=spec("Deployment that served the batch.", minLength=1))
    at: float = field(metadata=spec("Unix time the batch was delivered.", minimum=0.0))
    latencies_ms: list[float] = field(metadata=spec(
        "Per result: from the request's creation to its delivery [results].",
        items={"minimum": 0.0}))
    errors: list[str | None] = field(metadata=spec(
        "Per result: its error code, or null for a success [results]."))
    schema_version: int = _version()

    def __post_init__(self) -> None:
        if len(self.latencies_ms) != len(self.errors):
            raise SchemaError("errors", f"must have one entry per latency "
                                        f"({len(self.latencies_ms)}), got {len(self.errors)}")


@dataclass(frozen=True)
class Comparison:
    """`ferry.comparisons`, key = the request id: a primary's result and a shadow
    candidate's for one request. Agreement fields compare tokens only when both succeeded
    (else exact_match false, common_prefix 0, overlap 0)."""

    id: str = field(metadata=spec("The request.", minLength=1))
    primary: str = field(metadata=spec("Deployment that answered the caller."))
    candidate: str = field(metadata=spec("Shadow deployment compared with it."))
    exact_match: bool = field(metadata=spec("The same output tokens."))
    common_prefix: int = field(metadata=spec("Output tokens equal from the start.", minimum=0))
    overlap: float = field(metadata=spec(
        "Multiset token overlap |a & b| / max(|a|, |b|), order ignored.", minimum=0.0,
        maximum=1.0))
    length_diff: int = field(metadata=spec("Candidate's output length minus the primary's."))
    primary_latency_ms: float = field(metadata=spec("Queue + inference time of the primary."))
    candidate_latency_ms: float = field(metadata=spec("The same for the candidate."))
    latency_diff_ms: float = field(metadata=spec("Candidate's minus the primary's."))
    at: float = field(metadata=spec("Unix time of the comparison."))
    primary_error: ErrorCode | None = field(default=None, metadata=spec(
        "The primary's error code, when it failed."))
    candidate_error: ErrorCode | None = field(default=None, metadata=spec(
        "The candidate's error code, when it failed."))
    candidate_logprob: float | None = field(default=None, metadata=spec(
        "The candidate's teacher-forced mean log-probability of the primary's output tokens "
        "(unset when it could not be scored)."))
    schema_version: int = _version()
