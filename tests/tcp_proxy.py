"""A TCP proxy a test controls: `cut()` drops every connection and blackholes new ones (they
are accepted, then get nothing, like a partitioned network), `heal()` lets them through."""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, listen_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = listen_port
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.cut_now = False

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._drop()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    def cut(self) -> None:
        """Partition: live connections die, new ones hang."""
        self.cut_now = True
        self._drop()

    def heal(self) -> None:
        self.cut_now = False

    def _drop(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._pipes):
            task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            while self.cut_now:  # a blackhole: accepted, never answered
                await asyncio.sleep(0.1)
            up_reader, upstream = await asyncio.open_connection(*self.target)
            self._writers.add(upstream)
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._pipes.discard(task)
            for w in (writer, upstream):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()
