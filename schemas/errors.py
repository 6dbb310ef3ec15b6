"""One set of error codes for worker, router and gateway, mapped to HTTP status in one place."""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_MODEL = "unknown_model"
    PROMPT_TOO_LONG = "prompt_too_long"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    REQUEST_TOO_LARGE = "request_too_large"
    RESULT_TOO_LARGE = "result_too_large"
    INFERENCE_FAILED = "inference_failed"
    INTERNAL = "internal"
    UNAUTHENTICATED = "unauthenticated"
    QUOTA_EXCEEDED = "quota_exceeded"
    OVERLOADED = "overloaded"
    CANCELLED = "cancelled"


_HTTP_STATUS = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.UNKNOWN_MODEL: 404,
    ErrorCode.PROMPT_TOO_LONG: 400,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.REQUEST_TOO_LARGE: 413,
    ErrorCode.RESULT_TOO_LARGE: 502,
    ErrorCode.INFERENCE_FAILED: 500,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.QUOTA_EXCEEDED: 429,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.CANCELLED: 499,  # nginx's "client closed request": the caller went away
}

# Worth another attempt on another backend of the same alias: the backend failed, not the
# request.
RETRYABLE = frozenset({ErrorCode.INFERENCE_FAILED, ErrorCode.INTERNAL, ErrorCode.OVERLOADED})


def http_status(code: ErrorCode) -> int:
    return _HTTP_STATUS[code]


class SchemaError(ValueError):
    """A message failed validation; `field` names the offending field ("$" = the whole message)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
