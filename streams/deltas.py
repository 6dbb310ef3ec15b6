"""One caller's view of a streamed request: the deltas of every run of it, merged.

A request can be run more than once while it streams: a worker dies and the group's next
owner serves it again, or the gateway retries it on another backend. Each run (a `source`)
streams from the start. What the caller has been shown only ever grows: a run that agrees
with it (same token ids so far: greedy or seeded on the same checkpoint) continues it from
where it is, without repeating text; one that disagrees ends the stream with `Diverged`,
because text already shown cannot be taken back. The result, the answer of record, supplies
whatever the deltas did not (deltas and results travel on different topics, so the last
deltas may arrive after it, or never).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas import Delta, Result


class Diverged(Exception):
    """A run's tokens differ from what the caller was already shown."""


@dataclass
class _Run:
    ids: list[int] = field(default_factory=list)
    text: str = ""
    next_seq: int = 0
    broken: bool = False  # a delta went missing: the rest of this run comes from the result


class MergedStream:
    """What one caller has been shown of one request, fed its deltas and then its result."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.ids: list[int] = []   # shown so far
        self.text = ""
        self._runs: dict[str, _Run] = {}
        self._pieces = 0

    def add(self, delta: Delta) -> Delta | None:
        """The new part to show, or None; raises Diverged."""
        run = self._runs.setdefault(delta.source, _Run())
        if run.broken or delta.seq != run.next_seq:
            run.broken = True  # duplicates or a gap: never guess, the result fills in
            return None
        run.next_seq += 1
        run.ids += delta.token_ids
        run.text += delta.text
        return self._extend(run.ids, run.text, delta.model, delta.source)

    def finish(self, result: Result) -> Delta | None:
        """The rest of the result's text after what was shown; raises Diverged."""
        return self._extend(result.output_ids, result.text, result.model, "result")

    def _extend(self, ids: list[int], text: str, model: str, source: str) -> Delta | None:
        n = min(len(ids), len(self.ids))
        if ids[:n] != self.ids[:n] or not (text.startswith(self.text) if len(ids) >= len(
                self.ids) else self.text.startswith(text)):
            raise Diverged(f"request {self.request_id}: a run of it produced other tokens "
                           f"than the {len(self.ids)} already streamed")
        if len(ids) <= len(self.ids) and len(text) <= len(self.text):
            return None
        piece = Delta(id=self.request_id, model=model, source=source, seq=self._pieces,
                      index=len(self.ids), token_ids=ids[len(self.ids):],
                      text=text[len(self.text):])
        self._pieces += 1
        self.ids, self.text = list(ids), text
        return piece
