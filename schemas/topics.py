"""Topic and consumer-group names: the one place that spells them."""

RESULTS_TOPIC = "ferry.results"
DLQ_TOPIC = "ferry.dlq"
REQUESTS_PREFIX = "ferry.requests."
WORKER_GROUP_PREFIX = "ferry.workers."


def requests_topic(deployment: str) -> str:
    return REQUESTS_PREFIX + deployment


def worker_group(deployment: str) -> str:
    return WORKER_GROUP_PREFIX + deployment
