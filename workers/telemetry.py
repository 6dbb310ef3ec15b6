"""Per-batch telemetry: one small record per delivered batch on `ferry.telemetry`.

Canaries (`streams/rollout/canary.py`) and dashboards read it to compare deployments. Serving never
depends on it: a failed send is logged (once per kind of failure) and otherwise ignored.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import AIOKafkaProducer

from schemas import encode
from schemas.events import Telemetry
from schemas.topics import TELEMETRY_PARTITIONS, TELEMETRY_TOPIC

__all__ = ["TELEMETRY_PARTITIONS", "TelemetrySender", "telemetry_record"]

log = logging.getLogger("ferry.telemetry")


def telemetry_record(deployment: str, latencies_ms: list[float],
                     errors: list[str | None], at: float) -> Telemetry:
    """The record (`schemas.events.Telemetry`): one latency and one error code (or None) per
    result, in order."""
    return Telemetry(deployment=deployment, at=at, latencies_ms=latencies_ms, errors=errors)


class TelemetrySender:
    """Sends batch records on a shared producer without waiting for their acks."""

    def __init__(self, producer: AIOKafkaProducer, deployment: str) -> None:
        self._producer = producer
        self._deployment = deployment
        self._key = deployment.encode()
        self._failed_kinds: set[str] = set()

    async def send(self, results: list[tuple[float, str | None]]) -> None:
        """Publish one record for `results` (created unix time, error code or None)."""
        if not results:
            return
        now = time.time()
        record = telemetry_record(self._deployment,
                                  [max(0.0, now - created) * 1000 for created, _ in results],
                                  [code for _, code in results], now)
        try:
            ack = await self._producer.send(TELEMETRY_TOPIC, encode(record), key=self._key)
        except Exception as exc:  # telemetry must never break serving
            self._failed(exc)
            return
        ack.add_done_callback(self._acked)

    def _acked(self, ack: asyncio.Future) -> None:
        if not ack.cancelled() and (exc := ack.exception()) is not None:
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        kind = type(exc).__name__
        if kind not in self._failed_kinds:  # a broken broker would otherwise flood the log
            self._failed_kinds.add(kind)
            log.warning("telemetry for %s not sent (%s: %s); further %s failures are not logged",
                        self._deployment, kind, exc, kind)
