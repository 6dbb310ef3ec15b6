"""Topic, consumer-group and header names: the one place that spells them."""

RESULTS_TOPIC = "ferry.results"
DLQ_TOPIC = "ferry.dlq"
REQUESTS_PREFIX = "ferry.requests."
WORKER_GROUP_PREFIX = "ferry.workers."

# The router's input: requests from producers and the gateway, with an API key header.
INGRESS_TOPIC = "ferry.ingress"
INGRESS_PARTITIONS = 4  # the router's quota table is co-partitioned with it
ROUTER_GROUP = "ferry.router"
# Compacted control topics, read whole by every router and gateway instance.
ROUTES_TOPIC = "ferry.routes"  # alias -> weighted deployments
KEYS_TOPIC = "ferry.keys"  # API key hashes and tenant limits
# Deployments of checkpoints (compacted, NAME@VERSION -> status record) and the events that
# ask for them (a trainer announcing a checkpoint, `ferry deploy`, `ferry undeploy`).
REGISTRY_TOPIC = "ferry.registry"
CHECKPOINTS_TOPIC = "ferry.checkpoints"
# One record per worker batch (latencies, errors), for canaries and dashboards.
TELEMETRY_TOPIC = "ferry.telemetry"

API_KEY_HEADER = "ferry-api-key"
DEPLOYMENT_HEADER = "ferry-deployment"  # pins the backend (version routes, retries)
ATTEMPT_HEADER = "ferry-attempt"  # 1 on first try; retries are not charged to quotas again


def requests_topic(deployment: str) -> str:
    return REQUESTS_PREFIX + deployment


def worker_group(deployment: str) -> str:
    return WORKER_GROUP_PREFIX + deployment


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
