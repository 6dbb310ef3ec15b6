"""A rebalance moves only what it must: when a member joins, the requests of the partitions
that stay with a worker go on running (no recompute); only the moved ones leave its engine."""

from __future__ import annotations

import asyncio
import time

from aiokafka.partitioner import murmur2

from schemas import Request
from tests.conftest import wait_for


def key_for(partition: int, partitions: int = 4) -> str:
    return next(k for k in (f"rb-{partition}-{i}" for i in range(10_000))
                if (murmur2(k.encode()) & 0x7FFFFFFF) % partitions == partition)


async def test_rows_of_partitions_that_stay_are_not_restarted(start_worker, client,
                                                              unique) -> None:
    dep = unique("rebalance")
    first = await start_worker(dep)
    step = first.engine.step

    def slow_step():  # simulated compute time: the rows must still run when the member joins
        time.sleep(0.04)
        return step()

    first.engine.step = slow_step  # type: ignore[method-assign]
    futures = [await client.submit(Request(id=f"rb{i}", model=dep, prompt=f"request {i}",
                                           max_new_tokens=120, batch_key=key_for(i % 4)))
               for i in range(8)]
    await wait_for(lambda: {j.tp.partition for j in first._jobs.values()
                            if j.first_token is not None} == {0, 1, 2, 3}, 60,
                   "rows running on every partition")
    before = dict(first._jobs)
    second = await start_worker(dep)
    await wait_for(lambda: first._adopted.is_set() and bool(second._consumer.assignment())
                   and len(first._consumer.assignment()) == 2, 60, "the rebalance to end")
    kept = {tp.partition for tp in first._consumer.assignment()}
    stayed = {eid: job for eid, job in before.items() if job.tp.partition in kept}
    assert stayed and all(first._jobs.get(eid) is job for eid, job in stayed.items()
                          if not futures[int(job.request.id[2:])].done())
    assert not any(job.tp.partition not in kept for job in first._jobs.values())
    results = await asyncio.wait_for(asyncio.gather(*futures), 120)
    assert sorted(r.id for r in results) == sorted(f"rb{i}" for i in range(8))
    assert all(r.error is None and len(r.output_ids) > 0 for r in results)
