"""The shadow comparator: pairs each primary result with each candidate's result for the same
request and publishes one comparison per (request, candidate) to `ferry.comparisons`.

Inputs (one faust agent, one consumer group = the app id):
- `ferry.primary-results`: the primary's Result of a mirrored request (header
  `ferry-produced-by` = the primary).
- `ferry.shadow-results.<candidate>`: the candidate's Result (header `ferry-primary`), and the
  answers to the comparator's own score requests (id `<request id>#score`).
- `ferry.mirror.<candidate>`: the mirrored requests, kept for their prompt: when a pair is
  complete and the primary succeeded, the comparator asks the candidate for the
  teacher-forced log-likelihood of the primary's tokens (a request with `score_ids`, posted to
  the same mirror topic) and publishes the comparison when the score arrives, or after
  `score_timeout_s` with `candidate_logprob` null.
Candidates are an explicit list (`--candidate`), not a topic pattern: a pattern subscription
only sees topics that exist at its metadata refreshes, and a candidate must be compared from its
first record.

State is a plain in-memory window (`PairWindow`, a dict by request id with explicit expiry
on a 0.5 s tick), not a faust Table: with aiokafka 0.14 a restarted app whose table had a
changelog to restore sometimes never fetched its input again (see streams/routing/router.py). The
price: pairs in flight during a restart are lost (a later record of such a pair is counted as
unpaired). Records older than the window when read (a new group's backlog, a long outage)
cannot pair and are skipped, counted in `ferry_shadow_stale_total`. Run ONE comparator per
set of candidates: a request's mirror record is keyed by batch key, not by id, so its
partitions are not co-partitioned with the results'.

Entries live `window_s` after their first record; a result still unpaired then is counted
(`ferry_shadow_unpaired_total{side, candidate}`) and logged once per tick. A primary result whose
request was never seen mirrored here (e.g. to a candidate this comparator does not watch) is
counted with candidate="unknown". Aggregates per
candidate over the last `stats_window_s` are Prometheus gauges (`streams.shadow.report.
summarize` rules).

Why one long module: the pairing window, the score requests and the metrics act on the
same pairs in one faust agent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from edge.faust_app import faust_app, run_app
from edge.metrics_server import serve_metrics
from edge.topic_admin import ensure_topics
from schemas import Request, Result, SchemaError, batch_key, decode_request, decode_result, encode
from schemas.events import Comparison
from schemas.topics import (
    COMPARISONS_TOPIC, MIRROR_PREFIX, PRIMARY_HEADER, PRIMARY_RESULTS_TOPIC, PRODUCED_BY_HEADER,
    SHADOW_RESULTS_PREFIX, mirror_topic, shadow_results_topic,
)
from streams.shadow.report import summarize

log = logging.getLogger("ferry.comparator")

SCORE_SUFFIX = "#score"
TOPIC_PARTITIONS = 4  # for topics the comparator has to create itself


# ---- pure: one comparison ----------------------------------------------------------------

def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def overlap(a: Sequence[int], b: Sequence[int]) -> float:
    """Multiset token overlap: |a ∩ b| / max(|a|, |b|), order ignored; 1.0 when both are empty.
    1.0 means the same tokens (in any order), 0.0 none in common."""
    if not a and not b:
        return 1.0
    shared = sum((Tally(a) & Tally(b)).values())
    return shared / max(len(a), len(b))


def latency_ms(result: Result) -> float:
    return result.timings.queued_ms + result.timings.inference_ms


def compare(primary: Result, candidate: Result, primary_name: str, candidate_name: str,
            logprob: float | None, at: float) -> dict[str, Any]:
    """The comparison record of one request's two results. Agreement fields compare tokens only
    when both succeeded (else exact_match False, prefix 0, overlap 0)."""
    ok = primary.error is None and candidate.error is None
    p, c = primary.output_ids, candidate.output_ids
    return asdict(Comparison(  # the record's fields, as the dict the stats read
        id=primary.id, primary=primary_name, candidate=candidate_name,
        exact_match=ok and p == c,
        common_prefix=common_prefix(p, c) if ok else 0,
        overlap=overlap(p, c) if ok else 0.0,
        length_diff=len(c) - len(p),
        primary_latency_ms=latency_ms(primary),
        candidate_latency_ms=latency_ms(candidate),
        latency_diff_ms=latency_ms(candidate) - latency_ms(primary),
        primary_error=primary.error.code if primary.error else None,
        candidate_error=candidate.error.code if candidate.error else None,
        candidate_logprob=logprob, at=at))


def score_request(request: Request, candidate: str, score_ids: list[int],
                  now: float) -> Request:
    """The teacher-forced request for `score_ids` after the original prompt (text, ids or
    chat messages, which the candidate renders with its own template)."""
    return Request(id=request.id + SCORE_SUFFIX, model=candidate, prompt=request.prompt,
                   input_ids=request.input_ids, messages=request.messages, max_new_tokens=1,
                   score_ids=list(score_ids), created_at=now)


# ---- pure: the pairing window --------------------------------------------------------------

@dataclass
class ScoreAsk:
    """Post `request` to the candidate's mirror topic (header ferry-primary = primary)."""

    candidate: str
    primary: str
    request: Request


@dataclass
class _Entry:
    first_seen: float
    request: Request | None = None  # the mirrored request, for its prompt
    primary: Result | None = None
    primary_name: str = ""
    expected: set[str] = field(default_factory=set)  # candidates it was mirrored to
    candidates: dict[str, Result] = field(default_factory=dict)
    scoring: dict[str, float] = field(default_factory=dict)  # candidate -> score deadline
    asked: set[str] = field(default_factory=set)  # score requests posted
    done: set[str] = field(default_factory=set)


Step = ScoreAsk | dict[str, Any]  # a score request to post, or a comparison to publish


class PairWindow:
    """Request id -> what has arrived for it; no I/O, the clock is passed in.

    Each `add_*` returns the steps it makes possible; `expire(now)` returns the comparisons
    whose score timed out and counts what stayed unpaired past the window."""

    def __init__(self, window_s: float, score_timeout_s: float) -> None:
        self.window_s, self.score_timeout_s = window_s, score_timeout_s
        # Both in time order (insertion = first seen; one fixed score timeout), so `expire`
        # looks only at what is due instead of the whole window on every tick.
        self.entries: dict[str, _Entry] = {}
        self._deadlines: dict[tuple[str, str], float] = {}  # (request id, candidate) -> due

    def _entry(self, rid: str, now: float) -> _Entry:
        if (entry := self.entries.get(rid)) is None:
            entry = self.entries[rid] = _Entry(first_seen=now)
        return entry

    def add_request(self, candidate: str, request: Request, now: float) -> list[Step]:
        entry = self._entry(request.id, now)
        entry.request = request
        entry.expected.add(candidate)
        # Topics are read in no fixed order: pairs may have been waiting for this prompt.
        return [s for c in list(entry.scoring) if c not in entry.asked
                for s in self._ask(entry, c, now)]

    def add_primary(self, result: Result, primary: str, now: float) -> list[Step]:
        entry = self._entry(result.id, now)
        entry.primary, entry.primary_name = result, primary
        return [s for c in list(entry.candidates) for s in self._paired(entry, c, now)]

    def add_candidate(self, candidate: str, result: Result, primary: str,
                      now: float) -> list[Step]:
        entry = self._entry(result.id, now)
        entry.candidates[candidate] = result
        entry.expected.add(candidate)
        entry.primary_name = entry.primary_name or primary
        return self._paired(entry, candidate, now)

    def add_score(self, candidate: str, result: Result, now: float) -> list[Step]:
        entry = self.entries.get(result.id.removesuffix(SCORE_SUFFIX))
        if entry is None or entry.scoring.pop(candidate, None) is None:
            return []  # late (timed out already) or not ours
        self._deadlines.pop((result.id.removesuffix(SCORE_SUFFIX), candidate), None)
        return [self._finish(entry, candidate, None if result.error else result.score, now)]

    def _paired(self, entry: _Entry, candidate: str, now: float) -> list[Step]:
        primary = entry.primary
        if primary is None or candidate in entry.done or candidate in entry.scoring:
            return []
        if primary.error is not None or not primary.output_ids:
            return [self._finish(entry, candidate, None, now)]  # nothing to score
        entry.scoring[candidate] = now + self.score_timeout_s
        self._deadlines[(primary.id, candidate)] = entry.scoring[candidate]
        return self._ask(entry, candidate, now)

    def _ask(self, entry: _Entry, candidate: str, now: float) -> list[Step]:
        """The score request, once the prompt is known (else when it arrives, or never: the
        score times out)."""
        if entry.request is None or entry.primary is None:
            return []
        entry.asked.add(candidate)
        return [ScoreAsk(candidate, entry.primary_name, score_request(
            entry.request, candidate, entry.primary.output_ids, now))]

    def _finish(self, entry: _Entry, candidate: str, logprob: float | None,
                now: float) -> dict[str, Any]:
        entry.done.add(candidate)
        assert entry.primary is not None
        return compare(entry.primary, entry.candidates[candidate], entry.primary_name,
                       candidate, logprob, now)

    def expire(self, now: float) -> tuple[list[dict[str, Any]], Tally[tuple[str, str]]]:
        """(comparisons whose score timed out, unpaired results by (side, candidate)) at
        `now`; entries past the window with no score pending are dropped."""
        timed_out: list[dict[str, Any]] = []
        unpaired: Tally[tuple[str, str]] = Tally()
        for (rid, candidate), deadline in list(self._deadlines.items()):
            if deadline > now:
                break
            del self._deadlines[(rid, candidate)]
            entry = self.entries[rid]
            del entry.scoring[candidate]
            timed_out.append(self._finish(entry, candidate, None, now))
        for rid, entry in list(self.entries.items()):
            if now - entry.first_seen < self.window_s:
                break
            if entry.scoring:
                continue  # its score is still due: it leaves after that
            del self.entries[rid]
            if entry.primary is None:
                unpaired.update(("candidate", c) for c in entry.candidates)
            elif not entry.candidates:
                unpaired.update(("primary", c) for c in (entry.expected or {"unknown"}))
            else:
                unpaired.update(("primary", c) for c in entry.expected - set(entry.candidates))
        return timed_out, unpaired


# ---- the stream --------------------------------------------------------------------------

class ComparatorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str, labels: Sequence[str] = ("candidate",)) -> Gauge:
            return Gauge(name, doc, list(labels), registry=registry)

        self.comparisons = Counter("ferry_shadow_comparisons", "Comparisons published",
                                   ["candidate"], registry=registry)
        self.unpaired = Counter("ferry_shadow_unpaired", "Results never paired within the window",
                                ["side", "candidate"], registry=registry)
        self.score_timeouts = Counter("ferry_shadow_score_timeouts",
                                      "Score requests unanswered in time", ["candidate"],
                                      registry=registry)
        self.stale = Counter("ferry_shadow_stale", "Records older than the window when read",
                             ["topic"], registry=registry)
        self.pairs = gauge("ferry_shadow_window_pairs", "Pairs in the stats window")
        self.exact = gauge("ferry_shadow_exact_match_rate", "Exact-match rate (both sides ok)")
        self.overlap = gauge("ferry_shadow_overlap_mean", "Mean token overlap (both sides ok)")
        self.prefix = gauge("ferry_shadow_common_prefix_mean", "Mean common prefix, tokens")
        self.logprob = gauge("ferry_shadow_logprob_mean",
                             "Mean per-token log-likelihood of the primary's tokens")
        self.errors = gauge("ferry_shadow_error_rate", "Error rate", ("candidate", "side"))
        self.latency = gauge("ferry_shadow_latency_ms", "Latency (queued + inference)",
                             ("candidate", "side", "quantile"))


class Comparator:
    def __init__(self, bootstrap: str, config: ComparatorConfig, *,
                 registry: CollectorRegistry | None = None) -> None:
        if not config.candidates:
            raise ValueError("candidate: at least one candidate deployment is needed")
        self.bootstrap, self.candidates = bootstrap, list(dict.fromkeys(config.candidates))
        self.window = PairWindow(config.window_s, config.score_timeout_s)
        self.stats_window_s = config.stats_window_s
        self.recent: dict[str, deque[dict[str, Any]]] = {c: deque() for c in self.candidates}
        self.metrics = ComparatorMetrics(registry if registry is not None else CollectorRegistry())
        self.app = faust_app(config.app_id, bootstrap, consumer_auto_offset_reset="earliest",
                             stream_wait_empty=False, broker_commit_every=100,
                             broker_commit_interval=1.0)
        self.topic = self.app.topic(*self.topics(), key_type=bytes, value_type=bytes,
                                    key_serializer="raw", value_serializer="raw")
        self.app.agent(self.topic, name="compare")(self._stream)
        self.app.task(self._ticker)
        self.app.on_partitions_assigned.connect(self._assigned)

    def topics(self) -> list[str]:
        return [PRIMARY_RESULTS_TOPIC, *map(shadow_results_topic, self.candidates),
                *map(mirror_topic, self.candidates)]

    async def _assigned(self, _app: Any, assigned: Any, **__: Any) -> None:
        if assigned:
            log.info("comparator ready: %d partitions of %s", len(assigned),
                     ", ".join(self.topics()))

    async def _stream(self, stream: Any) -> None:
        async for event in stream.events():
            message = event.message
            try:
                steps = self.handle(message.topic, event.value, _headers(event.headers),
                                    message.timestamp, time.time())  # faust: seconds
                await self._apply(steps)
            except Exception:  # a bug or a broker failure: log it, never kill the agent
                log.exception("comparator failed on %s[%d]@%d", message.topic,
                              message.partition, message.offset)

    def handle(self, topic: str, value: bytes | None, headers: dict[str, bytes],
               timestamp: float, now: float) -> list[Step]:
        if now - timestamp > self.window.window_s:
            self.metrics.stale.labels(topic).inc()
            return []
        try:
            if topic.startswith(MIRROR_PREFIX):
                request = decode_request(value)
                if request.score_ids is not None:
                    return []  # a score request (ours): not traffic
                return self.window.add_request(topic.removeprefix(MIRROR_PREFIX), request, now)
            result = decode_result(value)
        except SchemaError as exc:
            log.warning("%s: unreadable record skipped: %s", topic, exc)
            return []
        if topic == PRIMARY_RESULTS_TOPIC:
            primary = headers.get(PRODUCED_BY_HEADER, b"").decode() or result.model
            return self.window.add_primary(result, primary, now)
        candidate = topic.removeprefix(SHADOW_RESULTS_PREFIX)
        if result.id.endswith(SCORE_SUFFIX):
            return self.window.add_score(candidate, result, now)
        return self.window.add_candidate(candidate, result,
                                         headers.get(PRIMARY_HEADER, b"").decode(), now)

    async def _apply(self, steps: list[Step]) -> None:
        for step in steps:
            if isinstance(step, ScoreAsk):
                await self.app.producer.send(
                    mirror_topic(step.candidate),
                    batch_key(step.request, step.candidate).encode(),
                    encode(step.request.to_dict()), None, None,
                    [(PRIMARY_HEADER, step.primary.encode())])
            else:
                await self.app.producer.send(COMPARISONS_TOPIC, step["id"].encode(),
                                             encode(step), None, None, None)
                self.metrics.comparisons.labels(step["candidate"]).inc()
                self.recent.setdefault(step["candidate"], deque()).append(step)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                await self.tick(time.time())
            except Exception:
                log.exception("comparator tick failed")

    async def tick(self, now: float) -> None:
        timed_out, unpaired = self.window.expire(now)
        for comparison in timed_out:
            self.metrics.score_timeouts.labels(comparison["candidate"]).inc()
        await self._apply(list(timed_out))
        if unpaired:
            for (side, candidate), n in unpaired.items():
                self.metrics.unpaired.labels(side, candidate).inc(n)
            log.warning("unpaired after %gs: %s", self.window.window_s,
                        ", ".join(f"{n} {side} result(s) for {candidate}"
                                  for (side, candidate), n in sorted(unpaired.items())))
        self._export_stats(now)

    def _export_stats(self, now: float) -> None:
        m = self.metrics
        for candidate, recent in self.recent.items():
            while recent and recent[0]["at"] < now - self.stats_window_s:
                recent.popleft()
            s = summarize(candidate, recent)
            m.pairs.labels(candidate).set(s.pairs)
            for gauge, value in ((m.exact, s.exact_match_rate), (m.overlap, s.mean_overlap),
                                 (m.prefix, s.mean_common_prefix), (m.logprob, s.mean_logprob)):
                gauge.labels(candidate).set(float("nan") if value is None else value)
            for side, rate, p50, p99 in (
                    ("primary", s.primary_error_rate, s.primary_p50_ms, s.primary_p99_ms),
                    ("candidate", s.candidate_error_rate, s.candidate_p50_ms,
                     s.candidate_p99_ms)):
                m.errors.labels(candidate, side).set(float("nan") if rate is None else rate)
                for q, value in (("0.5", p50), ("0.99", p99)):
                    m.latency.labels(candidate, side, q).set(
                        float("nan") if value is None else value)


def _headers(raw: Any) -> dict[str, bytes]:
    items = raw.items() if isinstance(raw, dict) else (raw or [])
    return {str(k).lower(): (v if isinstance(v, bytes) else str(v).encode()) for k, v in items}


@dataclass(frozen=True)
class ComparatorConfig:
    """`ferry comparator`'s settings; its flags are generated from these fields (ferry/flags.py)."""

    candidates: tuple[str, ...] = field(metadata={
        "flag": "--candidate", "metavar": "DEPLOYMENT",
        "help": "a shadow deployment to compare (repeat for several)"})
    app_id: str = field(default="ferry-comparator", metadata={
        "help": "faust app id (its consumer group)"})
    window_s: float = field(default=300.0, metadata={
        "flag": "--window", "help": "seconds a request waits for all of its results"})
    score_timeout_s: float = field(default=30.0, metadata={
        "flag": "--score-timeout",
        "help": "seconds to wait for a candidate's teacher-forced score"})
    stats_window_s: float = field(default=600.0, metadata={
        "flag": "--stats-window", "help": "seconds of comparisons behind the Prometheus gauges"})
    log_level: str = field(default="WARNING", metadata={"help": "faust's log level"})


def run_comparator(bootstrap: str, config: ComparatorConfig, *,
                   metrics_port: int | None = None) -> None:
    """Run one comparator until SIGTERM/SIGINT (faust's worker owns the loop and signals)."""
    candidates = config.candidates
    comparator_topics = [PRIMARY_RESULTS_TOPIC, COMPARISONS_TOPIC,
                         *map(shadow_results_topic, candidates), *map(mirror_topic, candidates)]
    # Subscribed topics exist before faust subscribes (it does not create external topics).
    asyncio.run(ensure_topics(bootstrap, {t: TOPIC_PARTITIONS for t in comparator_topics}))
    registry = CollectorRegistry()
    comparator = Comparator(bootstrap, config, registry=registry)
    serve_metrics(metrics_port, registry)
    run_app(comparator.app, config.log_level)
