"""Dynamic batching by batch key: decides which requests run together, and when.

Pure and synchronous (the clock is passed in), so it is tested without Kafka or asyncio.
A group is ready when it holds `max_batch` items or its oldest item has waited `max_wait`
seconds; among ready groups the one whose head is oldest goes first, so no key starves.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Queued(Generic[T]):
    item: T
    since: float


class Batcher(Generic[T]):
    def __init__(self, max_batch: int, max_wait: float) -> None:
        if max_batch < 1 or max_wait < 0:
            raise ValueError("max_batch must be >= 1 and max_wait >= 0")
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._groups: OrderedDict[str, list[_Queued[T]]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, key: str, item: T, now: float) -> None:
        self._groups.setdefault(key, []).append(_Queued(item, now))
        self._size += 1

    def _ready_at(self, group: list[_Queued[T]]) -> float:
        return float("-inf") if len(group) >= self.max_batch else group[0].since + self.max_wait

    def next_batch(self, now: float) -> tuple[str, list[T]] | None:
        """Pop the next ready batch (at most max_batch items of one key), or None."""
        ready = [(self._ready_at(g), g[0].since, k) for k, g in self._groups.items()
                 if self._ready_at(g) <= now]
        if not ready:
            return None
        _, _, key = min(ready)
        group = self._groups[key]
        taken, rest = group[: self.max_batch], group[self.max_batch:]
        if rest:
            self._groups[key] = rest
        else:
            del self._groups[key]
        self._size -= len(taken)
        return key, [q.item for q in taken]

    def seconds_until_ready(self, now: float) -> float | None:
        """How long until some batch is ready (0 if one is); None when empty."""
        if not self._groups:
            return None
        return max(0.0, min(self._ready_at(g) for g in self._groups.values()) - now)

    def drop(self, predicate: Callable[[T], bool]) -> list[T]:
        """Remove and return queued items matching `predicate` (partitions lost in a rebalance)."""
        dropped: list[T] = []
        for key in list(self._groups):
            keep = [q for q in self._groups[key] if not predicate(q.item)]
            dropped += [q.item for q in self._groups[key] if predicate(q.item)]
            if keep:
                self._groups[key] = keep
            else:
                del self._groups[key]
        self._size -= len(dropped)
        return dropped
