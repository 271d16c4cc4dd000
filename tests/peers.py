"""Real-socket helpers: start pipeproxy and scripted peers on 127.0.0.1, talk to them.

``Peer`` wraps one stream with line and reply reading. A scripted upstream is any async
function of a Peer, served on a fresh port by ``start_upstream``; it may misbehave on
purpose (drop mid-DATA, never greet). Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import dataclasses
import json
import functools
import socket
from collections.abc import Awaitable, Callable

import trio

from pipeproxy.core.config import Address, Config
from pipeproxy.shell.server import serve
from pipeproxy.core.wire import Reply, ReplyReader

LOCALHOST = "127.0.0.1"


class Peer:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.reads = 0  # receive calls that returned data
        self._replies = ReplyReader()

    @classmethod
    async def connect(cls, address: Address) -> Peer:
        return cls(await trio.open_tcp_stream(*address))

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        if data:
            self.reads += 1
            self.buffer += data
        return bool(data)

    async def line(self) -> bytes:
        """The next CRLF-ended line, CRLF included; b"" at EOF."""
        while (end := self.buffer.find(b"\r\n")) < 0:
            if not await self._fill():
                return b""
        line = bytes(self.buffer[: end + 2])
        del self.buffer[: end + 2]
        return line

    async def until(self, marker: bytes) -> bytes:
        """Everything up to and including ``marker``; what arrived before EOF if it never comes."""
        while (end := self.buffer.find(marker)) < 0:
            if not await self._fill():
                data = bytes(self.buffer)
                self.buffer.clear()
                return data
        data = bytes(self.buffer[: end + len(marker)])
        del self.buffer[: end + len(marker)]
        return data

    async def reply(self) -> Reply:
        while (reply := self._replies.next_reply()) is None:
            if not self.buffer and not await self._fill():
                raise EOFError("connection closed")
            self._replies.feed(bytes(self.buffer))
            self.buffer.clear()
        return reply

    async def replies(self, count: int) -> list[Reply]:
        return [await self.reply() for _ in range(count)]

    async def rest(self) -> bytes:
        """Everything until EOF."""
        while await self._fill():
            pass
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def start_proxy(nursery: trio.Nursery, upstream: Address, **overrides) -> Address:
    config = dataclasses.replace(Config(listen=Address(LOCALHOST, 0), upstream=upstream), **overrides)
    [listener] = await nursery.start(serve, config)
    return Address(LOCALHOST, listener.socket.getsockname()[1])


async def start_upstream(nursery: trio.Nursery, script: Callable[[Peer], Awaitable[None]]) -> Address:
    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await script(Peer(stream))

    [listener] = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host=LOCALHOST))
    return Address(LOCALHOST, listener.socket.getsockname()[1])


async def start_legacy(nursery: trio.Nursery, mta) -> Address:
    [listener] = await nursery.start(mta.serve, LOCALHOST, 0)
    return Address(LOCALHOST, listener.socket.getsockname()[1])


class JsonLog:
    """The JSON log lines a pipeproxy process writes to a pipe, read as they come."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.lines: list[dict] = []
        self._buffer = b""

    async def until(self, event: str) -> dict:
        """Read lines up to the next one whose event is ``event``, and return it."""
        while True:
            while b"\n" not in self._buffer:
                data = await self.stream.receive_some(65536)
                assert data, f"process ended before {event!r}: {self.lines}"
                self._buffer += data
            line, self._buffer = self._buffer.split(b"\n", 1)
            self.lines.append(json.loads(line))
            if self.lines[-1]["event"] == event:
                return self.lines[-1]

    def events(self, event: str) -> list[dict]:
        return [line for line in self.lines if line["event"] == event]


def closed_port() -> Address:
    """A port on 127.0.0.1 with nothing listening: connecting is refused."""
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return Address(LOCALHOST, sock.getsockname()[1])
