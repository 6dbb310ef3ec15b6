"""Group commit of a partition's answers (fakes for the producer and publisher; the real
broker runs the same code in tests/test_crash.py and tests/test_streaming.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiokafka import TopicPartition

from schemas import Result
from workers.config import WorkerConfig
from workers.offsets import OffsetTracker
from workers.publisher import Answer, Destination
from workers.transactions import PartitionTransactions

TP = TopicPartition("ferry.requests.t", 0)


class _Producer:
    """Records each transaction's answers; the first commit waits for `release`."""

    def __init__(self) -> None:
        self.transactions: list[list[int]] = []
        self.commits: list[tuple[int, str]] = []
        self.release = asyncio.Event()
        self._current: list[int] = []

    async def begin_transaction(self) -> None:
        self._current = []

    async def send_offsets_to_transaction(self, offsets, group) -> None:
        (point,) = offsets.values()
        self.commits.append((point.offset, point.metadata))

    async def commit_transaction(self) -> None:
        if not self.transactions:
            await self.release.wait()
        self.transactions.append(self._current)

    async def abort_transaction(self) -> None:
        self._current = []


class _Publisher:
    topics_ready: set[str] = set()

    def __init__(self, producer: _Producer) -> None:
        self.producer = producer

    async def prepare(self, answers: list[Answer]) -> None:
        pass

    async def send(self, answer: Answer, txn) -> list[asyncio.Future]:
        txn._current.append(answer.offset)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return [done]


def _answer(offset: int) -> Answer:
    return Answer(TP, offset, result=Result(id=f"r{offset}", model="t"),
                  dest=Destination("ferry.results"))


async def test_answers_arriving_during_a_transaction_share_the_next_one() -> None:
    config = WorkerConfig(model_dir=Path("."), deployment="t", bootstrap="127.0.0.1:1")
    producer, offsets = _Producer(), OffsetTracker()
    txns = PartitionTransactions(config, _Publisher(producer), offsets, 0)  # type: ignore[arg-type]
    txns._producers[TP] = producer  # type: ignore[assignment]
    for offset in range(5):
        offsets.started(TP, offset)
    first = asyncio.create_task(txns.deliver([_answer(0)]))
    async with asyncio.timeout(5):  # the first transaction is committing (and held there)
        while not producer.commits:
            await asyncio.sleep(0)
    later = [asyncio.create_task(txns.deliver([_answer(o)])) for o in (2, 1, 4, 3)]
    async with asyncio.timeout(5):  # all four are waiting for the transaction in flight
        while len(getattr(txns._forming.get(TP), "answers", ())) < 4:
            await asyncio.sleep(0)
    producer.release.set()
    await asyncio.wait_for(asyncio.gather(first, *later), 5)
    assert producer.transactions == [[0], [2, 1, 4, 3]]  # two transactions, not five
    assert producer.commits[-1][0] == 5  # the commit point covers every answer
