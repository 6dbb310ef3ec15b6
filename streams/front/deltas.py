"""One caller's view of a streamed request: the deltas of every run of it, merged.

A request can be run more than once while it streams: a worker dies and the group's next
owner serves it again, or the gateway retries it on another backend. Each run (a `source`)
streams from the start. What the caller has been shown only ever grows: a run that agrees
with it (same token ids so far: greedy or seeded on the same checkpoint) continues it from
where it is, without repeating text; one that disagrees ends the stream with `Diverged`,
because text already shown cannot be taken back. The result, the answer of record, supplies
whatever the deltas did not (deltas and results travel on different topics, so the last
deltas may arrive after it, or never).

Each choice ends once: with the piece of the delta that names its `finish_reason` (a run
that ended where the caller's view is), else with the result's. That piece carries the
reason (it may have no text); nothing is shown of that choice after it.

A request with n > 1 is n such views, one per choice (`Delta.choice`); per-token logprobs
travel with their tokens, and the prompt's logprobs (asked by echo) are shown once, first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from schemas import Delta, Result
from schemas.messages import TokenLogprob


class Diverged(Exception):
    """A run's tokens differ from what the caller was already shown."""


@dataclass
class _Run:
    ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None  # beside ids, when its deltas carry them
    next_seq: int = 0
    broken: bool = False  # a delta went missing: the rest of this run comes from the result


@dataclass
class _Shown:
    """What the caller has been shown of one choice."""

    ids: list[int] = field(default_factory=list)
    text: str = ""
    pieces: int = 0
    finished: str | None = None  # its finish reason, once shown


class MergedStream:
    """What one caller has been shown of one request, fed its deltas and then its result."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # once shown
        self._shown: dict[int, _Shown] = {}
        self._runs: dict[tuple[str, int], _Run] = {}

    def add(self, delta: Delta) -> Delta | None:
        """The new part to show, or None; raises Diverged."""
        run = self._runs.setdefault((delta.source, delta.choice), _Run())
        if run.broken or delta.seq != run.next_seq:
            run.broken = True  # duplicates or a gap: never guess, the result fills in
            return None
        run.next_seq += 1
        if delta.logprobs is not None and len(delta.logprobs) == len(delta.token_ids):
            if run.logprobs is None and not run.ids:
                run.logprobs = []
            if run.logprobs is not None:
                run.logprobs += delta.logprobs
        elif run.logprobs is not None and delta.token_ids:
            run.logprobs = None  # a delta without them: this run's tokens show without
        run.ids += delta.token_ids
        run.text += delta.text
        piece = self._extend(delta.choice, run.ids, run.text, run.logprobs, delta.model,
                             delta.source)
        piece = self._with_prompt(piece, delta.prompt_logprobs, delta.model, delta.source)
        shown = self._shown[delta.choice]
        if delta.finish_reason is not None and (run.ids, run.text) == (shown.ids, shown.text):
            piece = self._ended(delta.choice, delta.finish_reason, piece, delta.model,
                                delta.source)
        return piece  # a run that ends short of what was shown: the result decides

    def finish(self, result: Result) -> list[Delta]:
        """The rest of the result after what was shown, per choice, each choice not ended yet
        ending with its finish reason (the prompt's logprobs first if no delta brought them);
        raises Diverged."""
        choices = [(c.index, c.output_ids, c.text, c.logprobs, c.finish_reason)
                   for c in result.choices] if result.choices else [
            (0, result.output_ids, result.text, result.logprobs, result.finish_reason)]
        pieces = []
        for index, ids, text, logprobs, reason in choices:
            piece = self._extend(index, ids, text, logprobs, result.model, "result")
            if self._shown[index].finished is None:
                piece = self._ended(index, reason, piece, result.model, "result")
            if piece is not None:
                pieces.append(piece)
        if result.prompt_logprobs is not None and self.prompt_logprobs is None:
            head = pieces[0] if pieces and pieces[0].choice == 0 else None
            first = self._with_prompt(head, result.prompt_logprobs, result.model, "result")
            pieces = [first, *(pieces[1:] if head is not None else pieces)]
        return pieces

    def _with_prompt(self, piece: Delta | None, prompt: list[TokenLogprob | None] | None,
                     model: str, source: str) -> Delta | None:
        """`piece` (or an empty piece of choice 0) carrying the prompt's logprobs, if they
        are new."""
        if prompt is None or self.prompt_logprobs is not None:
            return piece
        self.prompt_logprobs = prompt
        if piece is None:
            shown = self._shown.setdefault(0, _Shown())
            piece = Delta(id=self.request_id, model=model, source=source, seq=shown.pieces,
                          index=len(shown.ids))
            shown.pieces += 1
        return dataclasses.replace(piece, prompt_logprobs=prompt)

    def _ended(self, choice: int, reason: str, piece: Delta | None, model: str,
               source: str) -> Delta | None:
        """`piece` (or an empty piece) ending `choice` with `reason`; unchanged if it was
        ended already."""
        shown = self._shown[choice]
        if shown.finished is not None:
            return piece
        shown.finished = reason
        if piece is None:
            piece = Delta(id=self.request_id, model=model, source=source, seq=shown.pieces,
                          index=len(shown.ids), choice=choice)
            shown.pieces += 1
        return dataclasses.replace(piece, finish_reason=reason)  # type: ignore[arg-type]

    def _extend(self, choice: int, ids: list[int], text: str,
                logprobs: list[TokenLogprob] | None, model: str, source: str) -> Delta | None:
        shown = self._shown.setdefault(choice, _Shown())
        n = min(len(ids), len(shown.ids))
        if ids[:n] != shown.ids[:n] or not (text.startswith(shown.text) if len(ids) >= len(
                shown.ids) else shown.text.startswith(text)):
            raise Diverged(f"request {self.request_id}: a run of it produced other tokens "
                           f"than the {len(shown.ids)} already streamed")
        if len(ids) <= len(shown.ids) and len(text) <= len(shown.text):
            return None
        if shown.finished is not None:
            raise Diverged(f"request {self.request_id}: a run of it produced more of choice "
                           f"{choice} than the {len(shown.ids)} tokens it ended with")
        new = ids[len(shown.ids):]
        piece = Delta(id=self.request_id, model=model, source=source, seq=shown.pieces,
                      index=len(shown.ids), token_ids=new, text=text[len(shown.text):],
                      choice=choice,
                      logprobs=None if logprobs is None else logprobs[len(shown.ids):len(ids)])
        shown.pieces += 1
        shown.ids, shown.text = list(ids), text
        return piece
