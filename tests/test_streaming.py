"""Streaming: token deltas through Kafka to SSE, cancellation, and failover mid-stream."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import openai
import pytest
from prometheus_client import CollectorRegistry

from edge.topic_admin import ensure_topics
from models.factory import build_tiny_checkpoint
from schemas import (
    DLQ_TOPIC, RESULTS_TOPIC, Delta, ErrorCode, Request, Result, decode, decode_delta,
    decode_result, encode, requests_topic,
)
from schemas.messages import Choice, TokenLogprob
from schemas.topics import API_KEY_HEADER, DELTAS_TOPIC, stream_topic_problem
from streams.front.client import FerryClient
from streams.front.deltas import Diverged, MergedStream
from streams.routing.keys import add_key
from streams.front.openai_format import reason_chunk
from streams.front.sse import LiveCall
from tests.conftest import wait_for
from tests.test_crash import spawn_worker
from tests.test_poison import dead_letters_for, end_offset, post_raw
from workers.config import WorkerConfig
from workers.engine import Engine, GenerationInput, SamplingParams
from workers.logprobs import records
from workers.sampler import TokenLogprobs
from workers.streaming import DeltaStream, RequestStream
from workers.tokenizer import load_tokenizer
from workers.worker import Worker

# With the long model below, greedy decoding of this prompt runs to max_new_tokens (no eos
# within 3000 tokens): a request that only a cancel can end early.
LONG_PROMPT = "Tell me a long story"


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("long") / "m", seed=3,
                                 max_position_embeddings=4096, hidden_size=128,
                                 intermediate_size=256)


@pytest.fixture(scope="module")
def long_engine(long_model: Path) -> Engine:
    return Engine.from_dir(long_model)


@pytest.fixture
async def long_worker(kafka_bootstrap: str, long_model: Path, long_engine: Engine
                      ) -> AsyncIterator[Callable[[str], Awaitable[Worker]]]:
    tasks: list[asyncio.Task] = []

    async def start(deployment: str) -> Worker:
        config = WorkerConfig(model_dir=long_model, deployment=deployment,
                              bootstrap=kafka_bootstrap)
        engine = Engine(long_engine.model, long_engine.config, long_engine.tokenizer,
                        engine_config=config.engine_config())
        worker = Worker(config, engine, registry=CollectorRegistry())
        tasks.append(asyncio.create_task(worker.run()))
        await asyncio.wait_for(worker.ready.wait(), 60)
        return worker

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def metric(worker: Worker, name: str) -> float:
    value = worker.registry.get_sample_value(name, {"deployment": worker.config.deployment})
    return value or 0.0


# ---- units: deltas from tokens, merged deltas -------------------------------------------

def test_deltas_never_split_a_character(tiny_model: Path) -> None:
    tok = load_tokenizer(tiny_model)
    assert tok is not None
    text = "배는 바다로 간다 🚢⚓ 한국어와 emoji 👩‍💻 끝"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # the byte-level vocabulary spells these byte by byte
    stream = DeltaStream("r", "m", "s", tok)
    deltas = [d for t in ids if (d := stream.push([t])) is not None]
    assert all("\ufffd" not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == text
    assert [t for d in deltas for t in d.token_ids] == ids
    assert [d.seq for d in deltas] == list(range(len(deltas)))
    assert [d.index for d in deltas] == [sum(len(x.token_ids) for x in deltas[:i])
                                         for i in range(len(deltas))]


def test_text_a_stop_string_could_remove_is_held_back(tiny_model: Path) -> None:
    tok = load_tokenizer(tiny_model)
    assert tok is not None
    stream = DeltaStream("r", "m", "s", tok, stop=["STOP!"])
    ids = tok.encode("Hello boat ST", add_special_tokens=False)
    sent = "".join(d.text for t in ids if (d := stream.push([t])) is not None)
    assert "Hello boat ST".startswith(sent) and len(sent) <= len("Hello boat ST") - 4
    no_tokenizer = DeltaStream("r", "m", "s", None)
    assert no_tokenizer.push([5, 6]) == Delta("r", "m", "s", 0, 0, [5, 6], "")


def test_merged_stream_resumes_agreeing_runs_and_refuses_others() -> None:
    def d(source: str, seq: int, ids: list[int], text: str) -> Delta:
        return Delta("r", "m", source, seq, 0, ids, text)

    merged = MergedStream("r")
    assert merged.add(d("a", 0, [1], "x")).text == "x"
    assert merged.add(d("a", 1, [2], "y")).text == "y"
    assert merged.add(d("b", 0, [1], "x")) is None       # a re-run catching up: nothing new
    assert merged.add(d("b", 1, [2, 3], "yz")).text == "z"  # ...then only what is new
    assert merged.add(d("a", 5, [9], "q")) is None        # a gap: that run is ignored
    [final] = merged.finish(Result(id="r", model="m", output_ids=[1, 2, 3, 4], text="xyzw"))
    assert (final.token_ids, final.text) == ([4], "w")
    other = MergedStream("r")
    other.add(d("a", 0, [1, 2], "xy"))
    with pytest.raises(Diverged):
        other.add(d("b", 0, [1, 7], "xq"))


def test_deltas_carry_their_tokens_logprobs_and_plain_ones_stay_small(tiny_model: Path
                                                                      ) -> None:
    tok = load_tokenizer(tiny_model)
    assert tok is not None
    ids = tok.encode("Hello boat 🚢 ok", add_special_tokens=False)
    entries = [TokenLogprobs(t, -0.5 - k, ((t, -0.5 - k), (1, -7.0))) for k, t in enumerate(ids)]
    stream = DeltaStream("r", "m", "s", tok, logprobs=True)
    deltas = [d for t, e in zip(ids, entries) if (d := stream.push([t], [e])) is not None]
    assert len(deltas) > 1 and [t for d in deltas for t in d.token_ids] == ids
    assert all(d.logprobs is not None and len(d.logprobs) == len(d.token_ids) for d in deltas)
    assert [e for d in deltas for e in d.logprobs] == records(entries, tok)  # as the result's
    assert stream.push([5]) is None  # a token without its logprob: the rest is the result's
    plain = DeltaStream("r", "m", "s", tok).push(ids[:1])
    assert plain is not None and set(plain.to_dict()) == {
        "id", "model", "source", "seq", "index", "token_ids", "text", "schema_version"}
    assert decode_delta(encode(deltas[0].to_dict())) == deltas[0]

    # n > 1: each sample streams on its own; the prompt's logprobs come first, in a delta alone.
    request = Request(id="r", model="m", prompt="x", n=2, logprobs=1, prompt_logprobs=1,
                      stream_to=DELTAS_TOPIC)
    per_request = RequestStream(request, "m", "s", tok)
    first = per_request.prompt(entries[1:3])
    assert first is not None and (first.seq, first.choice, first.token_ids) == (0, 0, [])
    assert first.prompt_logprobs == [None, *records(entries[1:3], tok)]
    one = per_request.push(1, ids[:1], entries[0])
    assert one is not None and (one.choice, one.seq, one.index) == (1, 0, 0)
    assert one.to_dict()["choice"] == 1 and one.logprobs == records(entries[:1], tok)
    zero = per_request.push(0, ids[:1], entries[0])
    assert zero is not None and (zero.choice, zero.seq) == (0, 1)
    assert RequestStream(Request(id="r", model="m", prompt="x"), "m", "s", tok).prompt(
        entries) is None


def test_merged_choices_logprobs_and_prompt_complete_from_the_result() -> None:
    lp = [TokenLogprob(t, -float(t)) for t in range(10)]
    prompt = [None, TokenLogprob(7, -1.0)]

    def d(choice: int, seq: int, ids: list[int], text: str, **kw: object) -> Delta:
        return Delta("r", "m", "a", seq, 0, ids, text, choice=choice,
                     logprobs=[lp[t] for t in ids], **kw)  # type: ignore[arg-type]

    merged = MergedStream("r")
    one = merged.add(d(1, 0, [3], "c"))  # choice 1 first: each choice is its own view
    assert one is not None and (one.choice, one.index, one.logprobs) == (1, 0, [lp[3]])
    head = merged.add(Delta("r", "m", "a", 0, 0, prompt_logprobs=prompt))
    assert head is not None and head.prompt_logprobs == prompt and head.token_ids == []
    assert merged.add(d(0, 1, [1, 2], "ab")).logprobs == [lp[1], lp[2]]
    assert merged.add(Delta("r", "m", "b", 0, 0, prompt_logprobs=prompt)) is None  # shown once
    result = Result(id="r", model="m", output_ids=[1, 2, 4], text="abd",
                    logprobs=[lp[1], lp[2], lp[4]], prompt_logprobs=prompt, choices=[
                        Choice(0, [1, 2, 4], "abd", "length", [lp[1], lp[2], lp[4]]),
                        Choice(1, [3, 5], "ce", "stop", [lp[3], lp[5]])])
    rest = merged.finish(result)
    assert [(p.choice, p.token_ids, p.text, p.logprobs) for p in rest] == [
        (0, [4], "d", [lp[4]]), (1, [5], "e", [lp[5]])]
    # No delta came: the result alone gives the prompt first, then every choice.
    alone = MergedStream("r").finish(result)
    assert alone[0].prompt_logprobs == prompt and alone[0].choice == 0
    assert [(p.choice, p.text) for p in alone] == [(0, "abd"), (1, "ce")]
    with pytest.raises(Diverged):
        merged.add(Delta("r", "m", "c", 0, 0, [9], "z", choice=1))


def test_a_samples_last_delta_flushes_the_rest_and_names_its_end(tiny_model: Path) -> None:
    tok = load_tokenizer(tiny_model)
    assert tok is not None
    text = "Hello boat ST"
    ids = tok.encode(text, add_special_tokens=False)
    # Ended by length: the text held back for the stop string comes with the reason.
    stream = DeltaStream("r", "m", "s", tok, stop=["STOP!"])
    sent = [d for t in ids[:-1] if (d := stream.push([t])) is not None]
    last = stream.finish(ids, text, "length", ids[-1:])  # the step's token comes with it
    assert last is not None and last.finish_reason == "length" and last.text
    assert "".join(d.text for d in [*sent, last]) == text
    assert [t for d in [*sent, last] for t in d.token_ids] == ids
    assert (last.seq, last.index) == (len(sent), sum(len(d.token_ids) for d in sent))
    assert all("finish_reason" not in d.to_dict() for d in sent)
    assert decode_delta(encode(last.to_dict())) == last
    assert stream.push([5]) is None and stream.finish(ids, text, "stop") is None  # ended once
    # Ended by a stop string: the engine cut the text and tokens pushed before (the step
    # that completed it pushed nothing); what was sent never goes past the cut.
    cut = DeltaStream("r", "m", "s", tok, stop=["boat S"])
    hit = next(k for k in range(len(ids)) if "boat S" in tok.decode(ids[:k + 1]))
    sent = [d for t in ids[:hit] if (d := cut.push([t])) is not None]
    final = tok.decode(ids[:hit + 1]).split("boat S")[0]
    keep = max(k for k in range(hit + 1) if len(tok.decode(ids[:k])) <= len(final))
    last = cut.finish(ids[:keep], final, "stop")
    assert last is not None and last.finish_reason == "stop"
    assert "".join(d.text for d in [*sent, last]) == final
    assert [t for d in [*sent, last] for t in d.token_ids] == ids[:keep]
    # Nothing left to flush: an empty delta ends it; an end that contradicts what was sent
    # is not vouched for (the result says it).
    bare = DeltaStream("r", "m", "s", None)
    assert bare.push([5, 6]) is not None
    assert bare.finish([5, 6], "", "stop") == Delta("r", "m", "s", 1, 2, [], "",
                                                    finish_reason="stop")
    wrong = DeltaStream("r", "m", "s", None)
    wrong.push([5, 6])
    assert wrong.finish([7], "", "stop") is None
    # n > 1 with logprobs: a sample's end carries its last token's logprob.
    entries = [TokenLogprobs(t, -1.0, ((t, -1.0),)) for t in ids]
    request = Request(id="r", model="m", prompt="x", n=2, logprobs=1, stream_to=DELTAS_TOPIC)
    per_request = RequestStream(request, "m", "s", tok)
    first = per_request.push(1, ids[:1], entries[0])
    end = per_request.finish(1, ids[:2], tok.decode(ids[:2]), "length", ids[1:2], entries[1])
    assert end is not None and (end.choice, end.finish_reason) == (1, "length")
    pieces = [p for p in (first, end) if p is not None]
    assert [e for p in pieces for e in p.logprobs or []] == records(entries[:2], tok)
    alone = per_request.finish(0, [], "", "stop")  # a sample that ended before any token
    assert alone is not None and (alone.choice, alone.seq, alone.token_ids) == (0, 0, [])


def test_merged_choices_end_once_as_soon_as_their_last_delta_says() -> None:
    def d(source: str, choice: int, seq: int, ids: list[int], text: str,
          reason: str | None = None) -> Delta:
        return Delta("r", "m", source, seq, 0, ids, text, choice=choice,
                     finish_reason=reason)  # type: ignore[arg-type]

    merged = MergedStream("r")
    assert merged.add(d("a", 1, 0, [3], "c")).finish_reason is None  # type: ignore[union-attr]
    end = merged.add(d("a", 1, 1, [], "", "stop"))  # nothing left to flush: an empty end
    assert end is not None and (end.choice, end.text, end.finish_reason) == (1, "", "stop")
    assert merged.add(d("b", 1, 0, [3], "c", "stop")) is None  # an agreeing re-run: once
    both = merged.add(d("a", 0, 0, [1, 2], "ab", "length"))   # its text and its end at once
    assert both is not None and (both.text, both.finish_reason) == ("ab", "length")
    merged.add(d("a", 2, 0, [5, 6], "ef"))
    assert merged.add(d("b", 2, 0, [5], "e", "stop")) is None  # ends short of what was shown
    result = Result(id="r", model="m", output_ids=[1, 2], text="ab", choices=[
        Choice(0, [1, 2], "ab", "length"), Choice(1, [3], "c", "stop"),
        Choice(2, [5, 6, 7], "efg", "length")])
    rest = merged.finish(result)  # only what no delta ended
    assert [(p.choice, p.text, p.finish_reason) for p in rest] == [(2, "g", "length")]
    with pytest.raises(Diverged):  # nothing of a choice after its end
        merged.add(d("c", 1, 0, [3, 4], "cd"))
    # Deltas that never name an end (an older worker): the result ends every choice, in
    # order, the one it adds no text to with an empty piece.
    old = MergedStream("r")
    old.add(d("a", 0, 0, [1, 2], "ab"))
    old.add(d("a", 1, 0, [3], "c"))
    assert [(p.choice, p.text, p.finish_reason) for p in old.finish(result)] == [
        (0, "", "length"), (1, "", "stop"), (2, "efg", "length")]


def test_live_call_shows_a_choices_end_before_the_rest_of_the_others() -> None:
    live = LiveCall("r", n=2)
    live.deployment = "m"
    for delta in (Delta("r", "m", "a", 0, 0, [1], "a"),
                  Delta("r", "m", "a", 0, 0, [3], "c", choice=1),
                  Delta("r", "m", "a", 1, 1, [], "", choice=1, finish_reason="stop"),
                  Delta("r", "m", "a", 1, 1, [2], "b"),
                  Delta("r", "x", "z", 0, 0, [9], "z", choice=1)):  # another backend: unheard
        live.on_delta(delta)
    live.complete(Result(id="r", model="m", output_ids=[1, 2, 4], text="abd", choices=[
        Choice(0, [1, 2, 4], "abd", "length"), Choice(1, [3], "c", "stop")]))
    # The order send_events writes them in: each piece's text, then its choice's end.
    assert [(p.choice, p.text, p.finish_reason) for p in live.pieces] == [
        (0, "a", None), (1, "c", None), (1, "", "stop"), (0, "b", None), (0, "d", "length")]
    assert reason_chunk({"id": "r"}, True, "stop", 3)["choices"] == [
        {"index": 3, "delta": {}, "finish_reason": "stop", "logprobs": None}]


# ---- on the broker ------------------------------------------------------------------------

async def test_deltas_arrive_before_the_result_and_add_up_to_it(
        start_worker, client: FerryClient, read_topic, unique) -> None:
    dep = unique("stream")
    worker = await start_worker(dep, exactly_once=True)  # results in transactions, deltas not
    request = Request(id=unique("s"), model=dep, prompt="The ship", max_new_tokens=32,
                      temperature=0.8, seed=5)
    events = [e async for e in client.stream(request)]
    result = events[-1]
    assert isinstance(result, Result) and result.error is None
    assert result.usage.completion_tokens == 32
    pieces = [e for e in events[:-1] if isinstance(e, Delta)]
    assert len(pieces) > 1
    assert "".join(p.text for p in pieces) == result.text
    assert [t for p in pieces for t in p.token_ids] == result.output_ids
    plain = await client.request(Request(id=unique("p"), model=dep, prompt="The ship",
                                         max_new_tokens=32, temperature=0.8, seed=5))
    assert plain.text == result.text  # streaming changes nothing about the answer
    # On Kafka: the first delta was appended before the result was.
    deltas = await read_topic(client.stream_to, 1, where=lambda m: m.key == request.id.encode())
    results = await read_topic(client.reply_to, 1,
                               where=lambda m: m.key == request.id.encode())
    assert decode_delta(deltas[0].value).seq == 0
    assert "logprobs" not in decode(deltas[0].value)  # not asked: not written
    assert decode_result(results[0].value).id == request.id
    assert deltas[0].timestamp < results[0].timestamp
    assert metric(worker, "ferry_deltas_total") >= len(pieces) - 1
    assert metric(worker, "ferry_time_per_output_token_seconds_count") >= 1
    assert metric(worker, "ferry_inter_token_latency_seconds_count") == 2 * 31


async def test_samples_stream_with_their_choice_logprobs_and_prompt_first(
        start_worker, client: FerryClient, read_topic, unique) -> None:
    dep = unique("stream-n")
    await start_worker(dep)
    [_ async for _ in client.stream(Request(id=unique("w"), model=dep, prompt="x",
                                            max_new_tokens=2))]  # the stream topic is warm
    fields = {"model": dep, "prompt": "The ship", "max_new_tokens": 16, "temperature": 1.0,
              "seed": 21, "n": 3, "logprobs": 2, "prompt_logprobs": 2}
    request = Request(id=unique("n"), **fields)  # type: ignore[arg-type]
    events = [e async for e in client.stream(request)]
    result = events[-1]
    assert isinstance(result, Result) and result.error is None and result.choices is not None
    pieces = [e for e in events[:-1] if isinstance(e, Delta)]
    assert pieces[0].prompt_logprobs == result.prompt_logprobs and pieces[0].choice == 0
    assert all(p.prompt_logprobs is None for p in pieces[1:])
    for choice in result.choices:
        mine = [p for p in pieces if p.choice == choice.index]
        assert "".join(p.text for p in mine) == choice.text
        assert [t for p in mine for t in p.token_ids] == choice.output_ids
        assert [e for p in mine for e in p.logprobs or []] == choice.logprobs
    assert len({c.text for c in result.choices}) > 1
    plain = await client.request(Request(id=unique("p"), **fields))  # type: ignore[arg-type]
    assert [c.text for c in plain.choices or []] == [c.text for c in result.choices]
    # On Kafka: deltas of every sample, the prompt's logprobs first, in a record of their own.
    from_deltas = [p for p in pieces if p.source != "result"]
    records = await read_topic(client.stream_to, len(from_deltas),
                               where=lambda m: m.key == request.id.encode())
    deltas = [decode_delta(m.value) for m in records]
    assert deltas[0].prompt_logprobs is not None and deltas[0].token_ids == []
    assert {d.choice for d in deltas[1:]} == {p.choice for p in from_deltas[1:]}
    assert len({d.choice for d in deltas[1:]}) > 1
    assert all(d.logprobs is not None and len(d.logprobs) == len(d.token_ids)
               for d in deltas[1:])


async def test_cancel_frees_the_row_and_still_answers(
        long_worker, kafka_bootstrap: str, read_topic, unique) -> None:
    dep = unique("cancel")
    worker = await long_worker(dep)
    async with FerryClient(kafka_bootstrap, reply_to=unique("replies")) as client:
        request = Request(id=unique("c"), model=dep, prompt=LONG_PROMPT, max_new_tokens=3000)
        deltas: asyncio.Queue[Delta] = asyncio.Queue()
        answer = await client.submit(request, on_delta=deltas.put_nowait)
        await asyncio.wait_for(deltas.get(), 60)  # it is decoding
        await client.cancel(request.id, dep)  # (this also stops the client waiting for it)
        await wait_for(lambda: metric(worker, "ferry_requests_cancelled_total") == 1,
                       what="the worker to drop the cancelled row")
        await wait_for(lambda: worker.engine.stats().running == 0, what="the row to leave")
        assert worker.engine.stats().kv_cache_usage == 0.0
        generated = metric(worker, "ferry_tokens_generated_total")
        assert 1 <= generated < 3000  # decoding stopped at the cancel, not at the end
        assert answer.cancelled()
        # Its one answer is on the reply topic: cancelled, with what it had generated.
        records = await read_topic(client.reply_to, 1,
                                   where=lambda m: m.key == request.id.encode())
        result = decode_result(records[0].value)
        assert result.error is not None and result.error.code is ErrorCode.CANCELLED
        assert result.usage.completion_tokens == generated

        # A cancel read before its request: answered at once, no compute.
        early = Request(id=unique("e"), model=dep, prompt=LONG_PROMPT, max_new_tokens=3000)
        await client.cancel(early.id, dep)
        await wait_for(lambda: worker._was_cancelled(early.id) is not None,
                       what="the worker to read the cancel")
        result = await client.request(early, timeout=30)
        assert result.error is not None and result.error.code is ErrorCode.CANCELLED
        assert metric(worker, "ferry_tokens_generated_total") == generated


async def test_openai_streams_token_by_token(start_worker, start_gateway, unique) -> None:
    dep = unique("sse")
    await start_worker(dep)
    gw = await start_gateway()
    async with gw.openai() as client:
        # A worker's first delta to a new stream topic waits for the topic's metadata (and
        # can come after a short result): warm the path, then count chunks.
        [_ async for _ in await client.completions.create(model=dep, prompt="x", max_tokens=2,
                                                          stream=True)]
        for chat in (False, True):
            if chat:
                kwargs = {"messages": [{"role": "user", "content": "Hi"}]}
                create = client.chat.completions.create
            else:
                kwargs = {"prompt": "The ship"}
                create = client.completions.create
            args = {"model": dep, "max_tokens": 32, "temperature": 0.8, "seed": 3, **kwargs}
            plain = await create(**args)
            stream = await create(**args, stream=True,
                                  stream_options={"include_usage": True})
            chunks = [c async for c in stream]
            texts = [(c.choices[0].delta.content if chat else c.choices[0].text)
                     for c in chunks if c.choices]
            assert sum(1 for t in texts if t) > 1, chunks
            want = plain.choices[0].message.content if chat else plain.choices[0].text
            assert "".join(t or "" for t in texts) == want
            if chat:
                assert chunks[0].choices[0].delta.role == "assistant"
            assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
            assert chunks[-1].choices == [] and chunks[-1].usage is not None
            assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
            no_usage = [c async for c in await create(**args, stream=True)]
            assert all(getattr(c, "usage", None) is None for c in no_usage)
        # Refused by the worker before any text: an HTTP error, not an SSE event.
        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model=dep, prompt="x", max_tokens=1 << 19,
                                            stream=True)
        assert info.value.body["code"] == "prompt_too_long"
    assert gw.registry.get_sample_value("ferry_gateway_time_to_first_token_seconds_count",
                                        {"route": "/v1/completions"}) >= 1
    assert gw.registry.get_sample_value("ferry_gateway_inter_token_latency_seconds_count",
                                        {"route": "/v1/chat/completions"}) >= 1


# Seeded so that the tiny model's samples end at different steps: one at end-of-sequence
# within a few tokens, others at max_new_tokens (the stop string makes text wait too).
EARLY_END = {"prompt": "The ship", "temperature": 1.0, "seed": 7, "n": 3, "stop": ["partition"]}


async def test_each_samples_last_delta_names_its_end_as_it_ends(
        start_worker, client: FerryClient, read_topic, unique) -> None:
    dep = unique("stream-end")
    await start_worker(dep)
    [_ async for _ in client.stream(Request(id=unique("w"), model=dep, prompt="x",
                                            max_new_tokens=2))]  # the stream topic is warm
    request = Request(id=unique("e"), model=dep, max_new_tokens=24, logprobs=1,
                      **EARLY_END)  # type: ignore[arg-type]
    events = [e async for e in client.stream(request)]
    result = events[-1]
    assert isinstance(result, Result) and result.error is None and result.choices is not None
    reasons = {c.finish_reason for c in result.choices}
    assert reasons == {"stop", "length"}, result.choices  # they end at different steps
    for choice in result.choices:  # each choice's pieces end once, with its reason
        mine = [e for e in events[:-1] if isinstance(e, Delta) and e.choice == choice.index]
        assert [p.finish_reason for p in mine] == [None] * (len(mine) - 1) + [
            choice.finish_reason]
        assert "".join(p.text for p in mine) == choice.text
    # On Kafka: every choice's records end with one naming its reason; they concatenate to
    # the whole of the choice (held-back text flushed), and an early end comes before the
    # other choices' later tokens.
    key = request.id.encode()
    ends = await read_topic(client.stream_to, 3, where=lambda m: m.key == key and decode_delta(
        m.value).finish_reason is not None)
    [partition] = {m.partition for m in ends}
    last = max(m.offset for m in ends)
    upto = await read_topic(client.stream_to, last + 1,  # every record up to the last end
                            where=lambda m: m.partition == partition and m.offset <= last)
    deltas = [decode_delta(m.value) for m in upto if m.key == key]
    for choice in result.choices:
        mine = [d for d in deltas if d.choice == choice.index]
        assert [d.finish_reason for d in mine] == [None] * (len(mine) - 1) + [
            choice.finish_reason]
        assert "".join(d.text for d in mine) == choice.text
        assert [t for d in mine for t in d.token_ids] == choice.output_ids
        assert [e for d in mine for e in d.logprobs or []] == choice.logprobs
    first_end = next(k for k, d in enumerate(deltas) if d.finish_reason is not None)
    assert deltas[first_end].finish_reason == "stop"
    assert any(d.token_ids and d.choice != deltas[first_end].choice
               for d in deltas[first_end + 1:])
    plain = await client.request(Request(id=unique("p"), model=dep, max_new_tokens=24,
                                         logprobs=1, **EARLY_END))  # type: ignore[arg-type]
    assert plain.choices == result.choices  # streaming changes nothing about the answer


async def test_openai_stream_ends_each_choice_as_it_finishes(start_worker, start_gateway,
                                                             unique) -> None:
    dep = unique("sse-n")
    await start_worker(dep)
    gw = await start_gateway()
    async with gw.openai() as client:
        [_ async for _ in await client.completions.create(model=dep, prompt="x", max_tokens=2,
                                                          stream=True)]  # warm the path
        args = {"model": dep, "max_tokens": 24, **EARLY_END}
        plain = await client.completions.create(**args)
        want = {c.index: c for c in plain.choices}
        assert sorted(want) == [0, 1, 2]
        early = [i for i, c in want.items() if c.finish_reason == "stop"]
        late = [i for i, c in want.items() if c.finish_reason == "length"]
        assert early and late, plain.choices  # lengths differ: one ends steps before another
        chunks = [c async for c in await client.completions.create(
            **args, stream=True, stream_options={"include_usage": True})]
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
        events = [(k, c.choices[0]) for k, c in enumerate(chunks[:-1])]
        assert all(len(c.choices) == 1 for c in chunks[:-1])
        ends: dict[int, int] = {}
        for i, choice in want.items():
            texts = [(k, c.text) for k, c in events if c.index == i and c.text]
            finishes = [(k, c.finish_reason) for k, c in events
                        if c.index == i and c.finish_reason is not None]
            assert [r for _, r in finishes] == [choice.finish_reason]  # exactly one end
            ends[i] = finishes[0][0]
            assert "".join(t for _, t in texts) == choice.text
            assert not texts or texts[-1][0] < ends[i]  # after its last text
        # The early choice's end is sent while a later one still streams its tokens.
        after = [k for k, c in events if c.index in late and c.text and k > ends[early[0]]]
        assert len(after) >= 2, chunks


async def test_caller_disconnect_cancels_the_row(long_worker, start_gateway, unique) -> None:
    dep = unique("gone")
    worker = await long_worker(dep)
    gw = await start_gateway()
    body = {"model": dep, "prompt": LONG_PROMPT, "max_tokens": 3000, "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}/v1/completions", json=body) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line.startswith(b"data: ") and b'"text":"' in line and b'"text":""' not in line:
                    break  # text is flowing; now hang up
    await wait_for(lambda: metric(worker, "ferry_requests_cancelled_total") == 1,
                   what="the gateway's cancel to reach the worker")
    await wait_for(lambda: worker.engine.stats().running == 0, what="the row to leave")
    assert metric(worker, "ferry_tokens_generated_total") < 3000
    assert gw.registry.get_sample_value("ferry_gateway_cancels_total",
                                        {"why": "caller disconnected"}) == 1


async def test_worker_killed_mid_stream_resumes_without_repeating(
        client: FerryClient, kafka_bootstrap: str, long_model: Path, long_engine: Engine,
        unique) -> None:
    dep = unique("failover")
    want = long_engine.generate([GenerationInput(long_engine.encode(LONG_PROMPT),
                                                 SamplingParams(max_new_tokens=600))])[0]
    first = spawn_worker(long_model, dep, kafka_bootstrap)
    second = None
    try:
        request = Request(id=unique("f"), model=dep, prompt=LONG_PROMPT, max_new_tokens=600)
        events: list[Delta | Result] = []
        async for event in client.stream(request, timeout=120):
            events.append(event)
            if second is None:  # text is flowing from the first worker: kill it
                first.send_signal(signal.SIGKILL)
                first.wait(timeout=10)
                second = spawn_worker(long_model, dep, kafka_bootstrap)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
    result = events[-1]
    assert isinstance(result, Result) and result.error is None
    assert result.text == want.text
    pieces = [e for e in events[:-1] if isinstance(e, Delta)]
    assert "".join(p.text for p in pieces) == want.text  # nothing repeated, nothing lost
    assert {p.source for p in pieces[1:]} - {pieces[0].source}  # the second run took over


# ---- hostile stream topics -----------------------------------------------------------------

def test_stream_topic_policy() -> None:
    assert stream_topic_problem(DELTAS_TOPIC, RESULTS_TOPIC) is None
    assert stream_topic_problem("ferry.replies.gw-1.deltas", "ferry.replies.gw-1") is None
    assert stream_topic_problem("acme.deltas", "acme.results") is None
    assert "differ from reply_to" in stream_topic_problem("acme.r", "acme.r")
    assert "for results" in stream_topic_problem(RESULTS_TOPIC, "acme.r")
    for internal in ("ferry.keys", "ferry_routes", "__consumer_offsets"):
        assert stream_topic_problem(internal, RESULTS_TOPIC).startswith("stream_to: "), internal
    assert "outside this tenant's" in stream_topic_problem("b.x", RESULTS_TOPIC, prefix="a.")


async def test_internal_stream_topic_is_refused_never_written(
        start_worker, kafka_bootstrap, router, client: FerryClient, read_topic,
        unique) -> None:
    dep = unique("hostile")
    await start_worker(dep)
    control = f"ferry.{unique('table')}"
    await ensure_topics(kafka_bootstrap, {control: 1})
    rid = unique("h")
    await post_raw(kafka_bootstrap, requests_topic(dep),
                   {"id": rid, "model": dep, "prompt": "hi", "reply_to": client.reply_to,
                    "stream_to": control})
    [answer] = await read_topic(client.reply_to, 1, where=lambda m: m.key == rid.encode())
    result = decode_result(answer.value)
    assert result.error is not None and result.error.message.startswith("stream_to: ")
    [letter] = await read_topic(DLQ_TOPIC, 1, where=dead_letters_for(rid))
    assert decode(letter.value)["bad_field"] == "stream_to"
    # Through the router a tenant's deltas stay within its own reply prefix.
    tenant = unique("tenant")
    api_key = await add_key(kafka_bootstrap, tenant, reply_prefix=f"{tenant}.")
    rid2 = unique("h")
    await post_raw(kafka_bootstrap, router.ingress,
                   {"id": rid2, "model": dep, "prompt": "x", "reply_to": f"{tenant}.r",
                    "stream_to": unique("elsewhere")},
                   key=tenant.encode(), headers=[(API_KEY_HEADER, api_key.encode())])
    [letter] = await read_topic(DLQ_TOPIC, 1, where=dead_letters_for(rid2))
    assert "outside this tenant's" in decode(letter.value)["reason"]
    assert decode(letter.value)["bad_field"] == "stream_to"
    assert await end_offset(kafka_bootstrap, control) == 0
