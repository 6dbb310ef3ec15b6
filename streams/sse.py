"""A gateway call in progress, and its server-sent events: text as it is generated.

`LiveCall` collects a call's deltas (merged across attempts and re-runs, `streams.deltas`)
while its attempts run; `send_events` writes them in OpenAI's chunk format as they come:
the role (chat), text pieces, the finish reason, the usage chunk if asked, `[DONE]`. The
first byte waits for the first piece of text or the result, so a request the worker
refuses is still answered with an HTTP error, not a stream. A failure after text was sent
(a retry or re-run that would contradict it, an error result) ends the stream with one
error event: text already shown is never repeated or replaced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import orjson
from aiohttp import web

from schemas import Delta, ErrorCode, Result
from streams.deltas import Diverged, MergedStream
from streams.gateway_metrics import GatewayMetrics
from streams.openai_format import (
    ApiError, chunk_base, error_event, error_response, finish_chunk, prompt_error, result_error,
    role_chunk, text_chunk, usage_chunk,
)

log = logging.getLogger("ferry.gateway")

# How often a waiting call checks that its caller is still connected.
DISCONNECT_POLL_S = 0.5


class Disconnected(Exception):
    """The caller went away before its answer was sent."""


class LiveCall:
    """One call's attempts: the backend now trying it, and the text streamed so far."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.deployment: str | None = None  # of the attempt in progress
        self.pieces: list[Delta] = []       # merged text pieces, in order
        self.failure: str | None = None     # why the stream cannot go on
        self._merged = MergedStream(request_id)
        self._changed = asyncio.Event()

    def on_delta(self, delta: Delta) -> None:
        """A delta from Kafka; only the current attempt's backend is listened to."""
        if self.failure is None and delta.model == self.deployment:
            self._take(lambda: self._merged.add(delta))

    def complete(self, result: Result) -> None:
        """The result: whatever its text adds to the pieces becomes the last piece."""
        if self.failure is None and result.error is None:
            self._take(lambda: self._merged.finish(result))

    def seen(self) -> None:
        self._changed.clear()

    async def signal(self) -> None:
        """Until a new piece or a failure after the last `seen()`."""
        await self._changed.wait()

    def _take(self, step: Callable[[], Delta | None]) -> None:
        try:
            piece = step()
        except Diverged as exc:
            self.failure = str(exc)
            log.warning("stream of %s ended: %s", self.request_id, exc)
            piece = None
        if piece is not None:
            self.pieces.append(piece)
        self._changed.set()


def gone(http: web.Request) -> bool:
    return http.transport is None or http.transport.is_closing()


async def send_events(http: web.Request, live: LiveCall | list[LiveCall],
                      task: asyncio.Future[Result] | list[asyncio.Future[Result]], *,
                      chat: bool, created: int, model: str, include_usage: bool,
                      metrics: GatewayMetrics, route: str, started: float,
                      watch_caller: bool = True, request_id: str | None = None,
                      limit_field: str = "max_tokens") -> web.StreamResponse:
    """Stream a call (or, with lists, several prompts' calls as choices 0, 1, ... of one
    stream, pieces interleaved as they come); Disconnected if the caller leaves (when
    `watch_caller`). The first byte waits until every call has text or its result, so any
    refusal is an HTTP error."""
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
    try:
        if chat:
            for i in range(len(lives)):
                await writer.send(role_chunk(base, i))
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
                    if piece.text:
                        await writer.text(text_chunk(base, chat, piece.text, i))
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
                    await writer.send(finish_chunk(base, chat, result, i))
                    finished[i] = result
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
