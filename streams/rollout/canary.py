"""Canary rollout: move an alias's traffic to a new deployment step by step, judging each step
from worker telemetry, and put the original route back at the first sign the new one is worse.

Judging rules (`judge`), per step window:
- Only server-side failures (`SERVER_ERRORS`) count as errors; results failed for the
  client's own fault (invalid_request, prompt_too_long, quota_exceeded...) are left out of
  the stats altogether, since they say nothing about a deployment and are fast rejections
  that would mask slowness.
- Nothing is judged while the new side has fewer than `min_requests` results: too little
  evidence either way. A step without enough traffic still passes (it is logged as not
  judged), so a canary on an idle alias completes instead of hanging.
- Error rate: roll back when new > old + `max_error_rate_margin`. An old side with fewer than
  `min_requests` results gives no baseline, so it counts as 0% (the margin alone applies).
- Latency: roll back when new p99 > old p99 * `max_p99_ratio`, judged only when both sides
  have `min_requests` results.
The old side's last window with enough results stays the baseline for later steps, so the
final 100% step (where the old deployments get no traffic) is still compared with them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition

from edge.reader import assigned_consumer
from edge.topic_admin import ensure_topics, pin_to_end
from schemas import SchemaError, decode
from schemas.errors import SERVER_FAULTS
from schemas.events import Telemetry
from schemas.fields import from_dict
from schemas.topics import TELEMETRY_PARTITIONS, TELEMETRY_TOPIC
from streams.routing.catalog import check_deployments
from streams.routing.routes import NAME, read_routes, set_route

log = logging.getLogger("ferry.canary")

# Failures of the deployment itself (`schemas.errors.fault`); the rest are the caller's.
SERVER_ERRORS = frozenset(code.value for code in SERVER_FAULTS)


def parse_seconds(text: str) -> float:
    """`60s`, `2m`, `500ms`, `1h` or bare seconds (`1.5`) -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*", text)
    if match is None:
        raise ValueError(f"duration: {text!r} is not like 60s, 2m, 500ms or 1.5")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2) or "s"]
    return float(match.group(1)) * scale


def parse_steps(text: str) -> tuple[int, ...]:
    """`5,25,50,100` -> (5, 25, 50, 100)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"steps: {text!r} is not comma-separated percents like 5,25,50,100"
                         ) from None


@dataclass(frozen=True)
class CanaryPolicy:
    """`ferry canary`'s settings; its flags are generated from these fields (ferry/flags.py)."""

    steps: tuple[int, ...] = field(default=(5, 25, 50, 100), metadata={
        "parse": parse_steps, "format": lambda steps: ",".join(map(str, steps)),
        "metavar": "P,P,...",
        "help": "percents of traffic on the new deployment, ascending, ending at 100"})
    every_s: float = field(default=60.0, metadata={
        "flag": "--every", "parse": parse_seconds, "metavar": "DURATION",
        "help": "how long each step is watched: 60s, 2m, 500ms, 1.5 (seconds)"})
    max_error_rate_margin: float = field(default=0.05, metadata={
        "flag": "--max-error-margin",
        "help": "roll back if new error rate > old + this (absolute)"})
    max_p99_ratio: float = field(default=1.5, metadata={
        "help": "roll back if new p99 latency > old p99 x this"})
    min_requests: int = field(default=10, metadata={
        "help": "results a side needs in a step window before it is judged"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))  # a list given is kept as a tuple
        if not self.steps or self.steps[-1] != 100:
            raise ValueError(f"steps: must end at 100, got {list(self.steps)}")
        if (any(not 0 < s <= 100 for s in self.steps)
                or list(self.steps) != sorted(set(self.steps))):
            raise ValueError(f"steps: must be strictly ascending percents in 1..100, "
                             f"got {list(self.steps)}")
        if self.every_s <= 0:
            raise ValueError(f"every: must be above 0 seconds, got {self.every_s}")
        if self.max_error_rate_margin < 0 or self.max_p99_ratio <= 0 or self.min_requests < 1:
            raise ValueError("max error margin must be >= 0, max p99 ratio > 0, "
                             "min requests >= 1")


@dataclass
class WindowStats:
    """One side's results in one step window."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0

    def add(self, latency_ms: float, error: str | None) -> None:
        if error is not None and error not in SERVER_ERRORS:
            return  # the client's fault: not evidence about the deployment
        self.latencies_ms.append(latency_ms)
        self.errors += error is not None

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def p99(self) -> float:
        """Nearest-rank 99th percentile (ms); 0 with no results."""
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[math.ceil(0.99 * len(ordered)) - 1]

    def describe(self) -> str:
        return f"n={self.requests} errors={self.error_rate:.1%} p99={self.p99:.0f}ms"


def judge(old: WindowStats, new: WindowStats, policy: CanaryPolicy) -> str | None:
    """Why to roll back, or None to go on (the rules are in the module docstring)."""
    if new.requests < policy.min_requests:
        return None
    old_judged = old.requests >= policy.min_requests
    old_rate = old.error_rate if old_judged else 0.0
    if new.error_rate > old_rate + policy.max_error_rate_margin:
        return (f"error rate {new.error_rate:.1%} of the new deployment exceeds the old "
                f"{old_rate:.1%} + margin {policy.max_error_rate_margin:.1%} "
                f"({new.errors}/{new.requests} server errors)")
    if old_judged and new.p99 > old.p99 * policy.max_p99_ratio:
        return (f"p99 latency {new.p99:.0f}ms of the new deployment exceeds the old "
                f"{old.p99:.0f}ms x {policy.max_p99_ratio:g}")
    return None


def split_weights(original: Mapping[str, int], to: str, percent: int) -> dict[str, int]:
    """Weights giving `to` `percent`% and the other deployments the rest in their original
    proportions: integers summing to 100 (largest remainders round up, ties by name). At 100
    the others leave the route."""
    if percent >= 100:
        return {to: 100}
    old = {d: w for d, w in original.items() if d != to}
    total = sum(old.values())
    if total <= 0:
        raise ValueError(f"no deployment other than {to!r} to share the traffic with")
    rest = 100 - percent
    shares = {d: w * rest // total for d, w in old.items()}
    leftover = rest - sum(shares.values())
    by_remainder = sorted(old, key=lambda d: (-(old[d] * rest % total), d))
    for d in by_remainder[:leftover]:
        shares[d] += 1
    return {**shares, to: percent}


@dataclass
class StepReport:
    percent: int
    weights: dict[str, int]
    old: WindowStats
    new: WindowStats
    reason: str | None  # why it rolled back; None when the step passed


@dataclass
class CanaryOutcome:
    status: str               # "completed" or "rolled_back"
    weights: dict[str, int]   # the alias's route when the canary ended
    reason: str | None = None
    step: int | None = None   # the percent at which it rolled back
    steps: list[StepReport] = field(default_factory=list)


class TelemetryWatch:
    """Reads `ferry.telemetry` from a pinned position: only records sent after `mark()`."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._consumer: AIOKafkaConsumer | None = None  # made in start(), on the loop
        self._tps: list[TopicPartition] = []

    async def start(self) -> None:
        await ensure_topics(self.bootstrap, {TELEMETRY_TOPIC: TELEMETRY_PARTITIONS})
        self._consumer, self._tps = await assigned_consumer(
            self.bootstrap, TELEMETRY_TOPIC, at=None, read_committed=False,
            fetch_max_wait_ms=100)

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def mark(self) -> None:
        """Skip everything sent so far; the position is fixed before this returns."""
        assert self._consumer is not None, "start() first"
        await pin_to_end(self._consumer, self._tps)

    async def collect(self, seconds: float, old: set[str],
                      new: str) -> tuple[WindowStats, WindowStats]:
        """Stats of the old side (any of `old`) and the new side over the next `seconds`."""
        old_stats, new_stats = WindowStats(), WindowStats()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        assert self._consumer is not None, "start() first"
        while (left := deadline - loop.time()) > 0:
            batches = await self._consumer.getmany(timeout_ms=max(1, int(min(left, 0.2) * 1000)))
            for record in (r for records in batches.values() for r in records):
                if (parsed := _parse_record(record.value)) is None:
                    continue
                deployment, samples = parsed
                if deployment == new or deployment in old:
                    side = new_stats if deployment == new else old_stats
                    for latency_ms, error in samples:
                        side.add(latency_ms, error)
        return old_stats, new_stats


def _parse_record(raw: bytes | None) -> tuple[str, list[tuple[float, str | None]]] | None:
    try:
        record = from_dict(Telemetry, decode(raw))
    except SchemaError as exc:
        log.warning("telemetry record ignored: %s", exc)
        return None
    return record.deployment, list(zip(record.latencies_ms, record.errors))


async def run_canary(bootstrap: str, alias: str, to: str, policy: CanaryPolicy,
                     log_fn: Callable[[str], None] = log.info) -> CanaryOutcome:
    """Shift `alias` to `to` by `policy.steps`; restore its original route on a bad step (or
    any failure, Ctrl-C included), so a canary never leaves a half-shifted route behind."""
    if not NAME.fullmatch(to):
        raise ValueError(f"deployment: {to!r} is not a valid name")
    # A canary to a typo would pass every step unjudged (no telemetry) and end with all
    # traffic on nothing.
    await check_deployments(bootstrap, [to])
    route = (await read_routes(bootstrap)).get(alias)
    if route is None:
        raise ValueError(f"alias {alias!r} has no route (set one with `ferry route set`)")
    original = dict(route.weights)
    old = {d for d, w in original.items() if d != to and w > 0}
    if not old:
        raise ValueError(f"route {alias!r} has no deployment other than {to!r} to move from")
    watch = TelemetryWatch(bootstrap)
    await watch.start()
    reports: list[StepReport] = []
    baseline: WindowStats | None = None
    try:
        for n, percent in enumerate(policy.steps, 1):
            weights = split_weights(original, to, percent)
            await watch.mark()  # before the change: every record read is from this step on
            await set_route(bootstrap, alias, weights)
            old_stats, new_stats = await watch.collect(policy.every_s, old, to)
            if old_stats.requests >= policy.min_requests:
                baseline = old_stats
            reason = judge(baseline or old_stats, new_stats, policy)
            reports.append(StepReport(percent, weights, old_stats, new_stats, reason))
            verdict = (f"ROLL BACK: {reason}" if reason else
                       "not judged (too few new results)"
                       if new_stats.requests < policy.min_requests else "ok")
            log_fn(f"step {n}/{len(policy.steps)} {alias}: {weights}; "
                   f"old {old_stats.describe()}; new {new_stats.describe()}; {verdict}")
            if reason is not None:
                await set_route(bootstrap, alias, original)
                return CanaryOutcome("rolled_back", original, reason, percent, reports)
    except BaseException:
        await set_route(bootstrap, alias, original)
        raise
    finally:
        await watch.close()
    return CanaryOutcome("completed", {to: 100}, steps=reports)
