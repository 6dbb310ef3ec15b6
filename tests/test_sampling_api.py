"""Sampling parameters through the real stack: the official `openai` client -> gateway ->
Kafka -> worker -> engine and back, compared with the engine run in-process."""

from __future__ import annotations

import openai
import pytest

from schemas import SchemaError
from streams.openai_format import parse_call
from tests.harness import post
from workers.engine import Engine, GenerationInput, GenerationOutput, SamplingParams

PROMPT = "Once upon a time there was a small ship that sailed between two islands"


def alone(engine: Engine, prompt: str, **params: object) -> GenerationOutput:
    [out] = engine.generate([GenerationInput(engine.encode(prompt),
                                             SamplingParams(**params))])  # type: ignore[arg-type]
    return out


async def test_processors_through_the_gateway(start_worker, start_gateway, engine,
                                              unique) -> None:
    dep = unique("samp")
    await start_worker(dep)
    gw = await start_gateway()
    async with gw.openai() as client:
        greedy = alone(engine, PROMPT, max_new_tokens=24)
        first = greedy.output_ids[0]
        biased = await client.completions.create(model=dep, prompt=PROMPT, max_tokens=24,
                                                 logit_bias={str(first): -100})
        want = alone(engine, PROMPT, max_new_tokens=24, logit_bias=((first, -100.0),))
        assert want.output_ids[0] != first and biased.choices[0].text == want.text

        pen = await client.completions.create(model=dep, prompt=PROMPT, max_tokens=24,
                                              presence_penalty=2.0, frequency_penalty=1.0)
        want = alone(engine, PROMPT, max_new_tokens=24, presence_penalty=2.0,
                     frequency_penalty=1.0)
        assert pen.choices[0].text == want.text != greedy.text

        rep = await client.chat.completions.create(
            model=dep, messages=[{"role": "user", "content": PROMPT}], max_tokens=8,
            extra_body={"repetition_penalty": 1.5, "top_k": -1, "min_p": 0.0,
                        "min_tokens": 2, "ignore_eos": True})
        assert rep.usage.completion_tokens == 8  # ignore_eos: runs to max_tokens

        with pytest.raises(openai.BadRequestError) as info:  # the worker checks the vocabulary
            await client.completions.create(model=dep, prompt=PROMPT, max_tokens=2,
                                            logit_bias={"99999999": 5})
        assert info.value.body["param"] == "logit_bias"


async def test_out_of_range_fields_are_400s_naming_them(start_gateway, http) -> None:
    gw = await start_gateway()
    url = f"{gw.url}/v1/completions"
    for field, value in [("presence_penalty", 5), ("frequency_penalty", -2.5),
                         ("temperature", 3), ("logit_bias", {"1": 200}),
                         ("logit_bias", {"one": 1}), ("logit_bias", [1]), ("top_k", -2),
                         ("min_p", 2), ("repetition_penalty", 0), ("ignore_eos", "yes"),
                         ("stop_token_ids", [-1]), ("min_tokens", 99)]:
        status, obj = await post(http, url, {"model": "m", "prompt": "x", "max_tokens": 4,
                                             field: value})
        assert status == 400 and obj["error"]["param"] == field, (field, obj)


def test_body_to_request() -> None:
    call = parse_call({"prompt": "x", "logit_bias": {"5": -100, "7": 2}, "top_k": -1,
                       "presence_penalty": -2, "stop_token_ids": [3], "min_tokens": 1},
                      chat=False, model="m", prefer_async=False, deadline=1e10)
    r = call.request
    assert [(b.token, b.bias) for b in r.logit_bias] == [(5, -100.0), (7, 2.0)]
    assert r.top_k == 0 and r.presence_penalty == -2.0 and r.stop_token_ids == [3]
    with pytest.raises(SchemaError) as err:
        parse_call({"prompt": "x", "presence_penalty": 5}, chat=False, model="m",
                   prefer_async=False, deadline=1e10)
    assert err.value.field == "presence_penalty"
