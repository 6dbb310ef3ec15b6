"""fair_getmany without a broker: a fake consumer that drains partitions the way aiokafka's
fetcher does (the first buffered partition first, up to max_records)."""

from __future__ import annotations

from aiokafka import TopicPartition

from edge.reader import fair_getmany

TPS = [TopicPartition("t", p) for p in range(4)]


class Buffered:
    def __init__(self, backlog: dict[int, int]) -> None:
        # Insertion order = fetch completion order: partition 0's big fetch came first.
        self.buffers = {TPS[p]: list(range(n)) for p, n in backlog.items()}

    def assignment(self) -> set[TopicPartition]:
        return set(TPS)

    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0,
                      max_records: int | None = None) -> dict[TopicPartition, list[int]]:
        left, out = max_records or 10**9, {}
        for tp, buffer in self.buffers.items():
            if (partitions and tp not in partitions) or not buffer or left == 0:
                continue
            out[tp], self.buffers[tp] = buffer[:left], buffer[left:]
            left -= len(out[tp])
        return out


async def test_plain_getmany_starves_the_partitions_behind_a_backlog() -> None:
    consumer = Buffered({0: 1000, 1: 5, 2: 5, 3: 5})
    assert list(await consumer.getmany(max_records=100)) == [TPS[0]]  # what the worker saw


async def test_every_partition_gets_its_share_and_the_rest_fills_the_room() -> None:
    consumer = Buffered({0: 1000, 1: 5, 2: 5, 3: 5})
    got = await fair_getmany(consumer, 100, timeout_ms=0)  # type: ignore[arg-type]
    assert {tp.partition: len(r) for tp, r in got.items()} == {0: 85, 1: 5, 2: 5, 3: 5}
    assert got[TPS[0]] == list(range(85))  # in order, contiguous: one commit point each


async def test_never_more_than_max_records() -> None:
    consumer = Buffered({0: 10, 1: 10, 2: 10, 3: 10})
    got = await fair_getmany(consumer, 3, timeout_ms=0)  # type: ignore[arg-type]
    assert sum(map(len, got.values())) == 3
    assert len(got) == 3  # one each from three partitions, not three from one


async def test_nothing_buffered_is_nothing() -> None:
    assert await fair_getmany(Buffered({}), 10, timeout_ms=0) == {}  # type: ignore[arg-type]
