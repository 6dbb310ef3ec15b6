"""Which offsets are safe to commit: the worker's delivery guarantee in one place.

Messages of one partition finish out of order (different batch keys, different batches).
An offset may be committed only when it and every offset before it have been answered
and the answers acknowledged by the broker; so the commit point of a partition is its
lowest unfinished offset, or one past the highest finished one when nothing is in flight.
"""

from __future__ import annotations

from collections import defaultdict

from aiokafka import TopicPartition


class OffsetTracker:
    def __init__(self) -> None:
        self._in_flight: dict[TopicPartition, set[int]] = defaultdict(set)
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def started(self, tp: TopicPartition, offset: int) -> None:
        self._in_flight[tp].add(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def finished(self, tp: TopicPartition, offset: int) -> None:
        self._in_flight[tp].discard(offset)

    def in_flight(self) -> int:
        return sum(len(s) for s in self._in_flight.values())

    def to_commit(self) -> dict[TopicPartition, int]:
        """Commit points that moved since the last `committed` call."""
        points = {}
        for tp, nxt in self._next.items():
            point = min(self._in_flight[tp]) if self._in_flight[tp] else nxt
            if point > self._committed.get(tp, -1):
                points[tp] = point
        return points

    def committed(self, points: dict[TopicPartition, int]) -> None:
        self._committed.update(points)

    def forget(self, tps: set[TopicPartition]) -> None:
        """Drop partitions this member no longer owns; their new owner starts from the commit."""
        for tp in tps:
            self._in_flight.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)
