"""What the worker refuses, and why: the checks a request passes before it reaches the engine.

Pure (no Kafka, no asyncio), so every refusal is unit-tested without a broker. A refusal is
an error result with a code and a message that names the field at fault; a request that
passes becomes an `EngineRequest` whose id is its Kafka position, so no client-chosen id can
collide inside the engine. Chat messages are rendered here, with the deployment's chat
template, and tokenised without special tokens (the template writes bos).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Protocol

from schemas import ErrorCode, Request
from schemas.messages import REST_OF_CONTEXT
from workers.chat_template import ChatTemplate, ChatTemplateError
from workers.engine import EngineRequest, SamplingParams
from workers.model import ModelConfig
from workers.tokenizer import Tokenizer


class EngineView(Protocol):
    """The part of an engine that admission reads."""

    config: ModelConfig
    tokenizer: Tokenizer | None
    max_context: int

    def encode(self, prompt: str) -> list[int]: ...

    def check(self, request: EngineRequest) -> None: ...


class Refused(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def admit(request: Request, engine_id: str, deployment: str, engine: EngineView,
          now: float | None = None, chat_template: ChatTemplate | None = None
          ) -> EngineRequest:
    """The engine request for `request`, or `Refused` saying why it cannot be served.
    `chat_template` is the deployment's (None: it has none, and chats are refused)."""
    if request.model != deployment:
        raise Refused(ErrorCode.UNKNOWN_MODEL, f"model: {request.model!r} is not served here "
                                               f"(this is {deployment!r})")
    if request.deadline is not None and request.deadline < (now or time.time()):
        raise Refused(ErrorCode.DEADLINE_EXCEEDED, "deadline: passed before it was read")
    if request.stop and engine.tokenizer is None:
        raise Refused(ErrorCode.INVALID_REQUEST,
                      "stop: this deployment has no tokenizer to match stop text against")
    vocab = engine.config.vocab_size
    for name, ids in (("input_ids", request.input_ids), ("score_ids", request.score_ids)):
        if ids is not None and (bad := next((t for t in ids if t >= vocab), None)) is not None:
            raise Refused(ErrorCode.INVALID_REQUEST,
                          f"{name}: token {bad} is outside the vocabulary ({vocab})")
    if request.input_ids is not None:
        input_ids = request.input_ids
    elif request.messages is not None:
        input_ids = chat_ids(request, engine.tokenizer, chat_template)
    else:
        try:
            input_ids = engine.encode(request.prompt or "")
        except ValueError as exc:
            raise Refused(ErrorCode.INVALID_REQUEST, f"prompt: {exc}") from None
        if not input_ids:
            raise Refused(ErrorCode.INVALID_REQUEST, "prompt: encodes to no tokens")
    params = sampling(request)
    if request.score_ids:
        if len(input_ids) + len(request.score_ids) > engine.max_context:
            raise Refused(ErrorCode.PROMPT_TOO_LONG,
                          f"score_ids: {len(input_ids)} prompt tokens + score_ids "
                          f"{len(request.score_ids)} exceed the context of {engine.max_context}")
    else:
        params = dataclasses.replace(params, max_new_tokens=budget(request, len(input_ids),
                                                                   engine.max_context))
    admitted = EngineRequest(id=engine_id, input_ids=list(input_ids),
                             params=params, score_ids=request.score_ids)
    try:
        engine.check(admitted)  # anything else the engine itself cannot run
    except ValueError as exc:  # "request '<engine id>': <field>: why"; the id is ours, not theirs
        raise Refused(ErrorCode.INVALID_REQUEST,
                      str(exc).removeprefix(f"request {engine_id!r}: ")) from None
    return admitted


def chat_ids(request: Request, tokenizer: Tokenizer | None,
             template: ChatTemplate | None) -> list[int]:
    """The prompt of a chat request: its messages rendered, then tokenised as they are."""
    assert request.messages is not None
    if tokenizer is None:
        raise Refused(ErrorCode.INVALID_REQUEST, "messages: this deployment has no tokenizer "
                                                 "to render a chat with; send input_ids")
    if template is None:
        raise Refused(ErrorCode.INVALID_REQUEST,
                      "messages: this deployment's model has no chat template "
                      "(chat_template.jinja, or chat_template in tokenizer_config.json) and "
                      "none was configured (ferry worker --chat-template FILE); send a prompt")
    try:
        text = template.render(request.messages)
    except ChatTemplateError as exc:
        raise Refused(ErrorCode.INVALID_REQUEST,
                      f"messages: the chat template refused them: {exc}") from None
    input_ids = tokenizer.encode(text, add_special_tokens=False)
    if not input_ids:
        raise Refused(ErrorCode.INVALID_REQUEST, "messages: render to no tokens")
    return input_ids


def budget(request: Request, prompt_tokens: int, max_context: int) -> int:
    """The request's max_new_tokens, resolved against the context: REST_OF_CONTEXT (0) is what
    the prompt leaves. The field at fault is named: the prompt when it fills the context
    alone, else max_new_tokens."""
    source = "messages" if request.messages is not None else "prompt"
    if prompt_tokens >= max_context:
        raise Refused(ErrorCode.PROMPT_TOO_LONG,
                      f"{source}: {prompt_tokens} tokens leave no room to generate in the "
                      f"context of {max_context}")
    if request.max_new_tokens == REST_OF_CONTEXT:
        return max_context - prompt_tokens
    if prompt_tokens + request.max_new_tokens > max_context:
        raise Refused(ErrorCode.PROMPT_TOO_LONG,
                      f"max_new_tokens: {source} of {prompt_tokens} tokens + max_new_tokens "
                      f"{request.max_new_tokens} exceed the context of {max_context}")
    return request.max_new_tokens


def sampling(request: Request) -> SamplingParams:
    r = request
    return SamplingParams(
        max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
        top_k=r.top_k, seed=r.seed, stop=tuple(r.stop), min_p=r.min_p,
        presence_penalty=r.presence_penalty, frequency_penalty=r.frequency_penalty,
        repetition_penalty=r.repetition_penalty,
        logit_bias=tuple((b.token, b.bias) for b in r.logit_bias),
        stop_token_ids=tuple(r.stop_token_ids), min_tokens=r.min_tokens,
        ignore_eos=r.ignore_eos, logprobs=r.logprobs, prompt_logprobs=r.prompt_logprobs,
        n=r.n, best_of=r.best_of)
