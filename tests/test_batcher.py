"""The batcher with a fake clock: size and wait triggers, per-key grouping, fairness."""

from __future__ import annotations

from workers.batcher import Batcher


def test_full_batch_is_ready_at_once() -> None:
    b: Batcher[int] = Batcher(max_batch=3, max_wait=10.0)
    for i in range(4):
        b.add("k", i, now=0.0)
    assert b.next_batch(now=0.0) == ("k", [0, 1, 2])
    assert b.next_batch(now=0.0) is None  # the fourth waits for more or for its timer
    assert b.seconds_until_ready(now=1.0) == 9.0
    assert b.next_batch(now=10.0) == ("k", [3])
    assert len(b) == 0 and b.seconds_until_ready(now=10.0) is None


def test_keys_never_share_a_batch_and_oldest_goes_first() -> None:
    b: Batcher[str] = Batcher(max_batch=8, max_wait=1.0)
    b.add("late", "l1", now=0.5)
    b.add("early", "e1", now=0.0)
    b.add("early", "e2", now=0.6)
    assert b.next_batch(now=0.9) is None
    assert b.next_batch(now=2.0) == ("early", ["e1", "e2"])
    assert b.next_batch(now=2.0) == ("late", ["l1"])


def test_drop_removes_matching_items() -> None:
    b: Batcher[int] = Batcher(max_batch=8, max_wait=1.0)
    for i in range(6):
        b.add(str(i % 2), i, now=0.0)
    assert sorted(b.drop(lambda i: i < 3)) == [0, 1, 2]
    assert len(b) == 3
    assert sorted(x for _ in range(2) for x in (b.next_batch(now=5.0) or ("", []))[1]) == [3, 4, 5]
