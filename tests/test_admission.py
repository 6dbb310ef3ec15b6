"""What the worker refuses before the engine, and why: pure, no broker, no model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from schemas import ErrorCode, Request
from workers.admission import Refused, admit
from workers.engine import EngineRequest
from workers.model import ModelConfig


@dataclass
class FakeEngine:
    config: ModelConfig
    tokenizer: object | None = object()
    max_context: int = 64
    refuse: str | None = None

    def encode(self, prompt: str) -> list[int]:
        if "\0" in prompt:
            raise ValueError("cannot encode NUL")
        return [ord(c) % 100 for c in prompt]

    def check(self, request: EngineRequest) -> None:
        if self.refuse:
            raise ValueError(self.refuse)


ENGINE = FakeEngine(ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=8,
                                num_hidden_layers=1, num_attention_heads=1))


def refusal(request: Request, engine: FakeEngine = ENGINE, now: float = 0.0) -> Refused:
    with pytest.raises(Refused) as caught:
        admit(request, "t/0@1", "dep", engine, now=now)
    return caught.value


def test_admitted_request_is_known_by_its_kafka_position() -> None:
    got = admit(Request(id="client-id", model="dep", prompt="hi", max_new_tokens=3,
                        temperature=0.5, seed=4, stop=["x"]), "t/0@1", "dep", ENGINE)
    assert got.id == "t/0@1" and got.input_ids == [4, 5]
    assert (got.params.max_new_tokens, got.params.temperature, got.params.seed,
            got.params.stop) == (3, 0.5, 4, ("x",))


def test_refusals_name_the_field_and_code() -> None:
    cases = [
        (Request(id="a", model="other", prompt="x"), ErrorCode.UNKNOWN_MODEL, "model:"),
        (Request(id="a", model="dep", prompt="x", deadline=5.0), ErrorCode.DEADLINE_EXCEEDED,
         "deadline:"),
        (Request(id="a", model="dep", input_ids=[1, 100]), ErrorCode.INVALID_REQUEST,
         "input_ids: token 100"),
        (Request(id="a", model="dep", input_ids=[1], score_ids=[101]),
         ErrorCode.INVALID_REQUEST, "score_ids: token 101"),
        (Request(id="a", model="dep", prompt="a\0b"), ErrorCode.INVALID_REQUEST, "prompt:"),
        (Request(id="a", model="dep", prompt=""), ErrorCode.INVALID_REQUEST, "no tokens"),
        (Request(id="a", model="dep", input_ids=[1] * 60, max_new_tokens=5),
         ErrorCode.PROMPT_TOO_LONG, "max_new_tokens 5"),
        (Request(id="a", model="dep", input_ids=[1] * 60, score_ids=[1] * 5),
         ErrorCode.PROMPT_TOO_LONG, "score_ids 5"),
    ]
    for request, code, words in cases:
        refused = refusal(request, now=10.0)
        assert refused.code is code and words in refused.message, (request, refused.message)


def test_stop_text_needs_a_tokenizer_and_the_engine_has_the_last_word() -> None:
    bare = FakeEngine(ENGINE.config, tokenizer=None)
    assert "stop:" in refusal(Request(id="a", model="dep", input_ids=[1], stop=["x"]),
                              bare).message
    picky = FakeEngine(ENGINE.config, refuse="top_k: too large")
    assert refusal(Request(id="a", model="dep", input_ids=[1]), picky).message == \
        "top_k: too large"
