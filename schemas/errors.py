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

class Fault(str, Enum):
    """Whose doing an error is: the request's (the same request fails the same way anywhere)
    or the serving side's (what a canary holds against a deployment)."""

    CALLER = "caller"
    SERVER = "server"


_FAULT = {
    ErrorCode.INVALID_REQUEST: Fault.CALLER,
    ErrorCode.UNKNOWN_MODEL: Fault.CALLER,
    ErrorCode.PROMPT_TOO_LONG: Fault.CALLER,
    ErrorCode.DEADLINE_EXCEEDED: Fault.SERVER,   # the caller's budget, the server's slowness
    ErrorCode.REQUEST_TOO_LARGE: Fault.CALLER,
    ErrorCode.RESULT_TOO_LARGE: Fault.SERVER,
    ErrorCode.INFERENCE_FAILED: Fault.SERVER,
    ErrorCode.INTERNAL: Fault.SERVER,
    ErrorCode.UNAUTHENTICATED: Fault.CALLER,
    ErrorCode.QUOTA_EXCEEDED: Fault.CALLER,
    ErrorCode.OVERLOADED: Fault.SERVER,
    ErrorCode.CANCELLED: Fault.CALLER,
}
SERVER_FAULTS = frozenset(code for code, f in _FAULT.items() if f is Fault.SERVER)
# Server faults worth another attempt on another backend of the same alias: that backend
# failed, not the request (a deadline: the gateway's attempt timeout, shorter than the
# request's; a result too large is so anywhere).
RETRYABLE = frozenset({ErrorCode.INFERENCE_FAILED, ErrorCode.INTERNAL, ErrorCode.OVERLOADED,
                       ErrorCode.DEADLINE_EXCEEDED})


def fault(code: ErrorCode) -> Fault:
    return _FAULT[code]


def http_status(code: ErrorCode) -> int:
    return _HTTP_STATUS[code]


class SchemaError(ValueError):
    """A message failed validation; `field` names the offending field ("$" = the whole message)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
