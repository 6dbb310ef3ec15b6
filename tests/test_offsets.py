"""Commit points: never past an offset whose answer is not acknowledged."""

from __future__ import annotations

from aiokafka import TopicPartition

from workers.offsets import OffsetTracker

TP = TopicPartition("t", 0)
TP1 = TopicPartition("t", 1)


def test_commit_point_is_lowest_unfinished_offset() -> None:
    t = OffsetTracker()
    for offset in (5, 6, 7):
        t.started(TP, offset)
    t.finished(TP, 6)
    t.finished(TP, 7)
    assert t.to_commit() == {TP: 5}  # 5 still in flight: nothing past it is safe
    t.committed({TP: 5})
    assert t.to_commit() == {}
    t.finished(TP, 5)
    assert t.to_commit() == {TP: 8}


def test_partitions_are_independent_and_forgotten_on_revoke() -> None:
    t = OffsetTracker()
    t.started(TP, 0)
    t.started(TP1, 10)
    t.finished(TP1, 10)
    assert t.to_commit() == {TP: 0, TP1: 11}
    t.forget({TP1})
    assert t.to_commit() == {TP: 0} and t.in_flight() == 1
