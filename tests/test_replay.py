"""Replay of recorded shadow traffic: time arguments, pacing, export to a file, and replay from
the topic and from the file to a new candidate, on a real broker."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from edge.topic_admin import ensure_topics
from ferry.cli import main
from schemas import ErrorCode, Request, Result, decode, decode_result, encode
from schemas.topics import (
    PRIMARY_HEADER, PRIMARY_RESULTS_TOPIC, PRODUCED_BY_HEADER, mirror_topic, shadow_results_topic,
)
from streams.shadow.replay import Pacer, collect, read_entries, replay, retarget, write_entries
from streams.shadow.report import parse_time


def test_parse_time() -> None:
    assert parse_time("30m", now=10_000.0) == 8_200.0
    assert parse_time("1h", now=10_000.0) == 6_400.0
    assert parse_time("2d", now=200_000.0) == 27_200.0
    assert parse_time("1.5s", now=10.0) == 8.5
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc).timestamp()
    assert parse_time("2026-01-02T03:04:05") == moment  # naive = UTC
    assert parse_time("2026-01-02T04:04:05+01:00") == moment
    with pytest.raises(ValueError, match="neither an ISO time"):
        parse_time("yesterday")


async def test_pacer_spaces_sends() -> None:
    pacer = Pacer(20.0)
    start = time.monotonic()
    for _ in range(5):
        await pacer.wait()
    assert time.monotonic() - start >= 4 / 20 - 0.01  # 5 sends at 20/s: 4 intervals
    with pytest.raises(ValueError):
        Pacer(0)


def test_retarget_rewrites_model_and_drops_the_deadline() -> None:
    request, key = retarget({"id": "r", "model": "dep-a", "input_ids": [1, 2], "deadline": 5.0},
                            "dep-c", now=100.0)
    assert request == {"id": "r", "model": "dep-c", "input_ids": [1, 2], "created_at": 100.0}
    assert key.startswith("dep-c|")


async def test_export_and_replay(kafka_bootstrap: str, unique: Callable[[str], str],
                                 read_topic, tmp_path: Path) -> None:
    tag = unique("rp")
    source, primary = mirror_topic(f"src-{tag}"), f"prim-{tag}"
    ids = [f"{tag}-{i}" for i in range(4)]
    t0 = time.time()
    stamps = [t0 - 300, t0 - 200, t0 - 100, t0 - 1]  # recorded over the last five minutes
    await ensure_topics(kafka_bootstrap, {source: 2, PRIMARY_RESULTS_TOPIC: 4})
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for rid, stamp in zip(ids, stamps):
            await producer.send_and_wait(
                source, encode({"id": rid, "model": f"src-{tag}", "input_ids": [3, 4],
                                "max_new_tokens": 4}),
                key=b"k", timestamp_ms=int(stamp * 1000),
                headers=[(PRIMARY_HEADER, primary.encode())])
        await producer.send_and_wait(  # a comparator's score request: not traffic
            source, encode({"id": f"{ids[1]}#score", "model": f"src-{tag}", "input_ids": [3],
                            "score_ids": [1]}), timestamp_ms=int(stamps[1] * 1000) + 1)
        for rid in ids[:2]:
            await producer.send_and_wait(
                PRIMARY_RESULTS_TOPIC, encode(Result(id=rid, model=primary, output_ids=[5])),
                key=rid.encode(), headers=[(PRODUCED_BY_HEADER, primary.encode())])
        await producer.send_and_wait(PRIMARY_RESULTS_TOPIC, encode(Result.failure(
            ids[2], primary, ErrorCode.INTERNAL, "x")), key=ids[2].encode())
    finally:
        await producer.stop()

    # Export [t0-250, t0-50]: requests 1 and 2, with their primary results.
    log = tmp_path / "log.jsonl"
    args = ["replay", "export", "--from", source, "--file", str(log),
            "--since", datetime.fromtimestamp(t0 - 250, timezone.utc).isoformat(),
            "--until", datetime.fromtimestamp(t0 - 50, timezone.utc).isoformat(),
            "--bootstrap", kafka_bootstrap]
    assert await asyncio.to_thread(main, args) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["request"]["id"] for e in lines] == ids[1:3]
    assert {e["primary"] for e in lines} == {primary}
    assert lines[0]["primary_result"]["output_ids"] == [5]
    assert lines[1]["primary_result"]["error"]["code"] == "internal"
    assert lines[0]["timestamp"] == pytest.approx(stamps[1], abs=0.01)
    assert read_entries(log) == lines

    # Replay the whole topic to a new candidate: four requests, three primary results.
    new = f"new-{tag}"
    entries = await collect(kafka_bootstrap, source)
    assert await replay(kafka_bootstrap, new, entries, rate=200) == (4, 3)
    mirrored = await read_topic(mirror_topic(new), 4, timeout=15)
    assert sorted(decode(m.value)["id"] for m in mirrored) == ids
    assert {decode(m.value)["model"] for m in mirrored} == {new}
    assert all(dict(m.headers)[PRIMARY_HEADER] == primary.encode() for m in mirrored)
    assert all(m.key.decode().startswith(f"{new}|") for m in mirrored)

    # Replay the file (through the CLI) to another candidate.
    other = f"other-{tag}"
    args = ["replay", "--file", str(log), "--candidate", other, "--rate", "50",
            "--bootstrap", kafka_bootstrap]
    assert await asyncio.to_thread(main, args) == 0
    mirrored = await read_topic(mirror_topic(other), 2, timeout=15)
    assert [decode(m.value)["id"] for m in sorted(mirrored, key=lambda m: m.timestamp)] \
        == ids[1:3]

    # Primary results re-posted: the original + one per replay that carried it.
    wanted = set(ids)
    reposted = await read_topic(PRIMARY_RESULTS_TOPIC, 8, timeout=15,
                                where=lambda m: m.key is not None and m.key.decode() in wanted)
    counts = {rid: sum(m.key.decode() == rid for m in reposted) for rid in ids}
    assert counts == {ids[0]: 2, ids[1]: 3, ids[2]: 3, ids[3]: 0}
    # The original failure had no header; both re-posts name the primary.
    assert sum(dict(m.headers or ()).get(PRODUCED_BY_HEADER) == primary.encode()
               for m in reposted if m.key.decode() == ids[2]) == 2


def test_replay_needs_a_source_and_a_candidate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "--candidate", "x"]) == 1
    assert "--from TOPIC or --file FILE" in capsys.readouterr().err
    assert main(["replay", "--from", "t"]) == 1


def test_write_entries_round_trip(tmp_path: Path) -> None:
    entries = [{"request": {"id": "a", "model": "m", "prompt": "hi"}, "primary": "p",
                "primary_result": None, "timestamp": 1.0}]
    write_entries(entries, tmp_path / "x.jsonl")
    assert read_entries(tmp_path / "x.jsonl") == entries
    (tmp_path / "bad.jsonl").write_text('{"nope": 1}\n')
    with pytest.raises(ValueError, match="not a replay entry"):
        read_entries(tmp_path / "bad.jsonl")


async def test_replay_reproduces_the_recorded_tokens(kafka_bootstrap: str, start_worker,
                                                     unique: Callable[[str], str],
                                                     read_topic) -> None:
    """Same checkpoint, seed and sampling: the replayed candidate generates what the recorded
    one did, so differences in a comparison come from the candidate, not from chance."""
    recorded, replayed = unique("rec"), unique("rep")
    await start_worker(recorded, shadow=True)
    await start_worker(replayed, shadow=True)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    ids = [unique("sampled") for _ in range(4)]
    try:
        for i, rid in enumerate(ids):  # mirrored traffic, as the router writes it
            request = Request(id=rid, model=recorded, prompt=f"prompt number {i}",
                              max_new_tokens=8, temperature=0.9, top_p=0.9, seed=100 + i)
            await producer.send_and_wait(mirror_topic(recorded), encode(request.to_dict()),
                                         headers=[(PRIMARY_HEADER, b"primary")])
    finally:
        await producer.stop()
    first = await read_topic(shadow_results_topic(recorded), 4)
    assert await replay(kafka_bootstrap, replayed,
                        await collect(kafka_bootstrap, mirror_topic(recorded))) == (4, 0)
    again = await read_topic(shadow_results_topic(replayed), 4)
    tokens = {decode_result(m.value).id: decode_result(m.value).output_ids for m in first}
    assert {decode_result(m.value).id: decode_result(m.value).output_ids for m in again} \
        == tokens
    assert set(tokens) == set(ids) and len({tuple(t) for t in tokens.values()}) > 1
