"""What the worker refuses, and why: the checks a request passes before it reaches the engine.

Pure (no Kafka, no asyncio), so every refusal is unit-tested without a broker. A refusal is
an error result with a code and a message that names the field at fault; a request that
passes becomes an `EngineRequest` whose id is its Kafka position, so no client-chosen id can
collide inside the engine.
"""

from __future__ import annotations

import time
from typing import Protocol

from schemas import ErrorCode, Request
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
          now: float | None = None) -> EngineRequest:
    """The engine request for `request`, or `Refused` saying why it cannot be served."""
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
    else:
        try:
            input_ids = engine.encode(request.prompt or "")
        except ValueError as exc:
            raise Refused(ErrorCode.INVALID_REQUEST, f"prompt: {exc}") from None
        if not input_ids:
            raise Refused(ErrorCode.INVALID_REQUEST, "prompt: encodes to no tokens")
    extra = len(request.score_ids) if request.score_ids else request.max_new_tokens
    if len(input_ids) + extra > engine.max_context:
        what = (f"score_ids {len(request.score_ids)}" if request.score_ids
                else f"max_new_tokens {request.max_new_tokens}")
        raise Refused(ErrorCode.PROMPT_TOO_LONG,
                      f"prompt: {len(input_ids)} tokens + {what} exceed the context of "
                      f"{engine.max_context}")
    admitted = EngineRequest(id=engine_id, input_ids=list(input_ids),
                             params=sampling(request), score_ids=request.score_ids)
    try:
        engine.check(admitted)  # anything else the engine itself cannot run
    except ValueError as exc:  # "request '<engine id>': <field>: why"; the id is ours, not theirs
        raise Refused(ErrorCode.INVALID_REQUEST,
                      str(exc).removeprefix(f"request {engine_id!r}: ")) from None
    return admitted


def sampling(request: Request) -> SamplingParams:
    return SamplingParams(max_new_tokens=request.max_new_tokens, temperature=request.temperature,
                          top_p=request.top_p, seed=request.seed, stop=tuple(request.stop))
