"""The pipeline end to end on the real broker with the real tiny model."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import urllib.request

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition

from ferry.broker import free_port
from schemas import DLQ_TOPIC, ErrorCode, Request, requests_topic
from workers.engine import Engine, GenerationInput, SamplingParams

PROMPTS = ["The ship", "Kafka topics are partitioned by key", "Once upon a time there was a",
           "A", "Tensor parallel ranks talk through torch distributed", "The checkpoint"]


def alone(engine: Engine, prompt: str, **params: object) -> list[int]:
    """The tokens the engine gives for this prompt run by itself."""
    [out] = engine.generate([GenerationInput(engine.encode(prompt), SamplingParams(**params))])
    return out.output_ids


async def test_round_trip(start_worker, client, engine, unique) -> None:
    dep = unique("rt")
    port = free_port()
    worker = await start_worker(dep, metrics_port=port)
    result = await client.request(Request(id="r1", model=dep, prompt="Hello Ferry",
                                          max_new_tokens=8))
    assert result.error is None and result.id == "r1" and result.model == dep
    assert result.output_ids == alone(engine, "Hello Ferry", max_new_tokens=8)
    assert result.usage.completion_tokens == len(result.output_ids) > 0
    assert result.usage.prompt_tokens == len(engine.encode("Hello Ferry"))
    assert result.timings.inference_ms > 0
    assert worker.registry.get_sample_value(
        "ferry_results_total", {"deployment": dep, "finished_reason": result.finish_reason}) == 1
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert f'ferry_tokens_generated_total{{deployment="{dep}"}} {len(result.output_ids)}.0' in body


async def test_batched_outputs_equal_single_runs(start_worker, client, engine, unique) -> None:
    dep = unique("batch")
    worker = await start_worker(dep)
    greedy = [Request(id=f"g{i}", model=dep, prompt=p, max_new_tokens=6 + i, batch_key="k")
              for i, p in enumerate(PROMPTS)]
    futures = [await client.submit(r) for r in greedy]
    results = await asyncio.wait_for(asyncio.gather(*futures), 60)
    for req, res in zip(greedy, results):
        assert res.output_ids == alone(engine, req.prompt, max_new_tokens=req.max_new_tokens)
    # They really ran together: far fewer engine steps than tokens generated.
    labels = {"deployment": dep}
    steps = worker.registry.get_sample_value("ferry_batch_size_count", labels)
    rows = worker.registry.get_sample_value("ferry_batch_size_sum", labels)
    assert rows == sum(len(r.output_ids) for r in results)
    assert steps < rows / 2


async def test_seeded_sampling_is_batch_independent(start_worker, client, engine, unique) -> None:
    dep = unique("sample")
    await start_worker(dep, max_num_seqs=4)
    reqs = [Request(id=f"s{i}", model=dep, prompt=p, max_new_tokens=8, temperature=0.9,
                    top_p=0.9, seed=7) for i, p in enumerate(PROMPTS[:4])]
    results = await asyncio.wait_for(asyncio.gather(*[await client.submit(r) for r in reqs]), 60)
    for req, res in zip(reqs, results):
        assert res.output_ids == alone(engine, req.prompt, max_new_tokens=8, temperature=0.9,
                                       top_p=0.9, seed=7)


async def test_bad_messages_reach_dlq_good_ones_succeed(
        start_worker, client, engine, unique, kafka_bootstrap, read_topic) -> None:
    dep = unique("dlq")
    topic = requests_topic(dep)
    good = [Request(id=f"ok{i}", model=dep, prompt=p, max_new_tokens=4, batch_key="same",
                    reply_to=client.reply_to) for i, p in enumerate(PROMPTS[:3])]
    invalid = {"id": "bad-field", "model": dep, "prompt": "x", "max_new_tokens": -1,
               "reply_to": client.reply_to}
    unknown = Request(id="unknown", model="nobody", prompt="x", reply_to=client.reply_to)
    futures = {r.id: await client.submit(r) for r in good}
    for rid in ("bad-field", "unknown"):
        futures[rid] = client._waiting.setdefault(rid, asyncio.get_running_loop().create_future())
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    bad_offsets = []
    for value in (b"\xff not json", orjson.dumps(invalid), orjson.dumps(unknown.to_dict())):
        meta = await producer.send_and_wait(topic, value, key=b"same")
        bad_offsets.append((meta.partition, meta.offset))
    await producer.stop()
    await start_worker(dep)

    results = dict(zip(futures, await asyncio.wait_for(asyncio.gather(*futures.values()), 60)))
    for r in good:
        assert results[r.id].error is None
        assert results[r.id].output_ids == alone(engine, r.prompt, max_new_tokens=4)
    assert results["bad-field"].error.code == ErrorCode.INVALID_REQUEST
    assert results["bad-field"].error.message.startswith("max_new_tokens:")
    assert results["unknown"].error.code == ErrorCode.UNKNOWN_MODEL
    letters = await read_topic(DLQ_TOPIC, 2, where=lambda m: orjson.loads(m.value)[
        "source_topic"] == topic)
    by_offset = {(m["partition"], m["offset"]): m for m in map(orjson.loads, (x.value for x in letters))}
    assert set(by_offset) == set(bad_offsets[:2])
    assert by_offset[bad_offsets[0]]["bad_field"] == "$"
    assert "not valid JSON" in by_offset[bad_offsets[0]]["reason"]
    assert by_offset[bad_offsets[1]]["bad_field"] == "max_new_tokens"


async def test_requests_posted_before_first_worker_are_served(start_worker, client, unique) -> None:
    dep = unique("early")
    futures = [await client.submit(Request(id=f"e{i}", model=dep, prompt="early bird",
                                           max_new_tokens=3)) for i in range(5)]
    await start_worker(dep)
    results = await asyncio.wait_for(asyncio.gather(*futures), 60)
    assert [r.id for r in results] == [f"e{i}" for i in range(5)]
    assert all(r.error is None and len(r.output_ids) > 0 for r in results)


async def test_errors_for_unservable_requests(start_worker, client, engine, unique) -> None:
    dep = unique("err")
    await start_worker(dep, max_message_bytes=300)
    long_prompt = [1] * engine.max_context
    cases = {
        "too-long": Request(id="too-long", model=dep, input_ids=long_prompt, max_new_tokens=4),
        "expired": Request(id="expired", model=dep, prompt="late", deadline=time.time() - 1),
        "big-result": Request(id="big-result", model=dep, prompt="Hello", max_new_tokens=60),
        "bad-token": Request(id="bad-token", model=dep, input_ids=[engine.config.vocab_size]),
    }
    results = {k: await client.request(r) for k, r in cases.items()}
    assert results["too-long"].error.code == ErrorCode.PROMPT_TOO_LONG
    assert results["expired"].error.code == ErrorCode.DEADLINE_EXCEEDED
    assert results["big-result"].error.code == ErrorCode.RESULT_TOO_LARGE
    assert "300" in results["big-result"].error.message
    assert results["bad-token"].error.code == ErrorCode.INVALID_REQUEST


async def test_request_over_the_message_limit_is_answered(client, unique) -> None:
    client.max_message_bytes = 2_000
    request = Request(id="huge", model=unique("any"), prompt="x" * 5_000)
    result = await client.request(request, timeout=30)
    assert result.error.code == ErrorCode.REQUEST_TOO_LARGE
    assert "2000" in result.error.message


async def test_sampling_params_reach_the_engine(start_worker, client, engine, unique) -> None:
    dep = unique("stop")
    await start_worker(dep)
    base = await client.request(Request(id="base", model=dep, prompt="Once", max_new_tokens=10))
    assert base.finish_reason == "length" and len(base.text) > 2
    stop = base.text[len(base.text) // 2:][:2]
    stopped = await client.request(dataclasses.replace(
        Request(id="stopped", model=dep, prompt="Once", max_new_tokens=10), stop=[stop]))
    assert stopped.finish_reason == "stop"
    assert stopped.text == base.text[: base.text.index(stop)]


async def test_client_producer_is_idempotent(start_worker, client, unique) -> None:
    """The client's sends carry a broker-assigned producer id and sequence numbers, so a send
    retried after a lost ack is written once (the broker drops the repeat), not posted twice."""
    dep = unique("idem")
    await start_worker(dep)
    result = await client.request(Request(id="i1", model=dep, prompt="Hello", max_new_tokens=2))
    assert result.error is None
    txn = client._producer._txn_manager  # aiokafka keeps the idempotence state here
    assert txn is not None and txn.producer_id >= 0, "the broker gave the client no producer id"
    # One record sent: one sequence number used, on the partition it went to.
    assert sum(txn.sequence_number(TopicPartition(requests_topic(dep), p))
               for p in range(4)) == 1
