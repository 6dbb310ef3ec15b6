"""Which offsets are safe to commit: the worker's delivery guarantee in one place.

Messages of one partition finish out of order (different batch keys, different batches).
An offset may be committed only when it and every offset before it have been answered
and the answers acknowledged by the broker; so the commit point of a partition is its
lowest unfinished offset, or one past the highest finished one when nothing is in flight.

Exactly-once commits carry more: offsets above the commit point that are answered already
(in the same transaction as the commit, or before it) are written into the commit's metadata
(`commit_metadata`), which travels atomically with it, so the partition's next owner skips
them (`answered_above`) instead of answering them a second time.
"""

from __future__ import annotations

from collections import defaultdict

from aiokafka import TopicPartition

# Kafka keeps at most offset.metadata.max.bytes (4096 by default) of commit metadata.
MAX_METADATA = 4000
_METADATA_TAG = "ferry-eos/1"


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

    def read_up_to(self, tp: TopicPartition) -> int | None:
        """One past the highest offset started on `tp` (where reading goes on), or None."""
        return self._next.get(tp)

    def answered(self, tp: TopicPartition, offset: int) -> bool:
        """Started and finished here already (a record read again after a rebalance)."""
        return offset < self._next.get(tp, 0) and offset not in self._in_flight[tp]

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

    def commit_metadata(self, tp: TopicPartition) -> tuple[int, str]:
        """(commit point, metadata naming the answered offsets above it) of `tp`.

        Written as the end of what was read and the offsets still in flight, relative to the
        point: everything between that is not in flight is answered."""
        pending = sorted(self._in_flight[tp])
        nxt = self._next[tp]  # KeyError for a partition not read (or forgotten): never 0
        point = pending[0] if pending else nxt
        gaps = [b - a for a, b in zip(pending, pending[1:])]  # short numbers
        text = f"{_METADATA_TAG} next={nxt - point} gaps={','.join(map(str, gaps))}"
        if len(text) > MAX_METADATA:  # bounded by max_queued (see WorkerConfig)
            raise ValueError(f"{len(pending)} offsets in flight do not fit commit metadata")
        return point, text

    def forget(self, tps: set[TopicPartition]) -> None:
        """Drop partitions this member no longer owns; their new owner starts from the commit."""
        for tp in tps:
            self._in_flight.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)


def answered_above(point: int, metadata: str | None) -> set[int]:
    """The offsets above `point` that a previous owner answered, from its commit metadata
    (empty for metadata that is not ours: then nothing is skipped, nothing is lost)."""
    fields = dict(part.partition("=")[::2] for part in (metadata or "").split(" ")[1:])
    if not (metadata or "").startswith(_METADATA_TAG + " ") or "next" not in fields:
        return set()
    try:
        nxt = point + int(fields["next"])
        pending, at = set(), point
        for gap in filter(None, fields.get("gaps", "").split(",")):
            at += int(gap)
            pending.add(at)
    except ValueError:
        return set()
    return set(range(point + 1, nxt)) - pending
