"""The HTTP gateway end to end: OpenAI client -> gateway -> Kafka -> worker -> back."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import orjson
import pytest

from edge.topic_admin import ensure_topics
from ferry.broker import free_port
from schemas import (
    RESULTS_TOPIC, Request, Result, SchemaError, Usage, decode_request, requests_topic,
)
from streams.front.client import FerryClient
from streams.front.gateway import GatewaySettings, serve
from streams.front.openai_format import (
    chunk_base, finish_chunk, host_name, parse_call, pick_model, role_chunk, text_chunk,
    usage_chunk,
)
from tests.harness import post
from workers.engine import Engine, GenerationInput, GenerationOutput, SamplingParams


def alone(engine: Engine, prompt: str | list[int], **params: object) -> GenerationOutput:
    """What the engine gives for this prompt (text or ids) run by itself."""
    ids = engine.encode(prompt) if isinstance(prompt, str) else prompt
    [out] = engine.generate([GenerationInput(ids, SamplingParams(**params))])
    return out


def chat_text(engine: Engine, messages: list[dict]) -> str:
    """The messages rendered with the tiny model's chat template, as the worker does."""
    request = decode_request(orjson.dumps({"id": "x", "model": "m", "messages": messages}))
    return engine.tokenizer.chat_template.render(request.messages)


def chat_ids(engine: Engine, messages: list[dict]) -> list[int]:
    return engine.tokenizer.encode(chat_text(engine, messages), add_special_tokens=False)


async def test_openai_client_completion_and_chat(start_worker, start_gateway, engine,
                                                 unique) -> None:
    dep = unique("gw")
    await start_worker(dep)
    gw = await start_gateway()
    async with gw.openai() as client:
        completion = await client.completions.create(model=dep, prompt="Hello Ferry",
                                                     max_tokens=8)
        want = alone(engine, "Hello Ferry", max_new_tokens=8)
        assert completion.model == dep and completion.object == "text_completion"
        assert completion.choices[0].text == want.text
        assert completion.choices[0].finish_reason == want.finish_reason
        assert completion.usage.completion_tokens == len(want.output_ids)
        assert completion.usage.prompt_tokens == want.prompt_tokens
        assert completion.usage.total_tokens == want.prompt_tokens + len(want.output_ids)

        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Name a ship."}]
        chat = await client.chat.completions.create(model=dep, messages=messages, max_tokens=6)
        want = alone(engine, chat_ids(engine, messages), max_new_tokens=6)
        assert chat_text(engine, messages) == "<s>system: Be brief.\nuser: Name a ship.\nassistant:"
        assert chat.object == "chat.completion" and chat.model == dep
        assert chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content == want.text
        assert chat.usage.completion_tokens == len(want.output_ids)

        with pytest.raises(openai.BadRequestError) as info:  # the worker refuses: mapped to 400
            await client.completions.create(model=dep, prompt="x", max_tokens=1 << 19)
        assert info.value.body["code"] == "prompt_too_long"


async def test_openai_client_streams(start_worker, start_gateway, engine, unique) -> None:
    dep = unique("gws")
    await start_worker(dep)
    gw = await start_gateway()
    async with gw.openai() as client:
        want = alone(engine, "The ship", max_new_tokens=7)
        stream = await client.completions.create(model=dep, prompt="The ship", max_tokens=7,
                                                 stream=True)
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].text for c in chunks) == want.text
        assert chunks[-1].choices[0].finish_reason == want.finish_reason

        messages = [{"role": "user", "content": "Hi"}]
        want = alone(engine, chat_ids(engine, messages), max_new_tokens=5)
        stream = await client.chat.completions.create(model=dep, messages=messages,
                                                      max_tokens=5, stream=True)
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
        assert chunks[-1].choices[0].finish_reason == want.finish_reason


async def test_version_path_and_host_routing(start_worker, start_gateway, http,
                                             unique) -> None:
    model = unique("llama")
    await start_worker(f"{model}-v1")
    await start_worker(f"{model}-v2")
    gw = await start_gateway(host_routes={"llama.example": f"{model}-v1"})
    for version in ("v1", "v2"):
        for path in ("completions", "chat/completions"):
            body = {"model": "ignored", "max_tokens": 2, "prompt": "x",
                    "messages": [{"role": "user", "content": "x"}]}
            if path == "completions":
                del body["messages"]
            else:
                del body["prompt"]
            status, obj = await post(
                http, f"{gw.url}/v1/models/{model}/versions/{version}/{path}", body)
            assert status == 200, obj
            assert obj["model"] == f"{model}-{version}"
    for body_model in ({}, {"model": "default"}):
        status, obj = await post(http, f"{gw.url}/v1/completions",
                                 {**body_model, "prompt": "x", "max_tokens": 2},
                                 headers={"Host": "llama.example:8080"})
        assert status == 200, obj
        assert obj["model"] == f"{model}-v1"
    async with http.get(f"{gw.url}/v1/models") as resp:
        listed = {m["id"] for m in (await resp.json())["data"]}
    assert {f"{model}-v1", f"{model}-v2"} <= listed


async def test_async_poll_and_events(start_worker, start_gateway, http, engine,
                                     unique) -> None:
    dep = unique("gwa")
    await start_worker(dep)
    gw = await start_gateway()
    want = alone(engine, "Once upon", max_new_tokens=4)
    status, accepted = await post(http, f"{gw.url}/v1/completions",
                                  {"model": dep, "prompt": "Once upon", "max_tokens": 4,
                                   "async": True})
    assert status == 202 and accepted["id"]
    async with http.get(f"{gw.url}/v1/requests/{accepted['id']}?wait=30") as resp:
        assert resp.status == 200
        obj = await resp.json()
    assert obj["id"] == accepted["id"] and obj["choices"][0]["text"] == want.text

    status, accepted = await post(http, f"{gw.url}/v1/chat/completions",
                                  {"model": dep, "max_tokens": 3,
                                   "messages": [{"role": "user", "content": "Hi"}]},
                                  headers={"Prefer": "respond-async"})
    assert status == 202
    async with http.get(f"{gw.url}/v1/requests/{accepted['id']}/events") as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        lines = [ln for ln in (await resp.text()).splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [orjson.loads(ln[6:]) for ln in lines[:-1]]
    want = alone(engine, chat_ids(engine, [{"role": "user", "content": "Hi"}]),
                 max_new_tokens=3)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want.text

    async with http.get(f"{gw.url}/v1/requests/nobody-knows?wait=0") as resp:
        assert resp.status == 404


async def test_any_gateway_answers_shared_results(start_worker, start_gateway, http, engine,
                                                  unique, kafka_bootstrap) -> None:
    """A request posted on Kafka with reply_to ferry.results, and an async call accepted by
    another gateway instance, are both readable by id on any gateway."""
    dep = unique("shared")
    await start_worker(dep)
    gw1, gw2 = await start_gateway(), await start_gateway()
    want = alone(engine, "Once upon", max_new_tokens=4)
    async with FerryClient(kafka_bootstrap, reply_to=RESULTS_TOPIC) as producer:
        rid = unique("kafka-producer")
        await producer.submit(Request(id=rid, model=dep, prompt="Once upon", max_new_tokens=4))
        async with http.get(f"{gw2.url}/v1/requests/{rid}?wait=30") as resp:
            assert resp.status == 200
            assert (await resp.json())["choices"][0]["text"] == want.text

    status, accepted = await post(http, f"{gw1.url}/v1/chat/completions",
                                  {"model": dep, "max_tokens": 4, "async": True,
                                   "messages": [{"role": "user", "content": "Hi"}]})
    assert status == 202
    async with http.get(f"{gw2.url}/v1/requests/{accepted['id']}?wait=30") as resp:
        assert resp.status == 200
        obj = await resp.json()
    assert obj["object"] == "chat.completion" and obj["id"] == accepted["id"]
    async with http.get(f"{gw2.url}/v1/requests/{accepted['id']}/events") as resp:
        lines = [ln for ln in (await resp.text()).splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3


async def test_pending_then_deadline(start_gateway, http, unique, kafka_bootstrap) -> None:
    dep = unique("idle")  # a topic but no worker: requests stay pending until the deadline
    await ensure_topics(kafka_bootstrap, {requests_topic(dep): 1})
    gw = await start_gateway(request_timeout_s=1.0)
    status, accepted = await post(http, f"{gw.url}/v1/completions",
                                  {"model": dep, "prompt": "x", "async": True})
    assert status == 202
    async with http.get(f"{gw.url}/v1/requests/{accepted['id']}?wait=0") as resp:
        assert resp.status == 202
        assert (await resp.json())["status"] == "pending"
    async with http.get(f"{gw.url}/v1/requests/{accepted['id']}?wait=10") as resp:
        assert resp.status == 504
        assert (await resp.json())["error"]["code"] == "deadline_exceeded"
    status, obj = await post(http, f"{gw.url}/v1/completions", {"model": dep, "prompt": "x"})
    assert status == 504 and obj["error"]["code"] == "deadline_exceeded"
    async with http.get(f"{gw.url}/v1/requests/{accepted['id']}?wait=nan") as resp:
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "wait"


JUNK_BODIES = [
    {"model": "m", "prompt": "x", "max_tokens": True}, {"model": "m", "prompt": "x", "seed": -1},
    {"model": "m", "prompt": "x", "temperature": "hot"}, {"model": "m", "prompt": "x", "stop": [1]},
    {"model": "m", "prompt": "x", "stop": 5}, {"model": 7, "prompt": "x"}, {"prompt": "x"},
    {"model": "m", "prompt": "x", "stream": "yes"}, {"model": "m", "prompt": "x", "top_p": 0},
    {"model": "m", "prompt": "x", "max_tokens": 10**30}, {"model": "m" * 500, "prompt": "x"},
    {"model": "m", "messages": "x"}, {"model": "m", "messages": [5]},
    {"model": "m", "prompt": "x", "stop": ["a"] * 100},
]


@pytest.mark.parametrize("path", ["completions", "chat/completions"])
async def test_junk_never_crashes(start_gateway, http, path) -> None:
    gw = await start_gateway()
    for body in JUNK_BODIES:
        status, obj = await post(http, f"{gw.url}/v1/{path}", body)
        assert 400 <= status < 500 and set(obj["error"]) == {"message", "type", "param", "code"}
    for url in ("/v1/nothing", "/v1/models/a/versions/b/completions"):
        status, obj = await post(http, gw.url + url, {"prompt": "x"})
        assert status in (400, 404) and "error" in obj
    async with http.get(f"{gw.url}/healthz") as resp:
        assert resp.status == 200


async def test_errors(start_gateway, http, unique) -> None:
    gw = await start_gateway(max_body_bytes=4096)
    url = f"{gw.url}/v1/completions"
    status, obj = await post(http, url, {"model": "m", "prompt": "x", "max_tokens": 0})
    assert status == 400 and obj["error"]["param"] == "max_tokens"
    assert "max_tokens" in obj["error"]["message"]
    status, obj = await post(http, url, {"model": "m", "prompt": "x", "max_tokens": "many"})
    assert status == 400 and obj["error"]["param"] == "max_tokens"
    status, obj = await post(http, url, {"model": "m", "prompt": ["x", ["y"]]})
    assert status == 400 and obj["error"]["param"] == "prompt[1]"
    status, obj = await post(http, url, {"model": "m", "prompt": {"text": "x"}})
    assert status == 400 and obj["error"]["param"] == "prompt"
    status, obj = await post(http, url, [1, 2, 3])
    assert status == 400 and obj["error"]["message"] == "body must be a JSON object"
    status, obj = await post(http, f"{gw.url}/v1/chat/completions",
                             {"model": "m", "messages": [{"role": "user"}]})
    assert status == 400 and obj["error"]["param"] == "messages[0].content"
    status, obj = await post(http, url, b"{not json")
    assert status == 400 and obj["error"]["code"] == "invalid_request"
    status, obj = await post(http, url, {"model": "m", "prompt": "x" * 10_000})
    assert status == 413 and obj["error"]["code"] == "request_too_large"
    for junk in (b"[]", b"null", b"42", b'"s"'):
        status, obj = await post(http, url, junk)
        assert status == 400 and "error" in obj

    start = time.monotonic()
    status, obj = await post(http, url, {"model": unique("nobody"), "prompt": "x"})
    assert status == 404 and obj["error"]["code"] == "unknown_model"
    assert obj["error"]["param"] == "model"
    assert time.monotonic() - start < 5

    async with http.get(f"{gw.url}/healthz") as resp:
        assert resp.status == 200
    async with http.get(f"{gw.url}/metrics") as resp:
        text = await resp.text()
    assert ('ferry_gateway_requests_total{reason="invalid_request",route="/v1/completions",'
            'status="400"}') in text
    assert gw.registry.get_sample_value(
        "ferry_gateway_requests_total",
        {"route": "/v1/completions", "status": "404", "reason": "unknown_model"}) == 1
    assert gw.registry.get_sample_value(
        "ferry_gateway_rejections_total", {"reason": "unknown_model"}) == 1
    assert gw.registry.get_sample_value(
        "ferry_gateway_request_latency_seconds_count", {"route": "/v1/completions"}) == 12
    assert gw.registry.get_sample_value("ferry_gateway_in_flight_requests") == 0


def test_host_name_strips_the_port() -> None:
    assert host_name("llama.example:8080") == "llama.example"
    assert host_name("llama.example") == "llama.example"
    assert host_name("[::1]:80") == "[::1]" and host_name("[::1]") == "[::1]"


async def test_serve_answers_until_cancelled(kafka_bootstrap, http) -> None:
    port = free_port()
    task = asyncio.create_task(serve(kafka_bootstrap, GatewaySettings(port=port)))
    deadline = time.monotonic() + 30
    while True:  # poll for readiness with a deadline (there is no ready signal to await)
        assert not task.done(), task.exception() if task.done() else None
        try:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                if resp.status == 200:
                    break
        except aiohttp.ClientConnectionError:
            assert time.monotonic() < deadline, "gateway did not answer within 30s"
            await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_openai_body_to_request_and_back() -> None:
    call = parse_call({"prompt": "p", "max_tokens": 3, "stop": "\n", "temperature": 0.5,
                       "seed": 1, "stream": True}, chat=False, model="m", prefer_async=False,
                      deadline=1.0)
    r = call.request
    assert (r.model, r.prompt, r.max_new_tokens, r.stop, r.temperature, r.seed, r.deadline) == (
        "m", "p", 3, ["\n"], 0.5, 1, 1.0)
    assert call.stream and not call.chat and not call.respond_async
    with pytest.raises(SchemaError) as info:
        parse_call({"messages": []}, chat=True, model="m", prefer_async=True, deadline=1.0)
    assert info.value.field == "messages"
    assert pick_model({"model": "default"}, None, "a.b:1", {"a.b": "x-v1"}) == "x-v1"
    assert pick_model({"model": "y"}, None, "a.b:1", {"a.b": "x-v1"}) == "y"
    assert pick_model({"model": "y"}, "x-v2", None, {}) == "x-v2"
    result = Result(id="i", model="m", text="hi", finish_reason="stop", usage=Usage(2, 1))
    base = chunk_base("i", "m", chat=True, created=0)
    assert role_chunk(base)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert text_chunk(base, True, "hi")["choices"][0]["delta"] == {"content": "hi"}
    assert finish_chunk(base, True, result)["choices"][0]["finish_reason"] == "stop"
    usage = usage_chunk(base, result)
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 3
    with pytest.raises(SchemaError) as info:
        parse_call({"prompt": "p", "stream_options": {"include_usage": True}}, chat=False,
                   model="m", prefer_async=False, deadline=1.0)
    assert info.value.field == "stream_options"
