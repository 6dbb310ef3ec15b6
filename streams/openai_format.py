"""OpenAI's wire format to Ferry's and back: parsing calls, naming fields in errors, and
building completion objects and stream chunks. Pure functions; the gateway does the I/O."""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from schemas import ErrorCode, Request, Result, SchemaError, decode_request, encode, http_status
from streams import openai_sampling

DEFAULT_MODEL = "default"
REASON = web.ResponseKey("reason", str)  # the error code of an answer, for metrics
# Request fields as OpenAI names them, for error messages and `param`.
_OPENAI_FIELD = {"max_new_tokens": "max_tokens"}
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


# ---- errors ---------------------------------------------------------------------------

class ApiError(Exception):
    """An error answer: HTTP status plus OpenAI's error object fields."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after_s = retry_after_s


def error_type(status: int) -> str:
    if status == 504:
        return "timeout_error"
    return "invalid_request_error" if status < 500 else "server_error"


def error_response(err: ApiError) -> web.Response:
    body = {"error": {"message": err.message, "type": error_type(err.status),
                      "param": err.param, "code": err.code}}
    headers = ({"Retry-After": str(max(1, math.ceil(err.retry_after_s)))}
               if err.retry_after_s is not None else None)
    response = web.json_response(body, status=err.status, dumps=json_text, headers=headers)
    response[REASON] = err.code
    return response


def _openai_field(field: str) -> str:
    head, sep, rest = field.partition("[")
    return _OPENAI_FIELD.get(head, head) + sep + rest


def schema_error(exc: SchemaError, prompt_field: str = "prompt") -> ApiError:
    field = _openai_field(exc.field)
    if field == "prompt":
        field = prompt_field
    return ApiError(400, f"{field}: {exc.reason}", ErrorCode.INVALID_REQUEST.value, field)


def result_error(result: Result) -> ApiError:
    """The HTTP answer for an error result, through the one ErrorCode -> status table."""
    assert result.error is not None
    match = _FIELD_PREFIX.match(result.error.message)
    param = _openai_field(match.group(1)) if match else None
    return ApiError(http_status(result.error.code), result.error.message,
                    result.error.code.value, param, result.error.retry_after_s)


def json_text(obj: Any) -> str:
    return orjson.dumps(obj).decode()


# ---- OpenAI bodies <-> Ferry records --------------------------------------------------

@dataclass(frozen=True)
class Call:
    """One parsed HTTP generation call: the Ferry request and how to answer it."""

    request: Request
    chat: bool
    stream: bool
    respond_async: bool
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage
    echo: str | None = None      # completions' echo: the prompt text before the completion


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise SchemaError(name, f"must be boolean, got {type(value).__name__}")
    return value


def _stop(value: Any) -> Any:
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


def parse_call(body: Any, *, chat: bool, model: str, prefer_async: bool,
               deadline: float) -> Call:
    """Validate an OpenAI body into a Ferry Request; SchemaError names the OpenAI field."""
    if not isinstance(body, dict):
        raise SchemaError("$", "body must be a JSON object")
    # Chat messages travel as they are: the worker renders them with its model's template.
    source = "messages" if chat else "prompt"
    if body.get(source) is None:
        raise SchemaError(source, "is required")
    if not chat and not isinstance(body["prompt"], str):
        raise SchemaError("prompt", "must be a string")
    fields = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "model": model,
              source: body[source], "max_new_tokens": body.get("max_tokens"),
              "temperature": body.get("temperature"), "top_p": body.get("top_p"),
              "seed": body.get("seed"), "stop": _stop(body.get("stop")), "deadline": deadline}
    fields.update(openai_sampling.request_fields(body, chat=chat))
    fields = {k: v for k, v in fields.items() if v is not None}
    request = decode_request(encode(fields))
    return Call(request, chat, _flag(body, "stream"), _flag(body, "async") or prefer_async,
                _include_usage(body), openai_sampling.echo_prompt(body, chat))


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise SchemaError("stream_options", "must be an object")
    if not body.get("stream"):
        raise SchemaError("stream_options", "is only allowed with stream: true")
    value = options.get("include_usage", False)
    if not isinstance(value, bool):
        raise SchemaError("stream_options.include_usage", "must be boolean")
    return value


def host_name(host: str) -> str:
    """The Host header without its port ("[::1]:80" -> "[::1]", "a.b:80" -> "a.b")."""
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() and not name.endswith(":") else host


def pick_model(body: Any, path_model: str | None, host: str | None,
               host_routes: dict[str, str]) -> str:
    """The deployment a call goes to: version path, then body model, then host route."""
    if path_model is not None:
        return path_model
    model = body.get("model") if isinstance(body, dict) else None
    if model is not None and not isinstance(model, str):
        raise SchemaError("model", "must be a string")
    if model in (None, "", DEFAULT_MODEL) and host is not None:
        routed = host_routes.get(host_name(host))
        if routed is not None:
            return routed
    if not model:
        raise SchemaError("model", "is required")
    return model


def _usage(result: Result) -> dict[str, int]:
    u = result.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def completion_object(result: Result, chat: bool, created: int,
                      echo: str | None = None) -> dict[str, Any]:
    """The OpenAI (chat.)completion object for a successful result."""
    return {"id": result.id, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": result.model,
            "choices": openai_sampling.choices(result, chat, echo),
            "usage": _usage(result)}


# ---- stream chunks: role (chat), text pieces, the finish reason, usage if asked -----------

def chunk_base(request_id: str, model: str, chat: bool, created: int) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model}


def role_chunk(base: dict[str, Any]) -> dict[str, Any]:
    """A chat stream's first chunk: who speaks, before any text."""
    return {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "finish_reason": None, "logprobs": None}]}


def text_chunk(base: dict[str, Any], chat: bool, text: str) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
    return {**base, "choices": [{**choice, "finish_reason": None, "logprobs": None}]}


def finish_chunk(base: dict[str, Any], chat: bool, result: Result) -> dict[str, Any]:
    choice = {"index": 0, "delta": {}} if chat else {"index": 0, "text": ""}
    return {**base, "choices": [{**choice, "finish_reason": result.finish_reason,
                                 "logprobs": None}]}


def usage_chunk(base: dict[str, Any], result: Result) -> dict[str, Any]:
    """The last chunk of a stream that asked for `stream_options.include_usage`."""
    return {**base, "choices": [], "usage": _usage(result)}


def error_event(err: ApiError) -> dict[str, Any]:
    """A failure after the stream started (its HTTP status is sent already)."""
    return {"error": {"message": err.message, "type": error_type(err.status),
                      "param": err.param, "code": err.code}}
