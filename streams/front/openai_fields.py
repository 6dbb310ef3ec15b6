"""Every field of OpenAI's /v1/completions and /v1/chat/completions bodies, and what Ferry does
with it: implemented, accepted with no effect (identifiers, options of features not asked
for), handled by the sampling module (`streams/front/openai_sampling.py`), or refused with a 400 that
names the field and says why. A value equal to the field's neutral value (OpenAI's default:
`n: 1`, `presence_penalty: 0`, `tools: []`, `response_format: {"type": "text"}`) is accepted
everywhere, since clients such as LangChain send defaults explicitly.

Fields in no table are ignored and logged, as vLLM does (its request models allow extra
fields and log the ones they ignore); the README lists them as such.

Every implemented or sampling field works the same with `stream: true`: `logprobs` and
`top_logprobs` ride on each chunk for its tokens, `n` streams every choice under its
`index`, `echo` sends the prompt first. The one exception is OpenAI's too: `best_of`
greater than `n` is a 400 naming `best_of` (which samples are best is known only at the
end; `best_of` equal to `n` streams every sample).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from typing import Any

from schemas import SchemaError

log = logging.getLogger("ferry.gateway")


class Handling(Enum):
    IMPLEMENTED = "implemented"      # parsed into the Request (streams/front/openai_format.py)
    NO_EFFECT = "no effect"          # accepted: an identifier, or a no-op without other fields
    SAMPLING = "sampling"            # streams/front/openai_sampling.py (see NOT_YET)
    REFUSED = "refused"              # a 400 naming the field, unless the value is neutral


@dataclass(frozen=True)
class Field:
    handling: Handling
    neutral: tuple[Any, ...] = (None,)  # values that ask for nothing (always accepted)
    reason: str = ""                    # why a REFUSED field is refused


def _f(handling: Handling, *neutral: Any, reason: str = "") -> Field:
    return Field(handling, (None, *neutral), reason)


I, X, S, R = Handling.IMPLEMENTED, Handling.NO_EFFECT, Handling.SAMPLING, Handling.REFUSED
_TOOLS = "tool calling needs constrained decoding, which Ferry does not have yet"
_FORMAT = "structured output needs constrained decoding, which Ferry does not have yet"

# Both endpoints.
_COMMON: dict[str, Field] = {
    "model": _f(I), "stream": _f(I), "stream_options": _f(I), "max_tokens": _f(I),
    "temperature": _f(I), "top_p": _f(I), "seed": _f(I), "stop": _f(I),
    "async": _f(I),  # Ferry's: answer 202 at once, poll /v1/requests/{id}
    "user": _f(X),   # an end-user id for abuse monitoring: nothing to do with it here
    # OpenAI's penalties and logit_bias, and vLLM's sampling extensions.
    "n": _f(S, 1), "presence_penalty": _f(S, 0, 0.0), "frequency_penalty": _f(S, 0, 0.0),
    "logit_bias": _f(S, {}), "top_k": _f(S, -1, 0), "min_p": _f(S, 0, 0.0),
    "repetition_penalty": _f(S, 1, 1.0), "min_tokens": _f(S, 0), "ignore_eos": _f(S, False),
    "stop_token_ids": _f(S, []),
}

COMPLETIONS: dict[str, Field] = {
    **_COMMON,
    "prompt": _f(I),
    "best_of": _f(S, 1),  # streamed: only = n (OpenAI refuses more too)
    "logprobs": _f(S), "echo": _f(S, False),
    "suffix": _f(R, "", reason="insertion after a suffix (fill-in-the-middle) is not "
                               "supported"),
}

CHAT: dict[str, Field] = {
    **_COMMON,
    "messages": _f(I),
    "max_completion_tokens": _f(I),
    "logprobs": _f(S, False), "top_logprobs": _f(S),
    "tools": _f(R, [], reason=_TOOLS), "tool_choice": _f(R, "none", reason=_TOOLS),
    "functions": _f(R, [], reason=_TOOLS), "function_call": _f(R, "none", reason=_TOOLS),
    "parallel_tool_calls": _f(X),  # only means something with tools, which are refused
    "response_format": _f(R, {"type": "text"}, reason=_FORMAT),
    "modalities": _f(R, ["text"], reason="only text output is supported"),
    "audio": _f(R, reason="only text output is supported"),
    "prediction": _f(R, reason="predicted outputs (speculative decoding) are not supported"),
    "web_search_options": _f(R, reason="web search is not available"),
    "reasoning_effort": _f(R, reason="no reasoning budget is implemented"),
    "verbosity": _f(R, reason="verbosity control is not implemented"),
    "store": _f(R, False, reason="completions are not stored"),
    "metadata": _f(X),  # tags for stored completions; nothing is stored
    "service_tier": _f(R, "auto", "default", reason="there is one service tier"),
    "prompt_cache_key": _f(X), "safety_identifier": _f(X),  # identifiers: prefix caching
    # is automatic, and abuse monitoring is the operator's
}

# Sampling fields still refused (400 naming the field) because the engine lacks them; the
# sampling module (streams/front/openai_sampling.py) implements every field marked S today.
NOT_YET: frozenset[str] = frozenset()

# Unknown field names already logged (bounded: a client cannot grow it without end).
_LOGGED: set[str] = set()
_MAX_LOGGED = 256


def _neutral(value: Any, field: Field) -> bool:
    # Type-strict: True is not n = 1, and 0 is not False.
    return any(type(value) is type(v) and value == v for v in field.neutral) or (
        isinstance(value, float) and any(type(v) is int and value == v for v in field.neutral))


def check_fields(body: dict[str, Any], *, chat: bool) -> list[str]:
    """Refuse fields Ferry cannot honour (SchemaError naming the field); return the names of
    unknown fields, which are ignored (and logged once per name)."""
    table = CHAT if chat else COMPLETIONS
    unknown = []
    for name, value in body.items():
        field = table.get(name)
        if field is None:
            unknown.append(name)
        elif _neutral(value, field):
            continue
        elif field.handling is Handling.REFUSED:
            raise SchemaError(name, f"is not supported: {field.reason}")
        elif field.handling is Handling.SAMPLING and name in NOT_YET:
            raise SchemaError(name, "is not supported yet (only its default value is "
                                    "accepted)")
    if not chat and "max_completion_tokens" in unknown:  # a chat field sent here: say so
        raise SchemaError("max_completion_tokens", "is a chat field; /v1/completions takes "
                                                   "max_tokens")
    fresh = [n for n in unknown if n not in _LOGGED]
    if fresh and len(_LOGGED) < _MAX_LOGGED:
        _LOGGED.update(fresh[:_MAX_LOGGED - len(_LOGGED)])
        log.warning("ignoring unknown request fields (logged once per name): %s",
                    ", ".join(repr(n[:64]) for n in fresh[:16]))
    return unknown
