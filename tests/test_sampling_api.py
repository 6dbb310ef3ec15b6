"""Sampling parameters through the real stack: the official `openai` client -> gateway ->
Kafka -> worker -> engine and back, compared with the engine run in-process."""

from __future__ import annotations

import openai
import pytest

from schemas import SchemaError
from streams.front.openai_format import parse_call
from tests.harness import post
from workers.engine import Engine, EngineRequest, GenerationInput, GenerationOutput, SamplingParams

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


async def test_logprobs_and_echo(start_worker, start_gateway, engine, unique) -> None:
    dep = unique("lp")
    await start_worker(dep)
    gw = await start_gateway()
    ids = engine.encode("The ship")
    [want] = engine.generate([GenerationInput(ids, SamplingParams(
        max_new_tokens=5, logprobs=3, prompt_logprobs=3))])
    done = engine._run([EngineRequest("x", ids, SamplingParams(
        max_new_tokens=5, logprobs=3, prompt_logprobs=3))])["x"]
    assert done.logprobs is not None and done.prompt_logprobs is not None
    text = lambda t: engine.tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
    async with gw.openai() as client:
        c = await client.completions.create(model=dep, prompt="The ship", max_tokens=5,
                                            logprobs=3)
        lp = c.choices[0].logprobs
        assert lp.tokens == [text(t) for t in want.output_ids]
        assert lp.token_logprobs == pytest.approx([e.logprob for e in done.logprobs], abs=1e-4)
        # keyed by text, as OpenAI's are (two partial UTF-8 tokens both read U+FFFD)
        assert [list(d) for d in lp.top_logprobs] == [list({text(t): 0 for t, _ in e.top})
                                                      for e in done.logprobs]
        assert lp.text_offset[0] == 0 and len(lp.text_offset) == len(want.output_ids)

        echo = await client.completions.create(model=dep, prompt="The ship", max_tokens=5,
                                               logprobs=2, echo=True)
        lp = echo.choices[0].logprobs
        assert echo.choices[0].text == "The ship" + want.text
        assert len(lp.tokens) == len(ids) + len(want.output_ids)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:len(ids)] == pytest.approx(
            [e.logprob for e in done.prompt_logprobs], abs=1e-4)
        plain_echo = await client.completions.create(model=dep, prompt="The ship",
                                                     max_tokens=5, echo=True)
        assert plain_echo.choices[0].text == "The ship" + want.text
        assert plain_echo.choices[0].logprobs is None
        for refused in ({"prompt": [5, 6]}, {"prompt": "The ship", "extra_body": {"async": True}}):
            with pytest.raises(openai.BadRequestError) as info:  # never silently dropped
                await client.completions.create(model=dep, max_tokens=5, echo=True, **refused)
            assert info.value.body["param"] == "echo"

        messages = [{"role": "user", "content": "Hi"}]
        chat = await client.chat.completions.create(model=dep, messages=messages,
                                                    max_tokens=4, logprobs=True,
                                                    top_logprobs=2)
        content = chat.choices[0].logprobs.content
        assert len(content) == chat.usage.completion_tokens
        assert "".join(t.token for t in content) == chat.choices[0].message.content
        assert all(len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode())
                   for t in content)
        assert content[0].top_logprobs[0].logprob >= content[0].logprob - 1e-6
        no = await client.chat.completions.create(model=dep, messages=messages, max_tokens=2)
        assert no.choices[0].logprobs is None

        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model=dep, prompt="x", max_tokens=2, logprobs=21)
        assert info.value.body["param"] == "logprobs"
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model=dep, messages=messages, max_tokens=2,
                                                 top_logprobs=2)
        assert info.value.body["param"] == "top_logprobs"


async def test_n_choices_and_best_of(start_worker, start_gateway, engine, unique) -> None:
    dep = unique("n")
    await start_worker(dep)
    gw = await start_gateway()
    want = engine._run([EngineRequest("w", engine.encode("The ship"), SamplingParams(
        max_new_tokens=6, temperature=1.0, seed=9, n=3))])["w"]
    assert want.choices is not None
    async with gw.openai() as client:
        c = await client.completions.create(model=dep, prompt="The ship", max_tokens=6,
                                            temperature=1.0, seed=9, n=3)
        assert [ch.index for ch in c.choices] == [0, 1, 2]
        assert [ch.text for ch in c.choices] == [ch.text for ch in want.choices]
        assert c.usage.completion_tokens == sum(len(ch.output_ids) for ch in want.choices)
        one = await client.completions.create(model=dep, prompt="The ship", max_tokens=6,
                                              temperature=1.0, seed=9)
        assert one.choices[0].text == c.choices[0].text  # sample 0 uses the seed itself

        chat = await client.chat.completions.create(
            model=dep, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, n=2,
            temperature=1.0, logprobs=True)
        assert [ch.index for ch in chat.choices] == [0, 1]
        assert all(len(ch.logprobs.content) > 0 for ch in chat.choices)

        best = await client.completions.create(model=dep, prompt="The ship", max_tokens=6,
                                               temperature=1.0, seed=9, n=2, best_of=3)
        assert [ch.index for ch in best.choices] == [0, 1]
        assert {ch.text for ch in best.choices} <= {ch.text for ch in want.choices}

        for kwargs, param in [(dict(n=2, best_of=3, stream=True), "best_of"),
                              (dict(n=3, best_of=2), "best_of"),
                              (dict(n=0), "n"), (dict(n=500), "n")]:
            with pytest.raises(openai.BadRequestError) as info:
                await client.completions.create(model=dep, prompt="x", max_tokens=2, **kwargs)
            assert info.value.body["param"] == param, kwargs
        with pytest.raises(openai.BadRequestError) as info:  # more rows than the engine has
            await client.completions.create(model=dep, prompt="x", max_tokens=2, n=100)
        assert info.value.body["param"] == "n"


@pytest.mark.parametrize("extra, field", [
    ({"n": 2, "best_of": 1}, "best_of"),
    ({"n": 2, "best_of": 2, "stream_to": "ferry.deltas"}, "best_of"),
    ({"min_tokens": 20, "max_new_tokens": 4}, "min_tokens"), ({"logprobs": 21}, "logprobs"),
    ({"logit_bias": [{"token": 1, "bias": 101}]}, "logit_bias[0].bias"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"top_k": -1}, "top_k"),
])
def test_request_fields_are_validated(extra: dict, field: str) -> None:
    from schemas import decode_request, encode
    with pytest.raises(SchemaError) as err:
        decode_request(encode({"id": "a", "model": "m", "prompt": "x", **extra}))
    assert err.value.field == field
