"""A streaming request's tokens as `Delta` records: incremental text that is always safe to show.

Text is decoded incrementally the way vLLM and transformers' TextStreamer do it: a short
window of ids is decoded against the window before it, so a SentencePiece leading space or
a byte-level token that completes a character comes out right, and nothing is emitted while
the window ends inside a UTF-8 character (the decoder shows U+FFFD there). Text a stop
string could still remove (its length minus one) is held back, and token ids are released
only with the text they decode to (and their logprobs, when asked), so a source's deltas
concatenate to a prefix of the result's text, ids and logprobs; when a sample ends, its last
delta flushes the rest and names its finish reason, so they then concatenate to all of it.
A request with n > 1 streams each sample on its own (`RequestStream`: one `DeltaStream` per
choice). Pure: no Kafka, no clock.
"""

from __future__ import annotations

from collections.abc import Sequence

from schemas import Delta, Request
from workers.logprobs import records
from workers.sampler import TokenLogprobs
from workers.tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"  # what the decoder shows for the bytes of an unfinished character


class DeltaStream:
    """One sample's deltas, fed the tokens (and, with `logprobs`, their logprobs) each engine
    step sampled for it."""

    def __init__(self, request_id: str, model: str, source: str, tokenizer: Tokenizer | None,
                 stop: Sequence[str] = (), *, choice: int = 0, logprobs: bool = False,
                 texts: dict[int, str | None] | None = None) -> None:
        self.request_id, self.model, self.source = request_id, model, source
        self.choice = choice
        self._tokenizer = tokenizer
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._ids: list[int] = []
        self._logprobs: list[TokenLogprobs] | None = [] if logprobs else None  # beside _ids
        self._texts = texts if texts is not None else {}  # token texts for logprob records
        self._text = ""               # decoded text of ids[:_read]
        self._prefix = 0              # start of the decode window
        self._read = 0                # ids decoded into _text
        self._clean: list[tuple[int, int]] = []  # (ids, chars) at clean points not yet sent
        self._sent_ids = 0
        self._sent_chars = 0
        self._seq = 0
        self._stopped = False

    def push(self, tokens: Sequence[int], logprobs: Sequence[TokenLogprobs] = ()
             ) -> Delta | None:
        """Add a step's tokens (and their logprobs, if this stream carries them); the delta
        now safe to publish, or None."""
        if not self._take(tokens, logprobs):
            return None
        return self._release()

    def finish(self, ids: Sequence[int], text: str, reason: str, tokens: Sequence[int] = (),
               logprobs: Sequence[TokenLogprobs] = ()) -> Delta | None:
        """The sample ended with output `ids` and `text` (the result's; `tokens`, `logprobs`:
        this step's, not pushed): its last delta, with everything not sent yet (text held
        back for stop strings included; perhaps nothing) and `finish_reason`. None when the
        stream cannot vouch for the end (it stopped, or the output does not extend what was
        sent): the result then supplies it."""
        if not self._take(tokens, logprobs):
            return None
        self._stopped = True  # nothing after the last delta
        sent, chars = self._sent_ids, self._sent_chars
        # A stop string cuts tokens (even ones pushed earlier) and text, never what was sent.
        if not (sent <= len(ids) and list(ids) == self._ids[:len(ids)]
                and text.startswith(self._text[:chars])):
            return None
        delta = Delta(id=self.request_id, model=self.model, source=self.source, seq=self._seq,
                      index=sent, token_ids=list(ids[sent:]), text=text[chars:],
                      choice=self.choice, finish_reason=reason,  # type: ignore[arg-type]
                      logprobs=None if self._logprobs is None else records(
                          self._logprobs[sent:len(ids)], self._tokenizer, self._texts))
        self._seq += 1
        return delta

    def _take(self, tokens: Sequence[int], logprobs: Sequence[TokenLogprobs]) -> bool:
        """Decode a step's tokens; False once the stream has stopped."""
        if self._stopped:
            return False
        if self._logprobs is not None:
            if len(logprobs) != len(tokens):  # the engine computes one per token asked: if it
                self._stopped = True          # did not, stop; the result carries the rest
                return False
            self._logprobs.extend(logprobs)
        for token in tokens:
            self._ids.append(token)
            self._decode()
        return True

    def prompt(self, entries: list[TokenLogprobs]) -> Delta:
        """The prompt's logprobs (tokens 1.., as the engine computes them) as a delta of their
        own, to publish before any tokens."""
        delta = Delta(id=self.request_id, model=self.model, source=self.source, seq=self._seq,
                      index=0, choice=self.choice,
                      prompt_logprobs=[None, *records(entries, self._tokenizer, self._texts)])
        self._seq += 1
        return delta

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
        logprobs = (None if self._logprobs is None else
                    records(self._logprobs[self._sent_ids:ids], self._tokenizer, self._texts))
        delta = Delta(id=self.request_id, model=self.model, source=self.source, seq=self._seq,
                      index=self._sent_ids, token_ids=self._ids[self._sent_ids:ids],
                      text=self._text[self._sent_chars:chars], choice=self.choice,
                      logprobs=logprobs)
        self._seq += 1
        self._sent_ids, self._sent_chars = ids, chars
        return delta


class RequestStream:
    """A streaming request's deltas: one `DeltaStream` per sample (choice), made as its first
    tokens come, and the prompt's logprobs when the request asked for them."""

    def __init__(self, request: Request, model: str, source: str,
                 tokenizer: Tokenizer | None) -> None:
        self.request, self.model, self.source = request, model, source
        self._tokenizer = tokenizer
        self._texts: dict[int, str | None] = {}  # token texts, shared by the samples
        self._choices: dict[int, DeltaStream] = {}

    def push(self, choice: int, tokens: Sequence[int],
             logprob: TokenLogprobs | None = None) -> Delta | None:
        """A step's tokens of one sample (and the logprob of its one new token, which the
        engine computes when the request asked); the delta safe to publish, or None."""
        return self._stream(choice).push(tokens, self._logprobs(logprob))

    def finish(self, choice: int, ids: Sequence[int], text: str, reason: str,
               tokens: Sequence[int] = (), logprob: TokenLogprobs | None = None
               ) -> Delta | None:
        """Sample `choice` ended (its output `ids` and `text`, this step's `tokens`): its last
        delta, carrying `finish_reason`, or None (`DeltaStream.finish`)."""
        return self._stream(choice).finish(ids, text, reason, tokens, self._logprobs(logprob))

    def _logprobs(self, logprob: TokenLogprobs | None) -> list[TokenLogprobs]:
        return [logprob] if self.request.logprobs is not None and logprob is not None else []

    def prompt(self, entries: list[TokenLogprobs]) -> Delta | None:
        """The prompt's logprobs as the first delta, if the request asked for them."""
        if self.request.prompt_logprobs is None:
            return None
        return self._stream(0).prompt(entries)

    def _stream(self, choice: int) -> DeltaStream:
        stream = self._choices.get(choice)
        if stream is None:
            stream = self._choices[choice] = DeltaStream(
                self.request.id, self.model, self.source, self._tokenizer, self.request.stop,
                choice=choice, logprobs=self.request.logprobs is not None, texts=self._texts)
        return stream
