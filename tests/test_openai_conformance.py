"""OpenAI conformance: every row of issue 13's "What a user meets today" in the HTTP surface,
driven with the official `openai` client (plain and streaming) through the real gateway
(API keys), router, worker and broker. Responses are parsed strictly with the client's
pydantic types and their required keys are checked against OpenAI's spec.

One stack for the module: a worker on the tiny model, an alias to it, a key, a gateway."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from prometheus_client import CollectorRegistry

from edge.topic_admin import ensure_topics
from ferry.broker import free_port
from schemas import SchemaError, decode_request, requests_topic
from streams.front.gateway import GatewaySettings, create_app
from streams.front.openai_fields import CHAT, COMPLETIONS, NOT_YET, Handling, check_fields
from streams.routing.keys import add_key
from streams.routing.routes import set_route
from tests.conftest import own_engine
from workers.config import WorkerConfig
from workers.engine import Engine, GenerationInput, GenerationOutput, SamplingParams
from workers.worker import Worker

pytestmark = pytest.mark.asyncio(loop_scope="module")

# OpenAI's required keys (openapi spec: CreateCompletionResponse, CreateChatCompletionResponse,
# CreateChatCompletionStreamResponse, Model, ErrorResponse).
COMPLETION_KEYS = {"id", "object", "created", "model", "choices"}
COMPLETION_CHOICE_KEYS = {"text", "index", "logprobs", "finish_reason"}
CHAT_CHOICE_KEYS = {"index", "message", "finish_reason", "logprobs"}
CHUNK_CHOICE_KEYS = {"index", "delta", "finish_reason"}
USAGE_KEYS = {"prompt_tokens", "completion_tokens", "total_tokens"}
MODEL_KEYS = {"id", "object", "created", "owned_by"}
ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass
class Stack:
    url: str
    api_key: str
    deployment: str
    alias: str
    engine: Engine
    idle: str        # a request topic with no worker
    dangling: str    # an alias naming no deployment

    def client(self, api_key: str | None = None) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", max_retries=0,
                                  api_key=api_key or self.api_key)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(kafka_bootstrap: str, tiny_model, engine: Engine, router
                ) -> AsyncIterator[Stack]:
    tag = uuid.uuid4().hex[:8]
    deployment, alias = f"conf-{tag}", f"conf-alias-{tag}"
    config = WorkerConfig(model_dir=tiny_model, deployment=deployment, bootstrap=kafka_bootstrap)
    worker = Worker(config, own_engine(engine, config), registry=CollectorRegistry())
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.ready.wait(), 60)
    idle, dangling = f"conf-idle-{tag}", f"conf-dangling-{tag}"
    await ensure_topics(kafka_bootstrap, {requests_topic(idle): 1})
    await set_route(kafka_bootstrap, alias, {deployment: 100})
    await set_route(kafka_bootstrap, dangling, {f"conf-nothing-{tag}": 100})
    api_key = await add_key(kafka_bootstrap, f"conf-{tag}")
    runner = web.AppRunner(create_app(kafka_bootstrap, GatewaySettings(
        auth=True, ingress=router.ingress), registry=CollectorRegistry()))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield Stack(f"http://127.0.0.1:{port}", api_key, deployment, alias, engine, idle, dangling)
    await runner.cleanup()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def alone(engine: Engine, ids: list[int], max_new_tokens: int) -> GenerationOutput:
    [out] = engine.generate([GenerationInput(ids, SamplingParams(max_new_tokens=max_new_tokens))])
    return out


def chat_ids(engine: Engine, messages: list[dict]) -> list[int]:
    request = decode_request(orjson.dumps({"id": "x", "model": "m", "messages": messages}))
    text = engine.tokenizer.chat_template.render(request.messages)
    return engine.tokenizer.encode(text, add_special_tokens=False)


def strict_completion(raw: dict[str, Any]) -> Completion:
    assert COMPLETION_KEYS | {"usage"} <= raw.keys() and raw["object"] == "text_completion"
    for choice in raw["choices"]:
        assert COMPLETION_CHOICE_KEYS <= choice.keys(), choice
    assert USAGE_KEYS <= raw["usage"].keys()
    return Completion.model_validate(raw, strict=False)


def strict_chat(raw: dict[str, Any]) -> ChatCompletion:
    assert COMPLETION_KEYS | {"usage"} <= raw.keys() and raw["object"] == "chat.completion"
    for choice in raw["choices"]:
        assert CHAT_CHOICE_KEYS <= choice.keys() and {"role", "content"} <= \
            choice["message"].keys(), choice
    return ChatCompletion.model_validate(raw)


async def raw_post(stack: Stack, path: str, body: Any, headers: dict | None = None
                   ) -> tuple[int, str, Any]:
    """(status, content type, parsed body: JSON, or the SSE events' data as a list)."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with aiohttp.ClientSession() as http, http.post(
            f"{stack.url}{path}", data=data, headers=headers or stack.auth) as resp:
        text = await resp.text()
        if resp.content_type == "text/event-stream":
            events = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
            return resp.status, resp.content_type, events
        return resp.status, resp.content_type, orjson.loads(text)


def stream_chunks(events: list[str], chat: bool) -> list[dict[str, Any]]:
    """Each event parsed and checked: OpenAI chunk keys, `[DONE]` last."""
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [orjson.loads(e) for e in events[:-1]]
    for chunk in chunks:
        assert COMPLETION_KEYS <= chunk.keys(), chunk
        for choice in chunk["choices"]:
            assert (CHUNK_CHOICE_KEYS if chat else COMPLETION_CHOICE_KEYS) <= choice.keys()
        if chat:
            ChatCompletionChunk.model_validate(chunk)
        elif all(c["finish_reason"] for c in chunk["choices"]):
            # OpenAI streams completions as Completion objects whose finish_reason is null
            # until the last; the type admits only the final ones.
            Completion.model_validate(chunk)
    return chunks


def assert_error(raw: dict[str, Any], param: str | None) -> dict[str, Any]:
    assert set(raw) == {"error"} and ERROR_KEYS <= raw["error"].keys(), raw
    assert raw["error"]["param"] == param, raw
    return raw["error"]


# ---- the field table ---------------------------------------------------------------------

async def test_the_field_table_is_consistent() -> None:
    """NOT_YET holds only sampling fields (emptied as the sampling module lands); every
    refused field says why."""
    for table in (COMPLETIONS, CHAT):
        for name, field in table.items():
            assert name not in NOT_YET or field.handling is Handling.SAMPLING, name
            if field.handling is Handling.REFUSED:
                assert field.reason, name


async def test_neutral_values_are_type_strict_and_unknown_fields_are_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    assert check_fields({"n": 1, "presence_penalty": 0.0, "tools": [], "echo": False},
                        chat=False) == ["tools"]  # tools is a chat field: unknown here
    for body in ({"store": 0}, {"tools": {}}, {"response_format": {"type": "json_schema"}},
                 {"modalities": ["text", "audio"]}, {"tool_choice": "required"}):
        with pytest.raises(SchemaError) as info:  # 0 is not False, {} is not []
            check_fields(body, chat=True)
        assert info.value.field == next(iter(body))
    name = f"made_up_{uuid.uuid4().hex[:6]}"
    with caplog.at_level("WARNING", logger="ferry.gateway"):
        assert check_fields({name: 1}, chat=True) == [name]
        assert check_fields({name: 2}, chat=True) == [name]
    assert sum(name in r.getMessage() for r in caplog.records) == 1


# ---- silently ignored: now refused with a 400 naming the field, or honoured -------------

def _refused(table: dict, cases: list[dict]) -> list[dict]:
    """The cases whose field is refused now (a sampling field leaves once it is implemented)."""
    return [c for c in cases if next(iter(c)) in NOT_YET
            or table[next(iter(c))].handling is Handling.REFUSED]


REFUSED_COMPLETIONS = [
    {"n": 2}, {"best_of": 3}, {"logprobs": 2}, {"echo": True}, {"presence_penalty": 0.5},
    {"frequency_penalty": 5}, {"logit_bias": {"5": -100}}, {"suffix": " the end"},
    {"top_k": 5}, {"min_tokens": 2}, {"ignore_eos": True}, {"stop_token_ids": [3]},
]
REFUSED_CHAT = [
    {"n": 2}, {"logprobs": True}, {"top_logprobs": 2}, {"presence_penalty": -1},
    {"logit_bias": {"7": 100}},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    {"tool_choice": "auto"}, {"response_format": {"type": "json_object"}},
    {"functions": [{"name": "f"}]}, {"audio": {"voice": "alloy", "format": "mp3"}},
    {"store": True}, {"reasoning_effort": "low"},
]


@pytest.mark.parametrize("extra", _refused(COMPLETIONS, REFUSED_COMPLETIONS),
                         ids=lambda e: next(iter(e)))
async def test_completions_fields_not_honoured_are_a_400_naming_them(stack, extra) -> None:
    [name] = extra
    async with stack.client() as api:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as info:
                await api.completions.create(model=stack.alias, prompt="Hi", max_tokens=2,
                                             stream=stream, extra_body=extra)
            assert info.value.body["param"] == name and name in info.value.body["message"]
            assert info.value.body["code"] == "invalid_request"


@pytest.mark.parametrize("extra", _refused(CHAT, REFUSED_CHAT), ids=lambda e: next(iter(e)))
async def test_chat_fields_not_honoured_are_a_400_naming_them(stack, extra) -> None:
    [name] = extra
    async with stack.client() as api:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as info:
                await api.chat.completions.create(
                    model=stack.alias, messages=[{"role": "user", "content": "Hi"}],
                    max_tokens=2, stream=stream, extra_body=extra)
            assert info.value.body["param"] == name and name in info.value.body["message"]


async def test_neutral_values_and_unknown_fields_are_accepted(stack) -> None:
    """Defaults sent explicitly (as LangChain does) ask for nothing; fields OpenAI does not
    define are ignored, as vLLM does."""
    ids = stack.engine.encode("Hi")
    want = alone(stack.engine, ids, 3)
    async with stack.client() as api:
        got = await api.completions.create(
            model=stack.alias, prompt="Hi", max_tokens=3, n=1, best_of=1, echo=False,
            presence_penalty=0, frequency_penalty=0.0, logit_bias={}, suffix=None,
            user="u-1", extra_body={"frobnicate": {"x": 1}})
        assert got.choices[0].text == want.text
        messages = [{"role": "user", "content": "Hi"}]
        chat = await api.chat.completions.create(
            model=stack.alias, messages=messages, max_tokens=3, n=1, logprobs=False,
            tools=[], tool_choice="none", response_format={"type": "text"},
            parallel_tool_calls=False, store=False, metadata={"k": "v"},
            service_tier="auto", extra_body={"frobnicate": 2})
        assert chat.choices[0].message.content == alone(
            stack.engine, chat_ids(stack.engine, messages), 3).text


async def test_max_completion_tokens_is_honoured_and_wins(stack) -> None:
    messages = [{"role": "user", "content": "Tell me"}]
    ids = chat_ids(stack.engine, messages)
    want = alone(stack.engine, ids, 4)
    async with stack.client() as api:
        for limits in ({"max_completion_tokens": 4}, {"max_completion_tokens": 4,
                                                      "max_tokens": 9}):
            chat = await api.chat.completions.create(model=stack.alias, messages=messages,
                                                     **limits)
            assert chat.usage.completion_tokens == len(want.output_ids)
            assert chat.choices[0].message.content == want.text
            chunks = [c async for c in await api.chat.completions.create(
                model=stack.alias, messages=messages, stream=True, **limits)]
            assert "".join(c.choices[0].delta.content or "" for c in chunks
                           if c.choices) == want.text
        with pytest.raises(openai.BadRequestError) as info:
            await api.chat.completions.create(model=stack.alias, messages=messages,
                                              max_completion_tokens=0)
        assert info.value.body["param"] == "max_completion_tokens"
        with pytest.raises(openai.BadRequestError) as info:  # a chat field on completions
            await api.completions.create(model=stack.alias, prompt="x",
                                         extra_body={"max_completion_tokens": 4})
        assert info.value.body["param"] == "max_completion_tokens"


# ---- chat: no max_tokens is the rest of the context --------------------------------------

async def test_chat_without_a_limit_runs_to_the_rest_of_the_context(stack) -> None:
    messages = [{"role": "user", "content": "Hello there"}]
    ids = chat_ids(stack.engine, messages)
    want = alone(stack.engine, ids, stack.engine.max_context - len(ids))
    assert len(want.output_ids) > 16  # the old default would have cut it
    async with stack.client() as api:
        chat = await api.chat.completions.create(model=stack.alias, messages=messages)
        assert chat.choices[0].message.content == want.text
        assert chat.usage.completion_tokens == len(want.output_ids)
        assert chat.choices[0].finish_reason == want.finish_reason
        with pytest.raises(openai.BadRequestError) as info:  # unknown roles: a 400
            await api.chat.completions.create(model=stack.alias,
                                              messages=[{"role": "banana", "content": "x"}])
        assert info.value.body["param"].startswith("messages[0].role")


async def test_agent_shaped_chats_are_accepted(stack) -> None:
    """Content as text parts, and an assistant tool call (content null) answered by a tool
    message, as agent frameworks send them: rendered by the template (issue 13's item 2)."""
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                                     {"type": "text", "text": "In Oslo."}]},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    want = alone(stack.engine, chat_ids(stack.engine, messages), 4)
    async with stack.client() as api:
        raw = await api.chat.completions.with_raw_response.create(
            model=stack.alias, messages=messages, max_tokens=4)
        chat = strict_chat(orjson.loads(raw.content))
        assert chat.choices[0].message.content == want.text
        chunks = [c async for c in await api.chat.completions.create(
            model=stack.alias, messages=messages, max_tokens=4, stream=True)]
        assert "".join(c.choices[0].delta.content or "" for c in chunks
                       if c.choices) == want.text


# ---- common shapes: prompt lists and token ids ----------------------------------------

async def test_prompt_lists_and_token_ids(stack) -> None:
    engine = stack.engine
    texts = ["Once upon", "The ship", "Hello"]
    ids = [engine.encode(t) for t in texts]
    wants = [alone(engine, i, 5) for i in ids]
    async with stack.client() as api:
        for prompt in (texts, ids, [texts[0], ids[1], texts[2]]):
            raw = await api.completions.with_raw_response.create(
                model=stack.alias, prompt=prompt, max_tokens=5)
            got = strict_completion(orjson.loads(raw.content))
            assert [c.index for c in got.choices] == [0, 1, 2]
            assert [c.text for c in got.choices] == [w.text for w in wants]
            assert got.usage.prompt_tokens == sum(len(i) for i in ids)
            assert got.usage.completion_tokens == sum(len(w.output_ids) for w in wants)
            assert got.model == stack.deployment
        single = await api.completions.create(model=stack.alias, prompt=ids[0], max_tokens=5)
        assert single.choices[0].text == wants[0].text and len(single.choices) == 1
        # n samples per prompt: choice prompt_i * n + j (greedy, so every sample is the same).
        sampled = await api.completions.create(model=stack.alias, prompt=texts[:2], n=2,
                                               max_tokens=5)
        assert [c.index for c in sampled.choices] == [0, 1, 2, 3]
        assert [c.text for c in sampled.choices] == [wants[0].text] * 2 + [wants[1].text] * 2
        with pytest.raises(openai.BadRequestError) as info:  # one prompt's fault is named
            await api.completions.create(model=stack.alias, prompt=[ids[0], [1, 10**6]],
                                         max_tokens=5)
        assert info.value.body["param"] == "prompt[1]"
        # Streamed: the prompts' chunks interleave, each carrying its choice index.
        stream = await api.completions.create(model=stack.alias, prompt=texts, max_tokens=5,
                                              stream=True,
                                              stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        texts_by_index: dict[int, str] = {}
        finishes: dict[int, str] = {}
        for chunk in chunks[:-1]:
            [choice] = chunk.choices
            texts_by_index[choice.index] = texts_by_index.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
        assert texts_by_index == {i: w.text for i, w in enumerate(wants)}
        assert finishes == {i: w.finish_reason for i, w in enumerate(wants)}
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == sum(
            len(w.output_ids) for w in wants)
        assert len({c.id for c in chunks}) == 1
        with pytest.raises(openai.BadRequestError) as info:  # refused before the first byte
            await api.completions.create(model=stack.alias, prompt=[ids[0], [1, 10**6]],
                                         max_tokens=5, stream=True)
        assert info.value.body["param"] == "prompt[1]"
        with pytest.raises(openai.BadRequestError) as info:
            await api.completions.create(model=stack.alias, prompt=texts,
                                         extra_body={"async": True})
        assert info.value.body["param"] == "async"
        with pytest.raises(openai.BadRequestError) as info:
            await api.completions.create(model=stack.alias, prompt=[])
        assert info.value.body["param"] == "prompt"


# ---- errors before the stream ----------------------------------------------------------

async def test_errors_come_before_the_first_byte_and_name_the_field(stack) -> None:
    async with stack.client() as api:
        for stream in (False, True):
            # Past the context because of max_tokens: a 400 naming max_tokens, never SSE.
            with pytest.raises(openai.BadRequestError) as info:
                await api.completions.create(model=stack.alias, prompt="Hi", max_tokens=1000,
                                             stream=stream)
            assert info.value.body["code"] == "prompt_too_long"
            assert info.value.body["param"] == "max_tokens", info.value.body
            assert "max_tokens" in info.value.body["message"]
            with pytest.raises(openai.BadRequestError) as info:  # the prompt fills it alone
                await api.completions.create(model=stack.alias, prompt=[5] * 300,
                                             max_tokens=1, stream=stream)
            assert info.value.body["param"] == "prompt"
            with pytest.raises(openai.NotFoundError):
                await api.completions.create(model="conf-nobody", prompt="x", stream=stream)
            with pytest.raises(openai.BadRequestError) as info:  # chat's own limit is named
                await api.chat.completions.create(
                    model=stack.alias, messages=[{"role": "user", "content": "Hi"}],
                    max_completion_tokens=1000, stream=stream)
            assert info.value.body["param"] == "max_completion_tokens"
            assert "max_completion_tokens" in info.value.body["message"]
    assert len(stack.engine.encode("x" * 300)) > stack.engine.max_context
    for path in ("/v1/completions", "/v1/chat/completions"):
        status, kind, raw = await raw_post(stack, path, [1, 2, 3])
        assert status == 400 and kind == "application/json"
        assert assert_error(raw, None)["message"] == "body must be a JSON object"
        status, kind, raw = await raw_post(
            stack, path, {"model": stack.alias, "prompt": "x" * 300, "max_tokens": 1,
                          "messages": [{"role": "user", "content": "x" * 300}],
                          "stream": True})
        assert status == 400 and kind == "application/json"
        assert assert_error(raw, "prompt" if path == "/v1/completions" else "messages")


# ---- endpoints ------------------------------------------------------------------------

async def test_models_need_a_key_and_list_only_what_serves(stack) -> None:
    async with stack.client(api_key="fk_nobody_nothing") as api:
        with pytest.raises(openai.AuthenticationError):
            await api.models.list()
        with pytest.raises(openai.AuthenticationError):
            await api.models.retrieve(stack.alias)
    async with stack.client() as api:
        listed = {m.id: m for m in (await api.models.list()).data}
        assert {stack.alias, stack.deployment} <= listed.keys()
        assert stack.idle not in listed and stack.dangling not in listed
        one = await api.models.retrieve(stack.alias)
        assert one.id == stack.alias and one.object == "model"
        with pytest.raises(openai.NotFoundError) as info:
            await api.models.retrieve(stack.idle)
        assert info.value.body["code"] == "unknown_model"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stack.url}/v1/models", headers=stack.auth) as resp:
            raw = await resp.json()
        assert raw["object"] == "list"
        for model in raw["data"]:
            assert MODEL_KEYS <= model.keys()
            Model.model_validate(model)
        async with http.get(f"{stack.url}/v1/models/{stack.idle}", headers=stack.auth) as resp:
            assert resp.status == 404 and resp.content_type == "application/json"
            assert_error(await resp.json(), "model")
        async with http.get(f"{stack.url}/health") as resp:
            assert resp.status == 200
        async with http.get(f"{stack.url}/healthz") as resp:
            assert resp.status == 200
        async with http.get(f"{stack.url}/version") as resp:
            assert resp.status == 200 and isinstance((await resp.json())["version"], str)


async def test_usage_in_streams_only_when_asked(stack) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    want = alone(stack.engine, chat_ids(stack.engine, messages), 4)
    for include in (None, False, True):
        body: dict[str, Any] = {"model": stack.alias, "messages": messages, "max_tokens": 4,
                                "stream": True}
        if include is not None:
            body["stream_options"] = {"include_usage": include}
        status, kind, events = await raw_post(stack, "/v1/chat/completions", body)
        assert status == 200 and kind == "text/event-stream"
        chunks = stream_chunks(events, chat=True)
        usage = [c for c in chunks if c.get("usage")]
        if include:
            assert len(usage) == 1 and usage[0] is chunks[-1] and usage[0]["choices"] == []
            assert usage[0]["usage"]["completion_tokens"] == len(want.output_ids)
        else:
            assert not usage
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                       if c["choices"]) == want.text
    status, _, events = await raw_post(stack, "/v1/completions", {
        "model": stack.alias, "prompt": "Hi", "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True}})
    chunks = stream_chunks(events, chat=False)
    assert chunks[-1]["choices"] == [] and USAGE_KEYS <= chunks[-1]["usage"].keys()


async def test_plain_responses_parse_strictly(stack) -> None:
    async with stack.client() as api:
        raw = await api.completions.with_raw_response.create(model=stack.alias, prompt="Hi",
                                                            max_tokens=3)
        strict_completion(orjson.loads(raw.content))
        raw = await api.chat.completions.with_raw_response.create(
            model=stack.alias, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        strict_chat(orjson.loads(raw.content))


# ---- streamed sampling fields: the chunks concatenate to the non-streamed answer --------

def _same_logprobs(got: Any, want: Any) -> None:
    """Equal token texts, offsets and keys; logprobs equal to float noise (two runs of the
    engine, the second maybe from the prefix cache)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (got, want)
        for key in want:
            _same_logprobs(got[key], want[key])
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (got, want)
        for g, w in zip(got, want):
            _same_logprobs(g, w)
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-4)
    else:
        assert got == want


def _completion_pieces(chunks: list[Completion]) -> tuple[dict[int, str], dict[int, dict],
                                                          dict[int, str]]:
    """Per choice index: the streamed text, the concatenated logprobs, the finish reason."""
    texts: dict[int, str] = {}
    lps: dict[int, dict[str, list]] = {}
    finishes: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.logprobs is not None:
                acc = lps.setdefault(choice.index, {k: [] for k in (
                    "tokens", "token_logprobs", "top_logprobs", "text_offset")})
                for key, values in acc.items():
                    values += getattr(choice.logprobs, key)
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    return texts, lps, finishes


async def _warm(api: openai.AsyncOpenAI, stack: Stack) -> None:
    """A worker's first delta to a new stream topic waits for its metadata (and can come
    after a short result): warm the path before counting chunks."""
    [_ async for _ in await api.completions.create(model=stack.alias, prompt="x",
                                                   max_tokens=2, stream=True)]


async def test_streamed_logprobs_concatenate_to_the_answer(stack) -> None:
    async with stack.client() as api:
        await _warm(api, stack)
        args: dict[str, Any] = {"model": stack.alias, "prompt": "The ship", "max_tokens": 12,
                                "logprobs": 3}
        plain = await api.completions.create(**args)
        chunks = [c async for c in await api.completions.create(**args, stream=True)]
        texts, lps, finishes = _completion_pieces(chunks)
        assert texts == {0: plain.choices[0].text} and plain.choices[0].text
        assert finishes == {0: plain.choices[0].finish_reason}
        _same_logprobs(lps[0], plain.choices[0].logprobs.model_dump())
        assert len(lps[0]["tokens"]) == plain.usage.completion_tokens
        with_lp = [c for c in chunks if c.choices and c.choices[0].logprobs is not None]
        assert len(with_lp) > 1  # per chunk, not once at the end

        messages = [{"role": "user", "content": "Tell me about ships"}]
        args = {"model": stack.alias, "messages": messages, "max_tokens": 12,
                "logprobs": True, "top_logprobs": 2}
        chat = await api.chat.completions.create(**args)
        chunks = [c async for c in await api.chat.completions.create(**args, stream=True)]
        assert "".join(c.choices[0].delta.content or "" for c in chunks
                       if c.choices) == chat.choices[0].message.content
        content = [t.model_dump() for c in chunks if c.choices and c.choices[0].logprobs
                   for t in c.choices[0].logprobs.content]
        assert len(content) == chat.usage.completion_tokens > 1
        _same_logprobs(content, [t.model_dump() for t in chat.choices[0].logprobs.content])
        assert sum(1 for c in chunks if c.choices and c.choices[0].logprobs) > 1
        no = [c async for c in await api.chat.completions.create(
            model=stack.alias, messages=messages, max_tokens=4, stream=True)]
        assert all(c.choices[0].logprobs is None for c in no if c.choices)


async def test_streamed_n_choices_interleave_under_their_index(stack) -> None:
    async with stack.client() as api:
        await _warm(api, stack)
        args: dict[str, Any] = {"model": stack.alias, "prompt": "The ship", "max_tokens": 10,
                                "temperature": 1.0, "seed": 11, "n": 3, "logprobs": 1}
        plain = await api.completions.create(**args)
        assert len({c.text for c in plain.choices}) > 1  # samples that differ
        chunks = [c async for c in await api.completions.create(
            **args, stream=True, stream_options={"include_usage": True})]
        texts, lps, finishes = _completion_pieces(chunks)
        assert texts == {c.index: c.text for c in plain.choices}
        assert finishes == {c.index: c.finish_reason for c in plain.choices}
        for c in plain.choices:
            _same_logprobs(lps[c.index], c.logprobs.model_dump())
        assert chunks[-1].choices == []
        assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
        order = [c.choices[0].index for c in chunks if c.choices and c.choices[0].text]
        assert order != sorted(order)  # interleaved as generated, not one choice after another
        assert len({c.id for c in chunks}) == 1

        messages = [{"role": "user", "content": "Hi"}]
        args = {"model": stack.alias, "messages": messages, "max_tokens": 8,
                "temperature": 1.0, "seed": 4, "n": 2}
        chat = await api.chat.completions.create(**args)
        chunks = [c async for c in await api.chat.completions.create(**args, stream=True)]
        roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role]
        assert roles == [0, 1]
        content: dict[int, str] = {}
        for c in chunks:
            content[c.choices[0].index] = (content.get(c.choices[0].index, "")
                                           + (c.choices[0].delta.content or ""))
        assert content == {c.index: c.message.content for c in chat.choices}
        assert {c.choices[0].index: c.choices[0].finish_reason for c in chunks
                if c.choices[0].finish_reason} == {c.index: c.finish_reason for c in chat.choices}

        # A list of prompts with n: choice prompt_i * n + j, streamed as it is answered.
        args = {"model": stack.alias, "prompt": ["The ship", "Hello"], "max_tokens": 6,
                "temperature": 1.0, "seed": 3, "n": 2}
        plain_many = await api.completions.create(**args)
        many = [c async for c in await api.completions.create(**args, stream=True)]
        assert _completion_pieces(many)[0] == {c.index: c.text for c in plain_many.choices}
        assert sorted(c.index for c in plain_many.choices) == [0, 1, 2, 3]

        # best_of = n streams the n samples; more than n cannot stream (as OpenAI).
        same = [c async for c in await api.completions.create(
            model=stack.alias, prompt="The ship", max_tokens=10, temperature=1.0, seed=11,
            n=3, best_of=3, stream=True)]
        assert _completion_pieces(same)[0] == texts
        with pytest.raises(openai.BadRequestError) as info:
            await api.completions.create(model=stack.alias, prompt="The ship", max_tokens=4,
                                         n=2, best_of=3, stream=True)
        assert info.value.body["param"] == "best_of"
        assert (await api.completions.create(model=stack.alias, prompt="The ship",
                                             max_tokens=4, n=2, best_of=3)).choices


async def test_streamed_echo_sends_the_prompt_first(stack) -> None:
    prompt = "The ship sailed"
    ids = stack.engine.encode(prompt)
    async with stack.client() as api:
        for extra in ({}, {"logprobs": 2}, {"n": 2, "temperature": 1.0, "seed": 5}):
            args: dict[str, Any] = {"model": stack.alias, "prompt": prompt, "max_tokens": 6,
                                    "echo": True, **extra}
            plain = await api.completions.create(**args)
            chunks = [c async for c in await api.completions.create(**args, stream=True)]
            texts, lps, _ = _completion_pieces(chunks)
            assert texts == {c.index: c.text for c in plain.choices}, extra
            firsts = {}
            for c in chunks:
                firsts.setdefault(c.choices[0].index, c.choices[0])
            assert {i: f.text for i, f in firsts.items()} == {
                c.index: prompt for c in plain.choices}
            if "logprobs" in extra:
                head = firsts[0].logprobs
                assert len(head.tokens) == len(ids) and head.token_logprobs[0] is None
                assert "".join(head.tokens) == prompt and head.text_offset[0] == 0
                _same_logprobs(lps[0], plain.choices[0].logprobs.model_dump())
            else:
                assert not lps and all(c.logprobs is None for c in plain.choices)


async def test_async_calls_with_samples(stack) -> None:
    """An async call streams for its events endpoint: n samples do, best_of (picked at the
    end) is answered whole."""
    body = {"model": stack.alias, "prompt": "The ship", "max_tokens": 6, "temperature": 1.0,
            "seed": 8, "async": True}
    async with stack.client() as api:
        want = await api.completions.create(model=stack.alias, prompt="The ship",
                                            max_tokens=6, temperature=1.0, seed=8, n=2)
    for extra in ({"n": 2}, {"n": 2, "best_of": 3}):
        status, _, accepted = await raw_post(stack, "/v1/completions", {**body, **extra})
        assert status == 202, accepted
        async with aiohttp.ClientSession() as http, http.get(
                f"{stack.url}/v1/requests/{accepted['id']}?wait=30", headers=stack.auth) as resp:
            got = strict_completion(await resp.json())
        assert [c.index for c in got.choices] == [0, 1], extra
        if "best_of" not in extra:
            assert [c.text for c in got.choices] == [c.text for c in want.choices]
