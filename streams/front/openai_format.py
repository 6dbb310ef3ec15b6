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
from schemas.messages import MAX_CONTEXT_TOKENS, REST_OF_CONTEXT, TokenLogprob
from streams.front import openai_sampling
from streams.front.openai_fields import check_fields

DEFAULT_MODEL = "default"
REASON = web.ResponseKey("reason", str)  # the error code of an answer, for metrics
# Request fields as OpenAI names them, for error messages and `param`.
_OPENAI_FIELD = {"max_new_tokens": "max_tokens", "input_ids": "prompt"}
MAX_PROMPTS = 128  # prompts in one completions call (each is one Kafka request)
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
    if exc.field == "$":  # the body as a whole
        return ApiError(400, exc.reason, ErrorCode.INVALID_REQUEST.value, None)
    field = _openai_field(exc.field)
    if field == "prompt":
        field = prompt_field
    return ApiError(400, f"{field}: {exc.reason}", ErrorCode.INVALID_REQUEST.value, field)


def result_error(result: Result, limit_field: str = "max_tokens") -> ApiError:
    """The HTTP answer for an error result, through the one ErrorCode -> status table.
    `limit_field`: the OpenAI name the call gave max_new_tokens (chat's
    max_completion_tokens, when it was sent)."""
    assert result.error is not None
    match = _FIELD_PREFIX.match(result.error.message)
    param = _openai_field(match.group(1)) if match else None
    if param == "max_tokens":
        param = limit_field
    # The worker names Request fields; the caller sent OpenAI's.
    message = result.error.message.replace("max_new_tokens", limit_field)
    return ApiError(http_status(result.error.code), message,
                    result.error.code.value, param, result.error.retry_after_s)


def prompt_error(err: ApiError, i: int) -> ApiError:
    """The error of prompt i of a call with several: it names the prompt."""
    err.message = f"prompt[{i}]: {err.message}"
    if err.param in (None, "prompt"):
        err.param = f"prompt[{i}]"
    return err


def json_text(obj: Any) -> str:
    return orjson.dumps(obj).decode()


# ---- OpenAI bodies <-> Ferry records --------------------------------------------------

@dataclass(frozen=True)
class Call:
    """One parsed HTTP generation call: the Ferry requests (one per prompt) and how to answer.
    A completions call with a list of prompts has one request per prompt; its choices are
    indexed prompt_i * n + j."""

    requests: tuple[Request, ...]
    chat: bool
    stream: bool
    respond_async: bool
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage
    id: str = ""                 # the completion object's id (the request's, for one prompt)
    limit_field: str = "max_tokens"  # the field that set max_new_tokens, for error messages
    echo: str | None = None      # completions' echo: the prompt text before the completion

    @property
    def request(self) -> Request:
        return self.requests[0]


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise SchemaError(name, f"must be boolean, got {type(value).__name__}")
    return value


def _stop(value: Any) -> Any:
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def prompts(value: Any) -> list[dict[str, Any]]:
    """OpenAI's prompt shapes as Request sources: a string, a list of token ids, a list of
    strings, or a list of token-id lists."""
    if isinstance(value, str):
        return [{"prompt": value}]
    if not isinstance(value, list):
        raise SchemaError("prompt", "must be a string, a list of strings, a list of token ids "
                                    f"or a list of token-id lists, got {type(value).__name__}")
    if not value:
        raise SchemaError("prompt", "must not be empty")
    if _is_ids(value):
        return [{"input_ids": value}]
    if len(value) > MAX_PROMPTS:
        raise SchemaError("prompt", f"at most {MAX_PROMPTS} prompts per call, got {len(value)}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            out.append({"prompt": item})
        elif _is_ids(item):
            if not item:
                raise SchemaError(f"prompt[{i}]", "must not be empty")
            out.append({"input_ids": item})
        else:
            raise SchemaError(f"prompt[{i}]", "must be a string or a list of token ids, got "
                                              f"{type(item).__name__}")
    return out


def token_limit(body: dict[str, Any], chat: bool) -> int | None:
    """Request.max_new_tokens: chat's max_completion_tokens wins over max_tokens (as vLLM);
    a chat without either gets 0, the rest of the context (vLLM's default), resolved by the
    worker; completions default to Ferry's (and OpenAI's) 16."""
    limit = None
    for name in ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(name, f"must be an integer, got {type(value).__name__}")
        if not 1 <= value <= MAX_CONTEXT_TOKENS:
            raise SchemaError(name, f"must be in [1, {MAX_CONTEXT_TOKENS}], got {value}")
        limit = value if limit is None else limit
    if limit is None and chat:
        return REST_OF_CONTEXT
    return limit


def parse_call(body: Any, *, chat: bool, model: str, prefer_async: bool,
               deadline: float) -> Call:
    """Validate an OpenAI body into Ferry Requests; SchemaError names the OpenAI field."""
    if not isinstance(body, dict):
        raise SchemaError("$", "body must be a JSON object")
    check_fields(body, chat=chat)  # refuses what cannot be honoured; logs unknown fields
    # Chat messages travel as they are: the worker renders them with its model's template.
    source = "messages" if chat else "prompt"
    if body.get(source) is None:
        raise SchemaError(source, "is required")
    sources = [{"messages": body["messages"]}] if chat else prompts(body["prompt"])
    stream, respond_async = _flag(body, "stream"), _flag(body, "async") or prefer_async
    if len(sources) > 1 and respond_async:
        raise SchemaError("async", "is not supported with a list of prompts; send one prompt "
                                   "per call")
    base = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    common = {"model": model, "max_new_tokens": token_limit(body, chat),
              "temperature": body.get("temperature"), "top_p": body.get("top_p"),
              "seed": body.get("seed"), "stop": _stop(body.get("stop")), "deadline": deadline}
    common.update(openai_sampling.request_fields(body, chat=chat))
    echo = openai_sampling.echo_prompt(body, chat)
    if not chat and body.get("echo") is True and echo is None:
        raise SchemaError("echo", "needs one text prompt (not token ids or a list) for now")
    if echo is not None and respond_async:
        raise SchemaError("echo", "is not available with async calls yet")
    requests = []
    for i, src in enumerate(sources):
        fields = {"id": base if len(sources) == 1 else f"{base}-{i}", **common, **src}
        fields = {k: v for k, v in fields.items() if v is not None}
        try:
            requests.append(decode_request(encode(fields)))
        except SchemaError as exc:  # name the prompt of the list at fault
            if len(sources) > 1 and exc.field in ("prompt", "input_ids"):
                raise SchemaError(f"prompt[{i}]", exc.reason) from None
            raise
    limit_field = ("max_completion_tokens" if chat and body.get("max_completion_tokens")
                   is not None else "max_tokens")
    return Call(tuple(requests), chat, stream, respond_async, _include_usage(body), base,
                limit_field, echo)


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
    if not isinstance(body, dict):
        raise SchemaError("$", "body must be a JSON object")
    if path_model is not None:
        return path_model
    model = body.get("model")
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


def completions_object(call_id: str, results: list[Result], created: int) -> dict[str, Any]:
    """The text_completion of a call with several prompts: choice prompt_i * n + j, usage
    summed over the prompts."""
    n = max(len(r.choices or ()) or 1 for r in results)
    choices = [{**choice, "index": i * n + j} for i, r in enumerate(results)
               for j, choice in enumerate(completion_object(r, False, created)["choices"])]
    prompt = sum(r.usage.prompt_tokens for r in results)
    completion = sum(r.usage.completion_tokens for r in results)
    return {"id": call_id, "object": "text_completion", "created": created,
            "model": results[0].model, "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion}}


# ---- stream chunks: role (chat), echo (completions), text pieces with their logprobs, the
# finish reason, usage if asked ------------------------------------------------------------

def chunk_base(request_id: str, model: str, chat: bool, created: int) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model}


def role_chunk(base: dict[str, Any], index: int = 0) -> dict[str, Any]:
    """A chat stream's first chunk: who speaks, before any text."""
    return {**base, "choices": [{"index": index,
                                 "delta": {"role": "assistant", "content": ""},
                                 "finish_reason": None, "logprobs": None}]}


def text_chunk(base: dict[str, Any], chat: bool, text: str, index: int = 0,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A piece of text; `logprobs` (`chunk_logprobs`) of its tokens when the call asked."""
    choice = {"index": index, "delta": {"content": text}} if chat else {"index": index,
                                                                      "text": text}
    return {**base, "choices": [{**choice, "finish_reason": None, "logprobs": logprobs}]}


def chunk_logprobs(chat: bool, entries: list[TokenLogprob | None], start: int = 0,
                   head: str = "") -> tuple[dict[str, Any], int]:
    """A chunk's `logprobs` for its tokens, in the shape of the non-streamed answer so that a
    stream's chunks concatenate to it: chat `{content: [...]}`; completions `{tokens,
    token_logprobs, top_logprobs, text_offset}` with text_offset counted from `start`, the
    end of the choice's previous chunk (returned, for the next one). `head`: the text of a
    null entry (echo's first prompt token)."""
    if chat:
        content = openai_sampling.chat_entries([e for e in entries if e is not None])
        return {"content": content, "refusal": None}, start
    lists = openai_sampling.completion_entries(entries, start, head)
    end = lists["text_offset"][-1] + len(lists["tokens"][-1]) if entries else start
    return lists, end


def echo_chunk(base: dict[str, Any], echo: str, index: int,
               prompt: list[TokenLogprob | None] | None) -> tuple[dict[str, Any], int]:
    """A completions stream's first chunk with echo: the prompt (and its logprobs when the
    call asked for logprobs); returns the text_offset the completion's logprobs start at."""
    if prompt is None:
        return text_chunk(base, False, echo, index), 0
    lists, end = chunk_logprobs(False, prompt, 0, openai_sampling.echo_head(echo, prompt))
    return text_chunk(base, False, echo, index, lists), end


def finish_chunk(base: dict[str, Any], chat: bool, result: Result, index: int = 0,
                 choice: int = 0) -> dict[str, Any]:
    """The end of one choice (`result.choices[choice]` with n > 1), as chunk `index`."""
    reason = result.choices[choice].finish_reason if result.choices else result.finish_reason
    return reason_chunk(base, chat, reason, index)


def reason_chunk(base: dict[str, Any], chat: bool, reason: str, index: int = 0
                 ) -> dict[str, Any]:
    """The end of choice `index` of a stream, with its finish reason."""
    out = {"index": index, "delta": {}} if chat else {"index": index, "text": ""}
    return {**base, "choices": [{**out, "finish_reason": reason, "logprobs": None}]}


def usage_chunk(base: dict[str, Any], *results: Result) -> dict[str, Any]:
    """The last chunk of a stream that asked for `stream_options.include_usage` (the sum
    over a call's prompts)."""
    prompt = sum(r.usage.prompt_tokens for r in results)
    completion = sum(r.usage.completion_tokens for r in results)
    return {**base, "choices": [], "usage": {"prompt_tokens": prompt,
                                             "completion_tokens": completion,
                                             "total_tokens": prompt + completion}}


def error_event(err: ApiError) -> dict[str, Any]:
    """A failure after the stream started (its HTTP status is sent already)."""
    return {"error": {"message": err.message, "type": error_type(err.status),
                      "param": err.param, "code": err.code}}
