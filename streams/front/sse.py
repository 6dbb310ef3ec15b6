"""A gateway call in progress, and its server-sent events: text as it is generated.

`LiveCall` collects a call's deltas (merged across attempts and re-runs, `streams.front.deltas`)
while its attempts run; `send_events` writes them in OpenAI's chunk format as they come:
the role (chat), the echoed prompt (completions with echo), text pieces with their tokens'
logprobs when asked, each choice's finish reason (n > 1: every choice with its `index`, as
soon as that choice ends: the worker's last delta of it says so, else the result), the
usage chunk if asked, `[DONE]`. The first byte waits for the first piece of text or the
result, so a request the worker refuses is still answered with an HTTP error, not a stream.
A failure after text was sent (a retry or re-run that would contradict it, an error result)
ends the stream with one error event: text already shown is never repeated or replaced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import orjson
from aiohttp import web

from schemas import Delta, ErrorCode, Request, Result
from schemas.messages import TokenLogprob
from streams.front.deltas import Diverged, MergedStream
from streams.front.metrics import GatewayMetrics
from streams.front.openai_format import (
    ApiError, chunk_base, chunk_logprobs, echo_chunk, error_event, error_response, prompt_error,
    reason_chunk, result_error, role_chunk, text_chunk, usage_chunk,
)

log = logging.getLogger("ferry.gateway")

# How often a waiting call checks that its caller is still connected.
DISCONNECT_POLL_S = 0.5


class Disconnected(Exception):
    """The caller went away before its answer was sent."""


class LiveCall:
    """One call's attempts: the backend now trying it, and the text streamed so far (every
    choice's pieces, in the order they came). A call whose request asked for the prompt's
    logprobs (echo) holds its text back until they are known, so they always come first."""

    def __init__(self, request_id: str, *, n: int = 1, logprobs: bool = False,
                 prompt_logprobs: bool = False) -> None:
        self.request_id = request_id
        self.n = n                # choices of the request
        self.logprobs = logprobs  # chunks carry their tokens' logprobs
        self.deployment: str | None = None  # of the attempt in progress
        self.pieces: list[Delta] = []       # merged pieces, in order
        self.failure: str | None = None     # why the stream cannot go on
        self._merged = MergedStream(request_id)
        self._changed = asyncio.Event()
        self._await_prompt = prompt_logprobs
        self._held: list[Delta] = []        # pieces that came before the prompt's logprobs

    @classmethod
    def of(cls, request: Request) -> LiveCall:
        return cls(request.id, n=request.n, logprobs=request.logprobs is not None,
                   prompt_logprobs=request.prompt_logprobs is not None)

    @property
    def prompt_logprobs(self) -> list[TokenLogprob | None] | None:
        return self._merged.prompt_logprobs

    def on_delta(self, delta: Delta) -> None:
        """A delta from Kafka; only the current attempt's backend is listened to."""
        if self.failure is None and delta.model == self.deployment:
            self._take(lambda: [p] if (p := self._merged.add(delta)) is not None else [])

    def complete(self, result: Result) -> None:
        """The result: whatever its text adds to the pieces becomes the last pieces."""
        if self.failure is None and result.error is None:
            self._take(lambda: self._merged.finish(result), final=True)

    def seen(self) -> None:
        self._changed.clear()

    async def signal(self) -> None:
        """Until a new piece or a failure after the last `seen()`."""
        await self._changed.wait()

    def _take(self, step: Callable[[], list[Delta]], final: bool = False) -> None:
        try:
            pieces = step()
        except Diverged as exc:
            self.failure = str(exc)
            log.warning("stream of %s ended: %s", self.request_id, exc)
            pieces = []
        for piece in pieces:
            if piece.prompt_logprobs is not None:
                self._await_prompt = False
                self.pieces.append(piece)
            elif self._await_prompt:
                self._held.append(piece)
            else:
                self.pieces.append(piece)
        if final or not self._await_prompt:  # the result is the last word: release all
            self.pieces += self._held
            self._held = []
        self._changed.set()


def gone(http: web.Request) -> bool:
    return http.transport is None or http.transport.is_closing()


async def send_events(http: web.Request, live: LiveCall | list[LiveCall],
                      task: asyncio.Future[Result] | list[asyncio.Future[Result]], *,
                      chat: bool, created: int, model: str, include_usage: bool,
                      metrics: GatewayMetrics, route: str, started: float,
                      watch_caller: bool = True, request_id: str | None = None,
                      limit_field: str = "max_tokens", echo: str | None = None
                      ) -> web.StreamResponse:
    """Stream a call (or, with lists, several prompts' calls as one stream, pieces interleaved
    as they come): call i's choice j is `index` i * n + j. With `echo` (completions, one
    prompt) each choice starts with the prompt's text (and its logprobs when asked).
    Disconnected if the caller leaves (when `watch_caller`). The first byte waits until every
    call has text or its result, so any refusal is an HTTP error."""
    lives = live if isinstance(live, list) else [live]
    tasks = task if isinstance(task, list) else [task]
    many = len(lives) > 1
    caller = http if watch_caller else None

    def began(i: int) -> bool:
        return bool(lives[i].pieces) or tasks[i].done() or lives[i].failure is not None

    while not any(c.failure for c in lives) and (
            waiting := [i for i in range(len(lives)) if not began(i)]):
        await _until(lives, tasks, waiting, began, caller)
    for i, (c, t) in enumerate(zip(lives, tasks)):
        if not c.pieces and t.done() and (result := t.result()).error is not None:
            return error_response(_indexed(result_error(result, limit_field), i, many))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(http)
    base = chunk_base(request_id or lives[0].request_id, model, chat, created)
    writer = _Writer(response, metrics, route, started)
    offsets: dict[tuple[int, int], int] = {}  # (call, choice) -> text_offset of its next token
    echoed = [echo is None] * len(lives)

    async def start(i: int) -> None:
        """Before call i's first text: its echo, per choice."""
        if echoed[i] or echo is None:
            return
        echoed[i] = True
        prompt = lives[i].prompt_logprobs if lives[i].logprobs else None
        for j in range(lives[i].n):
            chunk, offsets[i, j] = echo_chunk(base, echo, i * lives[i].n + j, prompt)
            await writer.text(chunk)

    async def send(i: int, piece: Delta) -> None:
        """A piece's text chunk, then, if it ends its choice, the choice's finish chunk (the
        prompt's logprobs alone go with the echo)."""
        c = lives[i]
        index = i * c.n + piece.choice
        with_logprobs = c.logprobs and piece.logprobs is not None
        if piece.text or with_logprobs:
            await start(i)  # first: the echo's offsets come before the completion's
            lp = None
            if with_logprobs:
                lp, offsets[i, piece.choice] = chunk_logprobs(
                    chat, list(piece.logprobs or ()), offsets.get((i, piece.choice), 0))
            await writer.text(text_chunk(base, chat, piece.text, index, lp))
        if piece.finish_reason is not None:
            await start(i)  # an echo whose completion is empty
            await writer.send(reason_chunk(base, chat, piece.finish_reason, index))

    try:
        if chat:
            for i, c in enumerate(lives):
                for j in range(c.n):
                    await writer.send(role_chunk(base, i * c.n + j))
        sent = [0] * len(lives)
        finished: list[Result | None] = [None] * len(lives)
        failed = False
        while not failed and not all(finished):
            for i, (c, t) in enumerate(zip(lives, tasks)):
                if finished[i] is not None:
                    continue
                if t.done() and c.failure is None:
                    c.complete(t.result())
                for piece in c.pieces[sent[i]:]:
                    await send(i, piece)
                sent[i] = len(c.pieces)
                if c.failure is not None:
                    await writer.send(error_event(_indexed(ApiError(
                        502, f"stream: {c.failure}", ErrorCode.INFERENCE_FAILED.value, None),
                        i, many)))
                    failed = True
                    break
                if t.done():
                    result = t.result()
                    if result.error is not None:
                        await writer.send(error_event(_indexed(result_error(result, limit_field),
                                                               i, many)))
                        failed = True
                        break
                    finished[i] = result  # its pieces ended every choice not ended before
            if not failed and not all(finished):
                await _until(lives, tasks, [i for i, r in enumerate(finished) if r is None],
                             lambda i: len(lives[i].pieces) > sent[i] or tasks[i].done()
                             or lives[i].failure is not None, caller)
        if not failed and include_usage:
            await writer.send(usage_chunk(base, *(r for r in finished if r is not None)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError as exc:
        raise Disconnected() from exc
    return response


def _indexed(err: ApiError, i: int, many: bool) -> ApiError:
    return prompt_error(err, i) if many else err


async def _until(lives: list[LiveCall], tasks: list[asyncio.Future[Result]],
                 watched: list[int], news: Callable[[int], bool],
                 http: web.Request | None) -> None:
    """Until `news(i)` for one of the watched calls (it is re-checked after every piece, failure
    or result, so nothing that arrived while the caller was writing is missed); Disconnected
    if the caller left (when `http` is given)."""
    while True:
        for i in watched:
            lives[i].seen()
        if any(news(i) for i in watched):
            return
        signals = [asyncio.ensure_future(lives[i].signal()) for i in watched]
        try:
            await asyncio.wait([*signals, *(tasks[i] for i in watched)],
                               timeout=DISCONNECT_POLL_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for signal in signals:
                signal.cancel()
        if http is not None and gone(http) and not any(news(i) for i in watched):
            raise Disconnected()


class _Writer:
    """Writes events; times the first text (TTFT) and the gaps between texts (ITL)."""

    def __init__(self, response: web.StreamResponse, metrics: GatewayMetrics, route: str,
                 started: float) -> None:
        self.response, self.metrics, self.route = response, metrics, route
        self.started = started
        self.last: float | None = None

    async def send(self, event: dict) -> None:
        await self.response.write(b"data: " + orjson.dumps(event) + b"\n\n")

    async def text(self, event: dict) -> None:
        await self.send(event)
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.labels(self.route).observe(now - self.started)
        else:
            self.metrics.itl.labels(self.route).observe(now - self.last)
        self.last = now
