"""What the worker refuses before the engine, and why: pure, no broker, no model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from schemas import ErrorCode, Request, decode_request
from workers.admission import Refused, admit
from workers.chat_template import ChatTemplate
from workers.engine import EngineRequest
from workers.model import ModelConfig
from workers.tokenizer import load_tokenizer


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


def test_rest_of_the_context_and_who_is_at_fault() -> None:
    """max_new_tokens 0 (the gateway's chat default) is what the context leaves; past the
    context, max_new_tokens is named when the prompt alone fits, the prompt when it fills it."""
    got = admit(Request(id="a", model="dep", input_ids=[1] * 60, max_new_tokens=0), "t/0@1",
                "dep", ENGINE)
    assert got.params.max_new_tokens == ENGINE.max_context - 60
    assert refusal(Request(id="a", model="dep", input_ids=[1] * 60, max_new_tokens=5)
                   ).message.startswith("max_new_tokens: prompt of 60 tokens")
    for limit in (0, 1):
        refused = refusal(Request(id="a", model="dep", input_ids=[1] * 64,
                                  max_new_tokens=limit))
        assert refused.code is ErrorCode.PROMPT_TOO_LONG
        assert refused.message.startswith("prompt: 64 tokens leave no room"), refused.message


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


# ---- chat messages: rendered with the deployment's template, tokenised as they are ------

def chat_request(*messages: dict, **fields: object) -> Request:
    return Request(id="a", model="dep", messages=decode_request(orjson.dumps(
        {"id": "a", "model": "dep", "messages": list(messages)})).messages, **fields)


HI = {"role": "user", "content": "Hello Ferry!"}


def test_chat_is_rendered_with_the_template_and_bos_comes_once(tiny_model: Path) -> None:
    tokenizer = load_tokenizer(tiny_model)
    assert tokenizer is not None
    engine = FakeEngine(dataclasses.replace(ENGINE.config, vocab_size=512), tokenizer=tokenizer,
                        max_context=256)
    got = admit(chat_request({"role": "system", "content": "Be brief."}, HI), "t/0@1", "dep",
                engine, now=0.0, chat_template=tokenizer.chat_template)
    # The tiny template writes "<s>" itself; encoding the same text plainly adds it once.
    assert got.input_ids == tokenizer.encode("system: Be brief.\nuser: Hello Ferry!\nassistant:")
    assert got.input_ids.count(tokenizer.bos_id) == 1


def test_chat_refusals_name_messages(tiny_model: Path) -> None:
    tokenizer = load_tokenizer(tiny_model)
    assert tokenizer is not None and tokenizer.chat_template is not None
    engine = FakeEngine(ENGINE.config, tokenizer=tokenizer, max_context=20)
    strict = ChatTemplate("{{ raise_exception('roles must alternate') }}", "t",
                          tokenizer.special_tokens)
    empty = ChatTemplate("{% if false %}x{% endif %}", "t", tokenizer.special_tokens)
    cases = [
        (engine, None, ErrorCode.INVALID_REQUEST,
         "none was configured (ferry worker --chat-template FILE)"),
        (FakeEngine(ENGINE.config, tokenizer=None), tokenizer.chat_template,
         ErrorCode.INVALID_REQUEST, "messages: this deployment has no tokenizer"),
        (engine, strict, ErrorCode.INVALID_REQUEST,
         "messages: the chat template refused them: roles must alternate"),
        (engine, empty, ErrorCode.INVALID_REQUEST, "messages: render to no tokens"),
        (engine, tokenizer.chat_template, ErrorCode.PROMPT_TOO_LONG,
         "tokens + max_new_tokens 16 exceed the context of 20"),
    ]
    for fake, template, code, words in cases:
        with pytest.raises(Refused) as caught:
            admit(chat_request(HI), "t/0@1", "dep", fake, now=0.0, chat_template=template)
        message = caught.value.message
        # Past the context with room left for the prompt: max_new_tokens is at fault.
        field = "max_new_tokens: " if code is ErrorCode.PROMPT_TOO_LONG else "messages: "
        assert caught.value.code is code and message.startswith(field) and \
            words in message, message
