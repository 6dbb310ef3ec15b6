"""A streaming row's tokens as `Delta` records: incremental text that is always safe to show.

Text is decoded incrementally the way vLLM and transformers' TextStreamer do it: a short
window of ids is decoded against the window before it, so a SentencePiece leading space or
a byte-level token that completes a character comes out right, and nothing is emitted while
the window ends inside a UTF-8 character (the decoder shows U+FFFD there). Text a stop
string could still remove (its length minus one) is held back, and token ids are released
only with the text they decode to, so a source's deltas concatenate to a prefix of the
result's text and ids. Pure: no Kafka, no clock.
"""

from __future__ import annotations

from collections.abc import Sequence

from schemas import Delta
from workers.tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"  # what the decoder shows for the bytes of an unfinished character


class DeltaStream:
    """One request's deltas, fed the tokens each engine step sampled for it."""

    def __init__(self, request_id: str, model: str, source: str, tokenizer: Tokenizer | None,
                 stop: Sequence[str] = ()) -> None:
        self.request_id, self.model, self.source = request_id, model, source
        self._tokenizer = tokenizer
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._ids: list[int] = []
        self._text = ""               # decoded text of ids[:_read]
        self._prefix = 0              # start of the decode window
        self._read = 0                # ids decoded into _text
        self._clean: list[tuple[int, int]] = []  # (ids, chars) at clean points not yet sent
        self._sent_ids = 0
        self._sent_chars = 0
        self._seq = 0

    def push(self, tokens: Sequence[int]) -> Delta | None:
        """Add a step's tokens; the delta now safe to publish, or None."""
        for token in tokens:
            self._ids.append(token)
            self._decode()
        return self._release()

    def _decode(self) -> None:
        if self._tokenizer is None:
            self._read = len(self._ids)
            self._clean.append((self._read, 0))
            return
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix:self._read])
        now = decode(self._ids[self._prefix:])
        if len(now) > len(before) and not now.endswith(_INCOMPLETE):
            self._text += now[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
            self._clean.append((self._read, len(self._text)))

    def _release(self) -> Delta | None:
        limit = len(self._text) - self._holdback
        ready = [point for point in self._clean if point[1] <= limit]
        if not ready:
            return None
        ids, chars = ready[-1]
        self._clean = self._clean[len(ready):]
        if ids == self._sent_ids:
            return None
        delta = Delta(id=self.request_id, model=self.model, source=self.source, seq=self._seq,
                      index=self._sent_ids, token_ids=self._ids[self._sent_ids:ids],
                      text=self._text[self._sent_chars:chars])
        self._seq += 1
        self._sent_ids, self._sent_chars = ids, chars
        return delta
