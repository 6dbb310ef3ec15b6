"""Topic, consumer-group and header names, and the partition counts of the topics Ferry
creates. What travels on each topic (key, value record, headers, who writes and reads it)
is in `schemas/asyncapi.py`, exported as `schemas/json/asyncapi.json`."""

import re

RESULTS_TOPIC = "ferry.results"
# Token deltas of streaming requests that answer on ferry.results (a separate topic: results
# may be written in transactions, and deltas must never wait for one to commit).
DELTAS_TOPIC = "ferry.deltas"
# Cancels (`schemas.Cancel`): read by every worker, which drops the named request's row.
CANCELS_TOPIC = "ferry.cancels"
CANCELS_PARTITIONS = 4
# Reply topics of Ferry's own clients (a gateway instance, the deployer's probes).
REPLIES_PREFIX = "ferry.replies."
DLQ_TOPIC = "ferry.dlq"
REQUESTS_PREFIX = "ferry.requests."
# Partitions of a request topic (and of results, dead letters, ...) when Ferry creates it:
# the most replicas one deployment's group can spread over.
DEFAULT_PARTITIONS = 4
# Largest record Ferry writes (Kafka's own default message.max.bytes is about this): a
# result above it becomes a result_too_large error, a request above it is refused.
MAX_MESSAGE_BYTES = 1_048_576
WORKER_GROUP_PREFIX = "ferry.workers."

# The router's input: requests from producers and the gateway, with an API key header.
INGRESS_TOPIC = "ferry.ingress"
INGRESS_PARTITIONS = 4  # the router's quota table is co-partitioned with it
# Compacted control topics, read whole by every router and gateway instance.
ROUTES_TOPIC = "ferry.routes"  # alias -> weighted deployments
KEYS_TOPIC = "ferry.keys"  # API key hashes and tenant limits
# Deployments of checkpoints (compacted, NAME@VERSION -> status record) and the events that
# ask for them (a trainer announcing a checkpoint, `ferry deploy`, `ferry undeploy`).
REGISTRY_TOPIC = "ferry.registry"
CHECKPOINTS_TOPIC = "ferry.checkpoints"
# One record per worker batch (latencies, errors), for canaries and dashboards.
TELEMETRY_TOPIC = "ferry.telemetry"
# One record per batch is little traffic, and a single partition gives a reader one position
# to pin ("only records from now on") and one global order across deployments.
TELEMETRY_PARTITIONS = 1
# Control tables and checkpoint events: tiny; one partition keeps one global order.
CONTROL_PARTITIONS = 1
# A router's quota buckets, `<app id>.quotas` (compacted, key = tenant).
QUOTAS_SUFFIX = ".quotas"

API_KEY_HEADER = "ferry-api-key"
DEPLOYMENT_HEADER = "ferry-deployment"  # on a request: pins the backend (version routes, retries)
# On a primary's copy of a result (ferry.primary-results): the deployment that produced it.
# Its own name, not the pin header: a pin means "send it there", this means "it came from".
PRODUCED_BY_HEADER = "ferry-produced-by"
ATTEMPT_HEADER = "ferry-attempt"  # 1 on first try; retries are not charged to quotas again
# On the gateway's copies of results in ferry.results: the caller's tenant (only it may poll
# the result) and whether the call was a chat one (the poll answers in that shape).
TENANT_HEADER = "ferry-tenant"
CHAT_HEADER = "ferry-chat"


def requests_topic(deployment: str) -> str:
    return REQUESTS_PREFIX + deployment


def worker_group(deployment: str) -> str:
    return WORKER_GROUP_PREFIX + deployment


def quotas_topic(app_id: str) -> str:
    return app_id + QUOTAS_SUFFIX


# ---- shadow traffic --------------------------------------------------------------------
# The router copies a sampled share of an alias's requests to each candidate's mirror topic
# (the same request, `model` = the candidate, header `ferry-primary` = the primary
# deployment). Candidate workers answer on their shadow-results topic, never on reply_to.
# A primary worker copies its result for a mirrored request (header `ferry-mirrored`) to
# PRIMARY_RESULTS_TOPIC, where the comparator pairs it with the candidates' by request id.
MIRROR_PREFIX = "ferry.mirror."
SHADOW_RESULTS_PREFIX = "ferry.shadow-results."
PRIMARY_RESULTS_TOPIC = "ferry.primary-results"
COMPARISONS_TOPIC = "ferry.comparisons"
SHADOW_TOPIC = "ferry.shadow"  # compacted: alias -> {candidates, percent}
PRIMARY_HEADER = "ferry-primary"
MIRRORED_HEADER = "ferry-mirrored"


def mirror_topic(candidate: str) -> str:
    return MIRROR_PREFIX + candidate


def shadow_results_topic(candidate: str) -> str:
    return SHADOW_RESULTS_PREFIX + candidate


def shadow_group(candidate: str) -> str:
    return "ferry.shadow." + candidate


# ---- where results may go --------------------------------------------------------------
# A request's `reply_to` is chosen by whoever posts it, so it is hostile input: a result
# published to a control table (`ferry.keys`, `ferry.routes`, ...) would rewrite it under the
# request's id. Results go only to the shared results topic, a Ferry client's reply topic, or
# a topic outside Ferry's namespace that Kafka accepts.
_LEGAL_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")


def reply_topic_problem(topic: str, prefix: str | None = None) -> str | None:
    """Why results may not be published to `topic`, or None when they may.

    `prefix`: a tenant limited to its own reply topics (router) may use only those besides
    the shared results topic and Ferry's client reply topics."""
    if not _LEGAL_TOPIC.fullmatch(topic) or topic in (".", ".."):
        return (f"reply_to: {topic[:80]!r} is not a topic name Kafka accepts "
                "(1-249 of a-z A-Z 0-9 . _ -)")
    if topic == RESULTS_TOPIC or topic.startswith(REPLIES_PREFIX):
        return None
    # Kafka treats '.' and '_' as the same character when it checks names for collisions.
    if topic.replace("_", ".").startswith("ferry.") or topic.startswith("__"):
        return (f"reply_to: {topic!r} is an internal topic; results go to {RESULTS_TOPIC}, "
                f"{REPLIES_PREFIX}* or a topic of your own")
    if prefix is not None and not topic.startswith(prefix):
        return (f"reply_to: {topic!r} is outside this tenant's reply topics ({prefix}*); "
                f"use {RESULTS_TOPIC} or a topic starting with {prefix}")
    return None


def stream_topic_problem(topic: str, reply_to: str, prefix: str | None = None) -> str | None:
    """Why token deltas may not be published to `topic`, or None when they may: the rules of
    `reply_topic_problem`, with ferry.deltas in place of ferry.results, and never the request's
    own reply topic (a read_committed reader of results must not wait behind deltas)."""
    if topic == reply_to:
        return f"stream_to: must differ from reply_to ({reply_to!r})"
    if topic == DELTAS_TOPIC:
        return None
    if topic == RESULTS_TOPIC:
        return f"stream_to: {RESULTS_TOPIC} is for results; deltas go to {DELTAS_TOPIC}"
    problem = reply_topic_problem(topic, prefix)
    return None if problem is None else "stream_to" + problem[len("reply_to"):]
