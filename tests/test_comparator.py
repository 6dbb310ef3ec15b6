"""Shadow comparator: the comparison of two results, the pairing window, the stream on a real
broker (with a faked candidate scorer), and `ferry shadow report`."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from edge.topic_admin import ensure_topics
from ferry.cli import main
from ferry.broker import free_port
from schemas import ErrorCode, Request, Result, Timings, decode, encode
from schemas.topics import (
    COMPARISONS_TOPIC, MIRRORED_HEADER, PRIMARY_HEADER, PRIMARY_RESULTS_TOPIC, PRODUCED_BY_HEADER,
    mirror_topic, requests_topic, shadow_results_topic,
)
from streams.shadow.comparator import PairWindow, ScoreAsk, common_prefix, compare, overlap
from streams.shadow.report import format_table, summarize, write_png
from tests.conftest import wait_for
from tests.harness import FerryProcess


def _result(rid: str, model: str, ids: list[int], ms: float = 10.0) -> Result:
    return Result(id=rid, model=model, output_ids=ids, timings=Timings(ms / 2, ms / 2))


# ---- pure ----------------------------------------------------------------------------------

def test_identical_results_agree_fully() -> None:
    row = compare(_result("r", "a", [5, 6, 7], 10), _result("r", "b", [5, 6, 7], 30),
                  "a", "b", -0.5, 123.0)
    assert row["exact_match"] is True and row["common_prefix"] == 3 and row["overlap"] == 1.0
    assert row["length_diff"] == 0 and row["latency_diff_ms"] == 20.0
    assert (row["primary_latency_ms"], row["candidate_latency_ms"]) == (10.0, 30.0)
    assert row["primary_error"] is None and row["candidate_logprob"] == -0.5


def test_different_results_agree_less() -> None:
    row = compare(_result("r", "a", [1, 2, 3, 4]), _result("r", "b", [1, 2, 9]), "a", "b",
                  None, 0.0)
    assert row["exact_match"] is False and row["common_prefix"] == 2
    assert row["overlap"] == 0.5 and row["length_diff"] == -1
    assert common_prefix([], [1]) == 0 and overlap([], []) == 1.0
    assert overlap([1, 1, 2], [1, 2, 2]) == pytest.approx(2 / 3)  # multiset, order ignored
    failed = Result.failure("r", "b", ErrorCode.INFERENCE_FAILED, "boom")
    row = compare(_result("r", "a", [1]), failed, "a", "b", None, 0.0)
    assert row["candidate_error"] == "inference_failed" and row["exact_match"] is False
    assert row["overlap"] == 0.0


def test_window_pairs_scores_and_expires() -> None:
    w = PairWindow(window_s=10, score_timeout_s=5)
    w.add_request("b", Request(id="r1", model="b", prompt="hi", deadline=1.0), now=0)
    assert w.add_primary(_result("r1", "a", [1, 2]), "a", now=1) == []
    (ask,) = w.add_candidate("b", _result("r1", "b", [1, 2]), "a", now=2)
    assert isinstance(ask, ScoreAsk) and ask.primary == "a"
    assert ask.request == Request(id="r1#score", model="b", prompt="hi", max_new_tokens=1,
                                  score_ids=[1, 2], created_at=2)
    scored = Result(id="r1#score", model="b", finish_reason="stop", score=-0.25)
    (row,) = w.add_score("b", scored, now=3)
    assert row["exact_match"] and row["candidate_logprob"] == -0.25
    assert w.add_score("b", scored, now=3) == []  # once only

    # The score never comes: the comparison goes out at the timeout, logprob null.
    w.add_request("b", Request(id="r2", model="b", input_ids=[3]), now=0)
    w.add_candidate("b", _result("r2", "b", [4]), "a", now=0)
    w.add_primary(_result("r2", "a", [4]), "a", now=0)
    assert w.expire(now=4.9) == ([], {})
    timed_out, _ = w.expire(now=5)
    assert [(r["id"], r["candidate_logprob"]) for r in timed_out] == [("r2", None)]

    # Both results before the mirrored request: the score is asked when its prompt arrives.
    w.add_primary(_result("r4", "a", [6]), "a", now=0)
    assert w.add_candidate("b", _result("r4", "b", [6]), "a", now=0) == []
    (ask,) = w.add_request("b", Request(id="r4", model="b", input_ids=[2]), now=1)
    assert ask.request.input_ids == [2] and ask.request.score_ids == [6]

    # A failed primary is compared at once, without scoring.
    w.add_candidate("b", _result("r3", "b", [1]), "a", now=0)
    (row,) = w.add_primary(Result.failure("r3", "a", ErrorCode.INTERNAL, "x"), "a", now=0)
    assert row["primary_error"] == "internal" and row["candidate_logprob"] is None

    # Unpaired past the window: counted by side and candidate, then gone.
    w.add_request("b", Request(id="u1", model="b", input_ids=[1]), now=0)
    w.add_primary(_result("u1", "a", [1]), "a", now=0)
    w.add_candidate("c", _result("u2", "c", [1]), "a", now=1)
    assert w.expire(now=9)[1] == {}
    _, unpaired = w.expire(now=11)
    assert unpaired == {("primary", "b"): 1, ("candidate", "c"): 1}
    assert w.entries == {}


def _rows() -> list[dict]:
    def row(i: int, exact: bool, p_ms: float, c_ms: float, err: str | None = None,
            lp: float | None = None) -> dict:
        return {"id": f"r{i}", "primary": "a", "candidate": "b", "exact_match": exact,
                "common_prefix": 4 if exact else 1, "overlap": 1.0 if exact else 0.5,
                "length_diff": 0, "primary_latency_ms": p_ms, "candidate_latency_ms": c_ms,
                "latency_diff_ms": c_ms - p_ms, "primary_error": None, "candidate_error": err,
                "candidate_logprob": lp, "at": 1.0}

    return [row(1, True, 10, 20, lp=-1.0), row(2, True, 20, 40, lp=-2.0), row(3, False, 30, 60),
            row(4, False, 40, 5, err="internal"),
            {**row(5, True, 1, 1), "candidate": "other"}]


def test_summary_and_table() -> None:
    s = summarize("b", _rows())
    assert (s.pairs, s.agreeing_pairs, s.scored) == (4, 3, 2)
    assert s.exact_match_rate == pytest.approx(2 / 3)
    assert s.mean_overlap == pytest.approx(2.5 / 3)
    assert s.mean_common_prefix == 3.0
    assert (s.primary_p50_ms, s.primary_p99_ms) == (20, 40)
    assert (s.candidate_p50_ms, s.candidate_p99_ms) == (40, 60)  # the failure's 5 ms left out
    assert (s.primary_error_rate, s.candidate_error_rate) == (0.0, 0.25)
    assert s.mean_logprob == -1.5
    table = format_table(s)
    assert "66.7%" in table and "25.0%" in table and "-1.5000" in table
    assert "-" in format_table(summarize("nobody", _rows()))


def test_png_written(tmp_path: Path) -> None:
    write_png("b", _rows(), tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_png("nobody", [], tmp_path / "empty.png")  # no comparisons yet: still a figure
    assert (tmp_path / "empty.png").stat().st_size > 0


# ---- on the broker ---------------------------------------------------------------------

@pytest.fixture
def tag(unique: Callable[[str], str]) -> str:
    return unique("cmp")


@pytest.fixture
def comparator(kafka_bootstrap: str, tag: str, tmp_path: Path) -> Iterator[FerryProcess]:
    """A comparator watching candidates `same-<tag>` and `diff-<tag>`, window 2 s."""
    args = ["--bootstrap", kafka_bootstrap, "--app-id", f"ferry-comparator-{tag}",
            "--candidate", f"same-{tag}", "--candidate", f"diff-{tag}", "--window", "2",
            "--score-timeout", "20"]
    proc = FerryProcess("comparator", args, "comparator ready", free_port(),
                        tmp_path / "comparator.log")
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()  # also when it never got ready: no process outlives its test


SCORES = {"same": -1.25, "diff": -3.5}


async def _fake_scorer(bootstrap: str, tag: str, producer: AIOKafkaProducer,
                       asks: list[dict]) -> None:
    """Plays the candidates' teacher-forced scoring: answers each score request on the mirror
    topics with a Result carrying `score` (a real shadow worker is tested end to end below)."""
    consumer = AIOKafkaConsumer(*(mirror_topic(f"{k}-{tag}") for k in SCORES),
                                bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        async for msg in consumer:
            request = decode(msg.value)
            if request.get("score_ids") is None:
                continue
            asks.append(request)
            kind = request["model"].removesuffix(f"-{tag}")
            await producer.send_and_wait(
                shadow_results_topic(request["model"]), encode(Result(
                    id=request["id"], model=request["model"], finish_reason="stop",
                    score=SCORES[kind])),
                key=request["id"].encode(), headers=list(msg.headers or ()))
    finally:
        await consumer.stop()


async def test_comparator_pairs_scores_and_counts_unpaired(
        kafka_bootstrap: str, tag: str, comparator: FerryProcess, read_topic) -> None:
    same, diff, primary = f"same-{tag}", f"diff-{tag}", f"prim-{tag}"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    asks: list[dict] = []
    scorer = asyncio.create_task(_fake_scorer(kafka_bootstrap, tag, producer, asks))
    hdr = [(PRIMARY_HEADER, primary.encode())]

    async def send(topic: str, rid: str, value: object, headers: list) -> None:
        await producer.send_and_wait(topic, encode(value), key=rid.encode(), headers=headers)

    try:
        requests = {f"{tag}-a": {"input_ids": [7, 8]}, f"{tag}-b": {"input_ids": [9]},
                    f"{tag}-c": {"prompt": "hello"}}
        for rid, prompt in requests.items():
            for cand in (same, diff):
                await send(mirror_topic(cand), rid, {"id": rid, "model": cand, **prompt}, hdr)
            await send(PRIMARY_RESULTS_TOPIC, rid, _result(rid, primary, [1, 2, 3, 4], 10),
                       [(PRODUCED_BY_HEADER, primary.encode())])
            await send(shadow_results_topic(same), rid, _result(rid, same, [1, 2, 3, 4], 30),
                       hdr)
            await send(shadow_results_topic(diff), rid, _result(rid, diff, [1, 2, 9], 20), hdr)
        failed, lonely = f"{tag}-e", f"{tag}-u"
        for rid in (failed, lonely):
            await send(mirror_topic(same), rid, {"id": rid, "model": same, "input_ids": [1]}, hdr)
        await send(PRIMARY_RESULTS_TOPIC, failed,
                   Result.failure(failed, primary, ErrorCode.INFERENCE_FAILED, "boom"), [])
        await send(shadow_results_topic(same), failed, _result(failed, same, [1]), hdr)
        await send(PRIMARY_RESULTS_TOPIC, lonely, _result(lonely, primary, [1]), [])

        ours = {same, diff}
        records = await read_topic(COMPARISONS_TOPIC, 7, timeout=30, where=lambda m:
                                   decode(m.value)["candidate"] in ours)
        rows = {(r["id"], r["candidate"]): r for r in map(lambda m: decode(m.value), records)}
        assert len(records) == 7 and len(rows) == 7, rows.keys()
        for rid in requests:
            s, d = rows[rid, same], rows[rid, diff]
            assert (s["exact_match"], s["common_prefix"], s["overlap"]) == (True, 4, 1.0)
            assert (d["exact_match"], d["common_prefix"], d["overlap"]) == (False, 2, 0.5)
            assert (s["candidate_logprob"], d["candidate_logprob"]) == (-1.25, -3.5)
            assert s["primary"] == primary and s["latency_diff_ms"] == 20.0
        assert rows[failed, same]["primary_error"] == "inference_failed"
        assert rows[failed, same]["candidate_logprob"] is None
        # Score requests carried the original prompt (ids or text) and the primary's tokens.
        text_ask = next(a for a in asks if a["id"] == f"{tag}-c#score")
        assert text_ask["prompt"] == "hello" and text_ask["score_ids"] == [1, 2, 3, 4]
        assert next(a for a in asks if a["id"] == f"{tag}-a#score")["input_ids"] == [7, 8]
        assert not any(a["id"] == f"{failed}#score" for a in asks)

        labels = {"side": "primary", "candidate": same}
        await wait_for(lambda: comparator.metric("ferry_shadow_unpaired_total", labels) == 1,
                       timeout=15, what="the unpaired primary to be counted")
        await wait_for(lambda: comparator.metric("ferry_shadow_exact_match_rate",
                                                 {"candidate": diff}) == 0.0
                       and comparator.metric("ferry_shadow_exact_match_rate",
                                             {"candidate": same}) == 1.0,
                       timeout=10, what="exact-match gauges")
        assert comparator.metric("ferry_shadow_logprob_mean", {"candidate": diff}) == -3.5
        assert comparator.metric("ferry_shadow_unpaired_total",
                                 {"side": "candidate", "candidate": diff}) == 0
    finally:
        scorer.cancel()
        await asyncio.gather(scorer, return_exceptions=True)
        await producer.stop()


async def test_real_shadow_worker_is_compared_and_scored(
        kafka_bootstrap: str, tag: str, comparator: FerryProcess, start_worker,
        read_topic) -> None:
    """Workers of the same model as primary and shadow candidate: the comparator pairs their
    results and the shadow worker answers its score request."""
    primary, candidate = f"prim-{tag}", f"same-{tag}"
    await start_worker(primary)
    await start_worker(candidate, shadow=True)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    rids = [f"{tag}-w{i}" for i in range(2)]
    try:
        for i, rid in enumerate(rids):  # what the router does for a mirrored request
            request = Request(id=rid, model=primary, input_ids=[3 + i, 5, 7], max_new_tokens=4,
                              reply_to=f"ferry.replies.{tag}")
            await producer.send_and_wait(requests_topic(primary), encode(request.to_dict()),
                                         headers=[(MIRRORED_HEADER, candidate.encode())])
            await producer.send_and_wait(
                mirror_topic(candidate), encode(dataclasses.replace(
                    request, model=candidate).to_dict()),
                headers=[(PRIMARY_HEADER, primary.encode())])
    finally:
        await producer.stop()
    records = await read_topic(COMPARISONS_TOPIC, 2, timeout=40,
                               where=lambda m: decode(m.value)["candidate"] == candidate)
    rows = sorted(map(lambda m: decode(m.value), records), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == rids
    for row in rows:
        assert row["exact_match"] is True and row["primary"] == primary
        assert row["primary_error"] is None and row["candidate_error"] is None
        assert isinstance(row["candidate_logprob"], float) and row["candidate_logprob"] < 0


def test_report_command_reads_comparisons(kafka_bootstrap: str, tag: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    async def publish() -> None:
        await ensure_topics(kafka_bootstrap, {COMPARISONS_TOPIC: 4})
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for row in _rows():
                row = {**row, "candidate": row["candidate"] + f"-{tag}"}
                await producer.send_and_wait(COMPARISONS_TOPIC, encode(row),
                                             key=row["id"].encode())
        finally:
            await producer.stop()

    asyncio.run(publish())
    png = tmp_path / "report.png"
    assert main(["shadow", "report", f"b-{tag}", "--since", "10m", "--png", str(png),
                 "--bootstrap", kafka_bootstrap]) == 0
    out = capsys.readouterr().out
    assert "(3 with both sides ok)" in out and "66.7%" in out and "-1.5000" in out
    assert png.stat().st_size > 0
