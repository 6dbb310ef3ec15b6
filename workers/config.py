"""The worker's settings: one typed object, built from CLI flags and the environment.

Each field's default and help are written here once: `ferry worker`'s flags are generated
from them (`ferry/flags.py`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from schemas.topics import (DEFAULT_PARTITIONS, MAX_MESSAGE_BYTES, mirror_topic,
                            requests_topic, shadow_group, worker_group)
from workers.engine_config import EngineConfig

# Seconds before a dead or stalled rank stops the whole replica (`workers/tp.py` imports it:
# defined here, where `ferry worker --help` can read it without torch).
TP_TIMEOUT_S = 60.0
DEVICE = "cpu"  # the torch device a worker (and a replica's ranks) runs on by default


@dataclass(frozen=True)
class WorkerConfig:
    model_dir: Path = field(metadata={
        "flag": "--model", "help": "Hugging Face layout directory, or NAME/VERSION with --store"})
    deployment: str = field(metadata={"help": "the deployment served: its request topic and "
                                              "consumer group"})
    bootstrap: str = field(metadata={"help": "Kafka bootstrap servers"})
    max_num_seqs: int = field(default=EngineConfig.max_num_seqs, metadata={
        "help": "rows the engine decodes at once"})
    max_num_batched_tokens: int = field(default=EngineConfig.max_num_batched_tokens, metadata={
        "help": "tokens per engine step (decodes + prefill chunks)"})
    kv_cache_gb: float = field(default=EngineConfig.kv_cache_bytes / (1 << 30), metadata={
        "help": "KV cache per rank, in GiB (blocks are allocated on demand)"})
    prefix_caching: bool = field(default=EngineConfig.enable_prefix_caching, metadata={
        "help": "share KV blocks between prompts with equal prefixes"})
    max_queued: int = field(default=256, metadata={
        "help": "admitted requests held before consuming pauses (at most 400 with "
                "exactly-once)"})
    # A killed member's partitions move to the others after the session timeout (6 s is
    # the broker's minimum by default: group.min.session.timeout.ms); heartbeats tell live
    # members of a rebalance, so a short interval ends one sooner.
    session_timeout_ms: int = field(default=6000, metadata={
        "help": "a dead worker's partitions move after this (the broker's "
                "group.min.session.timeout.ms, 6000 by default, is the floor)"})
    heartbeat_interval_ms: int = field(default=500, metadata={
        "help": "consumer heartbeats: live members learn of a rebalance this soon"})
    # Static group membership (KIP-345): a member restarted with the same id within the
    # session timeout gets its partitions back with no rebalance. Such a member does not
    # leave the group when it stops: its partitions wait for the session timeout.
    group_instance_id: str | None = field(default=None, metadata={
        "env": "FERRY_GROUP_INSTANCE_ID",
        "help": "static group membership: a worker restarted with the same id (e.g. a "
                "StatefulSet pod name) takes its partitions back with no rebalance"})
    # How long a transaction may stay open before the broker aborts it (and fences its
    # producer); ours last one batch's sends and commit, milliseconds.
    transaction_timeout_ms: int = field(default=60_000, metadata={
        "help": "exactly-once: the broker aborts a transaction open longer (and fences its "
                "producer: the worker stops)"})
    partitions: int = field(default=DEFAULT_PARTITIONS, metadata={
        "help": "partitions of the request topic if the worker creates it"})
    max_message_bytes: int = field(default=MAX_MESSAGE_BYTES, metadata={
        "help": "results above this become result_too_large errors"})
    metrics_port: int | None = field(default=None, metadata={
        "help": "Prometheus /metrics port (None: no HTTP endpoint; the registry still counts)"})
    device: str = field(default=DEVICE, metadata={"help": "torch device: cpu, cuda, cuda:1, ..."})
    dtype: str | None = field(default=None, metadata={
        "help": "weights' dtype, e.g. bfloat16 (default: the checkpoint's)"})
    shadow: bool = field(default=False, metadata={
        "help": "serve as a shadow candidate: read ferry.mirror.DEPLOYMENT, answer on "
                "ferry.shadow-results.DEPLOYMENT (never to clients)"})
    # Answers and the commit point in one transaction per input partition: read_committed
    # consumers see each request answered once, whatever crashes (workers/transactions.py).
    # Off: plain acked sends, a crash may answer a request twice.
    exactly_once: bool = field(default=True, metadata={
        "help": "one transaction per input partition for answers and the commit point, so a "
                "crash cannot answer a request twice (read_committed readers); "
                "--no-exactly-once: plain acked sends, at least once"})
    chat_template: Path | None = field(default=None, metadata={
        "metavar": "FILE",
        "help": "Jinja chat template rendering chat messages, in place of the model's own "
                "(chat_template.jinja or tokenizer_config.json); gives a model without one a "
                "template"})
    # Where the model comes from: `model_dir` is then resolved in the store before serving.
    store: Path | None = field(default=None, metadata={
        "help": "model store (a mounted volume): load --model NAME/VERSION from it"})
    verify_hashes: bool = field(default=False, metadata={
        "help": "check every file's sha256 before loading (sizes are always checked)"})
    # Tensor parallelism: the ranks of one replica (workers/ranks.py).
    tp: int = field(default=1, metadata={
        "help": "tensor-parallel ranks of this replica on this node"})
    nnodes: int = field(default=1, metadata={"help": "nodes the replica spans"})
    node_rank: int = field(default=0, metadata={"help": "this node's index among --nnodes"})
    master_addr: str = field(default="127.0.0.1", metadata={"help": "rank 0's node address"})
    master_port: int | None = field(default=None, metadata={
        "help": "rank 0's rendezvous port (default: a free one, on one node)"})
    tp_timeout: float = field(default=TP_TIMEOUT_S, metadata={
        "help": "seconds before a dead or stalled rank stops the whole replica"})

    def __post_init__(self) -> None:
        if self.exactly_once and self.max_queued > 400:
            raise ValueError("max_queued: at most 400 with exactly-once (the offsets in flight "
                             "travel in the commit's metadata, at most 4 KB)")

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
