"""The worker's settings: one typed object, built from CLI flags and the environment."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from schemas.topics import mirror_topic, requests_topic, shadow_group, worker_group


@dataclass(frozen=True)
class WorkerConfig:
    model_dir: Path
    deployment: str
    bootstrap: str
    max_batch: int = 8             # requests per model batch
    max_wait_ms: float = 20.0      # longest a request waits for its batch to fill
    max_queued: int = 256          # admitted requests held before consuming pauses
    partitions: int = 4            # partitions of the request topic if the worker creates it
    max_message_bytes: int = 1_048_576  # results above this become result_too_large errors
    metrics_port: int | None = None     # None: no HTTP endpoint (the registry still counts)
    device: str = "cpu"
    dtype: str | None = None       # e.g. "bfloat16"; default: the checkpoint's
    shadow: bool = False           # a candidate: serve its mirror topic, answer on shadow results

    @property
    def topic(self) -> str:
        return mirror_topic(self.deployment) if self.shadow else requests_topic(self.deployment)

    @property
    def group(self) -> str:
        return shadow_group(self.deployment) if self.shadow else worker_group(self.deployment)

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())
