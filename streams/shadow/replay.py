"""Replay recorded shadow traffic to another candidate, and export it to a JSONL file.

A recorded request is a record of `ferry.mirror.<X>` (from the topic, between two times, or
from an exported file). Replaying it to candidate DEP posts it to `ferry.mirror.<DEP>` with its
original id, `model` = DEP and its `ferry-primary` header, and re-posts the primary's result
for that id (looked up on `ferry.primary-results`, or taken from the file) to
`ferry.primary-results`, so a comparator watching DEP pairs the two as for live traffic.
A replayed request loses its `deadline` (long past) and gets `created_at` = now, so the new
candidate's queue time is its own, not the age of the recording. The comparator's own score
requests (with `score_ids`) are not traffic and are left out.

File format (one JSON object per line):
    {"request": {...}, "primary": "dep-a", "primary_result": {...} | null, "timestamp": 1.7e9}
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from edge.kafka_clients import client_options
from edge.topic_admin import ensure_topics
from schemas import SchemaError, batch_key, decode, decode_request, encode
from schemas.topics import (
    DEPLOYMENT_HEADER, PRIMARY_HEADER, PRIMARY_RESULTS_TOPIC, PRODUCED_BY_HEADER, mirror_topic,
)
from streams.shadow.comparator import TOPIC_PARTITIONS
from streams.shadow.report import read_range

log = logging.getLogger("ferry.replay")

Entry = dict[str, Any]  # {request, primary, primary_result, timestamp}: one line of the file


class Pacer:
    """At most `rate` sends per second: each `wait()` sleeps until the next slot is due."""

    def __init__(self, rate: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        if rate is not None and rate <= 0:
            raise ValueError(f"rate: must be above 0, got {rate}")
        self.interval = 1.0 / rate if rate else 0.0
        self.clock = clock
        self._next: float | None = None

    async def wait(self) -> None:
        if not self.interval:
            return
        now = self.clock()
        due = now if self._next is None else max(self._next, now)
        self._next = due + self.interval
        if due > now:
            await asyncio.sleep(due - now)


async def collect(bootstrap: str, source: str, since: float | None = None,
                  until: float | None = None) -> list[Entry]:
    """The recorded requests of mirror topic `source` in [since, until], each with the
    primary's result for it (null when none was recorded)."""
    entries: list[Entry] = []
    for record in await read_range(bootstrap, source, since, until):
        try:
            request = decode(record.value)
        except SchemaError:
            continue
        if not isinstance(request, dict) or not isinstance(request.get("id"), str) \
                or request.get("score_ids") is not None:
            continue
        headers = dict(record.headers or ())
        entries.append({"request": request,
                        "primary": headers.get(PRIMARY_HEADER, b"").decode() or None,
                        "primary_result": None, "timestamp": record.timestamp / 1000})
    if entries:
        ids = {e["request"]["id"]: e for e in entries}
        # A primary answers after the request was mirrored: from the first request on.
        for record in await read_range(bootstrap, PRIMARY_RESULTS_TOPIC,
                                       entries[0]["timestamp"]):
            entry = ids.get(record.key.decode(errors="replace") if record.key else "")
            if entry is None:
                continue
            try:
                entry["primary_result"] = decode(record.value)
            except SchemaError:
                continue
            headers = dict(record.headers or ())
            # Logs recorded before the produced-by header carried the pin header instead.
            by = headers.get(PRODUCED_BY_HEADER) or headers.get(DEPLOYMENT_HEADER, b"")
            entry["primary"] = entry["primary"] or by.decode()
    return entries


def write_entries(entries: list[Entry], path: Path) -> None:
    with path.open("w") as out:
        for entry in entries:
            out.write(json.dumps(entry) + "\n")


def read_entries(path: Path) -> list[Entry]:
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        entry = json.loads(line)
        if not isinstance(entry, dict) or not isinstance(entry.get("request"), dict):
            raise ValueError(f"{path}:{n}: not a replay entry (no request object)")
        entries.append(entry)
    return entries


def retarget(request: dict[str, Any], candidate: str, now: float) -> tuple[dict[str, Any], str]:
    """The request as sent to `candidate`, and its batch key (the partition key workers use)."""
    out = {k: v for k, v in request.items() if k != "deadline"}
    out.update(model=candidate, created_at=now)
    try:
        key = batch_key(decode_request(encode(out)), candidate)
    except SchemaError:
        key = f"{candidate}|{out['id']}"  # fields this schema does not know: any key will do
    return out, key


async def replay(bootstrap: str, candidate: str, entries: list[Entry],
                 rate: float | None = None) -> tuple[int, int]:
    """Send `entries` to `candidate`; (requests sent, primary results re-posted)."""
    await ensure_topics(bootstrap, {mirror_topic(candidate): TOPIC_PARTITIONS,
                                    PRIMARY_RESULTS_TOPIC: TOPIC_PARTITIONS})
    pacer = Pacer(rate)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **client_options(), acks="all")
    await producer.start()
    sent = results = 0
    try:
        for entry in entries:
            await pacer.wait()
            request, key = retarget(entry["request"], candidate, time.time())
            primary = (entry.get("primary") or "").encode()
            await producer.send(mirror_topic(candidate), encode(request), key=key.encode(),
                                headers=[(PRIMARY_HEADER, primary)])
            sent += 1
            if entry.get("primary_result") is not None:
                await producer.send(PRIMARY_RESULTS_TOPIC, encode(entry["primary_result"]),
                                    key=request["id"].encode(),
                                    headers=[(PRODUCED_BY_HEADER, primary)])
                results += 1
        await producer.flush()
    finally:
        await producer.stop()
    log.info("replayed %d requests (%d with primary results) to %s", sent, results, candidate)
    return sent, results
