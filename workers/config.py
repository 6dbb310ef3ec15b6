"""The worker's settings: one typed object, built from CLI flags and the environment."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from schemas.topics import mirror_topic, requests_topic, shadow_group, worker_group
from workers.engine import EngineConfig


@dataclass(frozen=True)
class WorkerConfig:
    model_dir: Path
    deployment: str
    bootstrap: str
    max_num_seqs: int = 64         # rows the engine decodes at once
    max_num_batched_tokens: int = 512  # tokens per engine step (decodes + prefill chunks)
    kv_cache_gb: float = 2.0       # KV cache of this rank (blocks are allocated on demand)
    prefix_caching: bool = True    # share KV blocks of equal prompt prefixes
    max_queued: int = 256          # admitted requests held before consuming pauses
    # A killed member's partitions move to the others after the session timeout (6 s is
    # the broker's minimum by default: group.min.session.timeout.ms); heartbeats tell live
    # members of a rebalance, so a short interval ends one sooner.
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 500
    # Static group membership (KIP-345): a member restarted with the same id within the
    # session timeout gets its partitions back with no rebalance. Such a member does not
    # leave the group when it stops: its partitions wait for the session timeout.
    group_instance_id: str | None = None
    # How long a transaction may stay open before the broker aborts it (and fences its
    # producer); ours last one batch's sends and commit, milliseconds.
    transaction_timeout_ms: int = 60_000
    partitions: int = 4            # partitions of the request topic if the worker creates it
    max_message_bytes: int = 1_048_576  # results above this become result_too_large errors
    metrics_port: int | None = None     # None: no HTTP endpoint (the registry still counts)
    device: str = "cpu"
    dtype: str | None = None       # e.g. "bfloat16"; default: the checkpoint's
    shadow: bool = False           # a candidate: serve its mirror topic, answer on shadow results
    # Answers and the commit point in one transaction per input partition: read_committed
    # consumers see each request answered once, whatever crashes (workers/transactions.py).
    # Off: plain acked sends, a crash may answer a request twice.
    exactly_once: bool = True

    def __post_init__(self) -> None:
        if self.exactly_once and self.max_queued > 400:
            raise ValueError("max_queued: at most 400 with exactly-once (the offsets in flight "
                             "travel in the commit's metadata, at most 4 KB)")
    chat_template: Path | None = None  # Jinja file used instead of the model's chat template

    def engine_config(self) -> EngineConfig:
        return EngineConfig(max_num_seqs=self.max_num_seqs,
                            max_num_batched_tokens=self.max_num_batched_tokens,
                            kv_cache_bytes=int(self.kv_cache_gb * (1 << 30)),
                            enable_prefix_caching=self.prefix_caching)

    @property
    def topic(self) -> str:
        return mirror_topic(self.deployment) if self.shadow else requests_topic(self.deployment)

    @property
    def group(self) -> str:
        return shadow_group(self.deployment) if self.shadow else worker_group(self.deployment)

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())
