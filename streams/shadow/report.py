"""`ferry shadow report`: how a shadow candidate compares with its primary, from the comparator's
records on `ferry.comparisons`, as a table (and optionally a PNG).

Also the shared reading helpers: time arguments (`parse_time`) and reading a topic between
two times (`read_range`), used by the report and by replay.

Statistics (`summarize`), per candidate:
- error rates: over all pairs, per side (an error result of any code counts).
- agreement (exact match, common prefix, overlap): over pairs where both sides succeeded,
  since a failed side has no tokens to agree with.
- latency percentiles (nearest rank): per side, over that side's successful results, since
  failures are often fast rejections that would hide slowness.
- mean log-likelihood: over pairs that have a teacher-forced score.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aiokafka.structs import ConsumerRecord

from edge.reader import assigned_consumer
from schemas import SchemaError, decode
from schemas.topics import COMPARISONS_TOPIC

_RELATIVE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*(s|m|h|d)\s*")


def parse_time(text: str, now: float | None = None) -> float:
    """Unix time from an ISO time (naive = UTC) or a duration ago (`30m`, `1h`, `2d`, `90s`)."""
    if match := _RELATIVE.fullmatch(text):
        scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return (time.time() if now is None else now) - float(match.group(1)) * scale
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"time: {text!r} is neither an ISO time nor like 30m, 1h, 2d") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


async def read_range(bootstrap: str, topic: str, since: float | None = None,
                     until: float | None = None) -> list[ConsumerRecord]:
    """The records of `topic` with since <= timestamp <= until, as far as the topic's end when
    the call started (records appended later are not waited for). No consumer group."""
    consumer, tps = await assigned_consumer(bootstrap, topic, at=None, read_committed=False,
                                            fetch_max_wait_ms=100)
    try:
        if not tps:
            return []
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        if since is not None:
            found = await consumer.offsets_for_times({tp: int(since * 1000) for tp in tps})
            starts = {tp: found[tp].offset if found[tp] is not None else ends[tp] for tp in tps}
        pending = {tp for tp in tps if starts[tp] < ends[tp]}
        for tp in tps:
            consumer.seek(tp, starts[tp])
        records: list[ConsumerRecord] = []
        while pending:
            batches = await consumer.getmany(*pending, timeout_ms=500)
            for tp, batch in batches.items():
                for record in batch:
                    if record.offset >= ends[tp] or (until is not None
                                                     and record.timestamp > until * 1000):
                        pending.discard(tp)
                        break
                    records.append(record)
            for tp in list(pending):  # by position: offsets may have gaps (compaction)
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        return sorted(records, key=lambda r: (r.timestamp, r.partition, r.offset))
    finally:
        await consumer.stop()


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None with no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class Summary:
    candidate: str
    pairs: int
    agreeing_pairs: int  # both sides succeeded: the base of the agreement numbers
    exact_match_rate: float | None
    mean_common_prefix: float | None
    mean_overlap: float | None
    primary_p50_ms: float | None
    primary_p99_ms: float | None
    candidate_p50_ms: float | None
    candidate_p99_ms: float | None
    primary_error_rate: float | None
    candidate_error_rate: float | None
    scored: int
    mean_logprob: float | None


def summarize(candidate: str, records: Iterable[dict[str, Any]]) -> Summary:
    """The statistics of one candidate's comparison records (rules in the module docstring)."""
    rows = [r for r in records if r.get("candidate") == candidate]
    both_ok = [r for r in rows if r.get("primary_error") is None
               and r.get("candidate_error") is None]
    primary_ms = [r["primary_latency_ms"] for r in rows if r.get("primary_error") is None]
    candidate_ms = [r["candidate_latency_ms"] for r in rows if r.get("candidate_error") is None]
    scores = [r["candidate_logprob"] for r in rows if r.get("candidate_logprob") is not None]
    n = len(rows)
    return Summary(
        candidate=candidate, pairs=n, agreeing_pairs=len(both_ok),
        exact_match_rate=_mean([float(bool(r["exact_match"])) for r in both_ok]),
        mean_common_prefix=_mean([r["common_prefix"] for r in both_ok]),
        mean_overlap=_mean([r["overlap"] for r in both_ok]),
        primary_p50_ms=percentile(primary_ms, 50), primary_p99_ms=percentile(primary_ms, 99),
        candidate_p50_ms=percentile(candidate_ms, 50),
        candidate_p99_ms=percentile(candidate_ms, 99),
        primary_error_rate=(n - len(primary_ms)) / n if n else None,
        candidate_error_rate=(n - len(candidate_ms)) / n if n else None,
        scored=len(scores), mean_logprob=_mean(scores))


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(s: Summary) -> str:
    notes = [
        ("candidate", s.candidate, ""),
        ("pairs", str(s.pairs), f"({s.agreeing_pairs} with both sides ok)"),
        ("exact match", _fmt(s.exact_match_rate, ".1%"), ""),
        ("mean common prefix", _fmt(s.mean_common_prefix, ".2f"), "tokens"),
        ("mean overlap", _fmt(s.mean_overlap, ".3f"), ""),
        ("mean log-likelihood", _fmt(s.mean_logprob, ".4f"), f"per token, {s.scored} scored"),
    ]
    sides = [
        ("", "primary", "candidate"),
        ("latency p50 (ms)", _fmt(s.primary_p50_ms, ".1f"), _fmt(s.candidate_p50_ms, ".1f")),
        ("latency p99 (ms)", _fmt(s.primary_p99_ms, ".1f"), _fmt(s.candidate_p99_ms, ".1f")),
        ("error rate", _fmt(s.primary_error_rate, ".1%"), _fmt(s.candidate_error_rate, ".1%")),
    ]
    lines = [f"{a:22} {b:>12}  {c}".rstrip() for a, b, c in notes]
    lines += [f"{a:22} {b:>12} {c:>12}" for a, b, c in sides]
    return "\n".join(lines)


def write_png(candidate: str, records: Sequence[dict[str, Any]], path: Path) -> None:
    """Latency distributions of both sides and the overlap histogram, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    rows = [r for r in records if r.get("candidate") == candidate]
    fig, (lat, agree) = plt.subplots(1, 2, figsize=(11, 4))
    sides = {side: [r[f"{side}_latency_ms"] for r in rows if r.get(f"{side}_error") is None]
             for side in ("primary", "candidate")}
    every = [v for values in sides.values() for v in values]
    for side, values in sides.items():
        if values:  # the same bins for both sides, so the bars compare
            lat.hist(values, bins=30, range=(min(every), max(every)), alpha=0.6,
                     label=f"{side} (n={len(values)})")
    lat.set(title="latency", xlabel="queued + inference (ms)", ylabel="results")
    if every:
        lat.legend()
    overlap = [r["overlap"] for r in rows if r.get("primary_error") is None
               and r.get("candidate_error") is None]
    agree.hist(overlap, bins=20, range=(0.0, 1.0), color="tab:green")
    agree.set(title="agreement", xlabel="token overlap (1 = same tokens)", ylabel="pairs")
    fig.suptitle(f"shadow {candidate}: {len(rows)} pairs")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


async def read_comparisons(bootstrap: str, candidate: str,
                           since: float | None = None) -> list[dict[str, Any]]:
    records = []
    for record in await read_range(bootstrap, COMPARISONS_TOPIC, since):
        try:
            value = decode(record.value)
        except SchemaError:
            continue  # not a comparison; the comparator writes only valid JSON
        if isinstance(value, dict) and value.get("candidate") == candidate:
            records.append(value)
    return records


async def report(bootstrap: str, candidate: str, since: float | None = None,
                 png: Path | None = None) -> Summary:
    records = await read_comparisons(bootstrap, candidate, since)
    if png is not None:
        write_png(candidate, records, png)
    return summarize(candidate, records)
