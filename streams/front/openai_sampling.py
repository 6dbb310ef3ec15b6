"""OpenAI's sampling fields to Ferry's Request fields, checked with OpenAI's ranges and named as
OpenAI names them (a SchemaError whose field is the OpenAI parameter). vLLM's extensions
(top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids) are accepted
under their vLLM names. Pure functions; `streams/front/openai_format.py` calls them."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from schemas import Result, SchemaError
from schemas.messages import MAX_LOGPROBS, MAX_SAMPLES, Choice, TokenLogprob

MAX_LOGIT_BIAS = 1024


def _number(body: dict[str, Any], name: str, lo: float, hi: float,
            *, lo_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SchemaError(name, f"must be a number, got {type(value).__name__}")
    if value < lo or value > hi or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise SchemaError(name, f"must be in {left}{lo:g}, {hi:g}], got {value}")
    return float(value)


def _integer(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SchemaError(name, f"must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise SchemaError(name, f"must be in [{lo}, {hi}], got {value}")
    return value


def _boolean(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise SchemaError(name, f"must be boolean, got {type(value).__name__}")
    return value


def _logit_bias(value: Any) -> list[dict[str, Any]] | None:
    """OpenAI's {"token id": bias} map as Request.logit_bias entries."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SchemaError("logit_bias", f"must be an object, got {type(value).__name__}")
    if len(value) > MAX_LOGIT_BIAS:
        raise SchemaError("logit_bias", f"must have at most {MAX_LOGIT_BIAS} entries")
    out = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise SchemaError("logit_bias", f"keys must be token ids, got {key!r}")
        if (isinstance(bias, bool) or not isinstance(bias, (int, float))
                or not -100 <= bias <= 100):
            raise SchemaError("logit_bias", f"bias of token {key} must be a number in "
                                            f"[-100, 100], got {bias!r}")
        out.append({"token": int(key), "bias": float(bias)})
    return out


def _stop_token_ids(value: Any) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise SchemaError("stop_token_ids", "must be an array of token ids")
    return value


def request_fields(body: dict[str, Any], *, chat: bool) -> dict[str, Any]:
    """Request fields for the sampling parameters of an OpenAI body (unset ones omitted)."""
    fields = {
        "temperature": _number(body, "temperature", 0, 2),
        "top_p": _number(body, "top_p", 0, 1, lo_open=True),
        "presence_penalty": _number(body, "presence_penalty", -2, 2),
        "frequency_penalty": _number(body, "frequency_penalty", -2, 2),
        "logit_bias": _logit_bias(body.get("logit_bias")),
        # vLLM's extensions
        "top_k": _top_k(body),
        "min_p": _number(body, "min_p", 0, 1),
        "repetition_penalty": _number(body, "repetition_penalty", 0, 100, lo_open=True),
        "min_tokens": _integer(body, "min_tokens", 0, 1 << 20),
        "ignore_eos": _boolean(body, "ignore_eos"),
        "stop_token_ids": _stop_token_ids(body.get("stop_token_ids")),
        **_logprobs(body, chat),
        **_samples(body, chat),
    }
    return {k: v for k, v in fields.items() if v is not None}


def _logprobs(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    """Chat: logprobs (boolean) and top_logprobs (0..20); completions: logprobs (0..20, vLLM's
    limit where OpenAI's is 5), and echo with logprobs asks for the prompt's too."""
    if chat:
        on = _boolean(body, "logprobs")
        top = _integer(body, "top_logprobs", 0, MAX_LOGPROBS)
        if top is not None and not on:
            raise SchemaError("top_logprobs", "needs logprobs: true")
        return {"logprobs": (top or 0) if on else None}
    k = _integer(body, "logprobs", 0, MAX_LOGPROBS)
    echo = _boolean(body, "echo")
    return {"logprobs": k, "prompt_logprobs": k if echo else None}


def _samples(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    """n (1..128) and, on completions, best_of (n..128). Streamed, every sample drawn is
    returned (best_of > n is refused, as OpenAI does; best_of = n draws the same)."""
    n = _integer(body, "n", 1, MAX_SAMPLES)
    best_of = None if chat else _integer(body, "best_of", 1, MAX_SAMPLES)
    if best_of is not None and best_of < (n or 1):
        raise SchemaError("best_of", f"must be >= n ({n}), got {best_of}")
    if body.get("stream") is True and best_of is not None:
        if best_of > (n or 1):
            raise SchemaError("best_of", f"must equal n ({n or 1}) with stream: true (which "
                                         f"samples are best is known only at the end), got "
                                         f"{best_of}")
        best_of = None  # = n: every sample, in the order drawn
    return {"n": n, "best_of": best_of}


def echo_prompt(body: dict[str, Any], chat: bool) -> str | None:
    """The text a completions call with echo: true puts before its completion."""
    if chat or not _boolean(body, "echo"):
        return None
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else None


# ---- response pieces ------------------------------------------------------------------

def choices(result: Result, chat: bool, echo: str | None = None) -> list[dict[str, Any]]:
    """The `choices` of a (chat.)completion object: one per sample, with its index."""
    samples = result.choices or [Choice(0, result.output_ids, result.text,
                                        result.finish_reason,  # type: ignore[arg-type]
                                        result.logprobs)]
    out = []
    for c in samples:
        one = dataclasses.replace(result, output_ids=c.output_ids, text=c.text,
                                  finish_reason=c.finish_reason, logprobs=c.logprobs)
        if chat:
            out.append({"index": c.index,
                        "message": {"role": "assistant", "content": c.text},
                        "finish_reason": c.finish_reason, "logprobs": chat_logprobs(one)})
        else:
            out.append({"index": c.index, "text": (echo or "") + c.text,
                        "finish_reason": c.finish_reason,
                        "logprobs": completion_logprobs(one, echo)})
    return out


def completion_logprobs(result: Result, echo: str | None = None) -> dict[str, Any] | None:
    """A completions choice's `logprobs` (prompt tokens first with echo, the very first
    token's logprob null); text_offset counts characters of the returned text."""
    if result.logprobs is None:
        return None
    prompt = (result.prompt_logprobs or []) if echo is not None else []
    return completion_entries([*prompt, *result.logprobs], head=echo_head(echo, prompt))


def echo_head(echo: str | None, prompt: list[TokenLogprob | None]) -> str:
    """The text of the prompt's first token (which has no logprob entry): what the echo holds
    before the other prompt tokens' texts."""
    rest = "".join(x.text or "" for x in prompt[1:] if x is not None)
    return echo[:len(echo) - len(rest)] if echo and echo.endswith(rest) else ""


def completion_entries(entries: list[TokenLogprob | None], start: int = 0,
                       head: str = "") -> dict[str, Any]:
    """OpenAI's completions `logprobs` of these entries, text_offset counted from `start`
    (a stream's chunks continue where the one before ended); a null entry (the prompt's
    first token) reads `head`."""
    tokens: list[str] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    at = start
    for e in entries:
        if e is None:
            text = head
            lps.append(None)
            tops.append(None)
        else:
            text = e.text or ""
            lps.append(e.logprob)
            tops.append({t.text or "": t.logprob for t in e.top})
        tokens.append(text)
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(result: Result) -> dict[str, Any] | None:
    """A chat choice's `logprobs`: {content: [{token, logprob, bytes, top_logprobs}]}."""
    if result.logprobs is None:
        return None
    return {"content": chat_entries(result.logprobs), "refusal": None}


def chat_entries(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """Chat's `logprobs.content` entries of these tokens."""

    def one(text: str | None, logprob: float) -> dict[str, Any]:
        text = text or ""
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return [{**one(e.text, e.logprob), "top_logprobs": [one(t.text, t.logprob) for t in e.top]}
            for e in entries]


def _top_k(body: dict[str, Any]) -> int | None:
    """vLLM's top_k: -1 (or 0) means off."""
    value = _integer(body, "top_k", -1, 1 << 20)
    return None if value is None else max(value, 0)
