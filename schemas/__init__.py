"""Ferry's message contract: typed, versioned, validated records that import no framework.

Everything that crosses Kafka is defined here and encoded through `schemas.codec`: the
request path (`messages`: requests, results, deltas, cancels, dead letters), the control
tables (`tables`: routes, shadow, keys and tenants, the registry, quota buckets) and events
(`events`: checkpoint events, telemetry, comparisons). `topics` names every topic and header,
`asyncapi` says what travels on each. `workers/` and `streams/` import this package; it
imports neither.
"""

from schemas.batch_key import batch_key
from schemas.codec import decode, encode
from schemas.errors import ErrorCode, SchemaError, http_status
from schemas.messages import (
    DEFAULT_REPLY_TO, SCHEMA_VERSION, Cancel, DeadLetter, Delta, ErrorInfo, Request, Result,
    Timings, Usage, decode_cancel, decode_delta, decode_request, decode_result,
    salvage_reply_address,
)
from schemas.topics import DLQ_TOPIC, RESULTS_TOPIC, requests_topic, worker_group

__all__ = [
    "DEFAULT_REPLY_TO", "DLQ_TOPIC", "RESULTS_TOPIC", "SCHEMA_VERSION", "Cancel",
    "DeadLetter", "Delta", "decode_cancel", "decode_delta",
    "ErrorCode", "ErrorInfo", "Request", "Result", "SchemaError", "Timings", "Usage",
    "batch_key", "decode", "decode_request", "decode_result", "encode", "http_status",
    "requests_topic", "salvage_reply_address", "worker_group",
]
