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
# One record per worker batch (latencies, errors), for canaries and dashboards.
TELEMETRY_TOPIC = "ferry.telemetry"

API_KEY_HEADER = "ferry-api-key"
DEPLOYMENT_HEADER = "ferry-deployment"  # pins the backend (version routes, retries)
ATTEMPT_HEADER = "ferry-attempt"  # 1 on first try; retries are not charged to quotas again


def requests_topic(deployment: str) -> str:
    return REQUESTS_PREFIX + deployment


def worker_group(deployment: str) -> str:
    return WORKER_GROUP_PREFIX + deployment
