"""The one place that knows a stream may be a socket, with ``outbox.py`` for writes.

Everything else in the shell works on ``trio.abc.Stream``, so a TLS stream (or any
other) can take a socket's place; what only a socket can tell (its addresses) or do
(wait for readability without reading) is asked here, and degrades gracefully for
other streams.

The fast path: each of trio's reads ends with a schedule point. On a plain socket
``receive`` reads at once when the peer owes pipeproxy something, and otherwise waits
for readability first: no EAGAIN, no schedule point after the read. (Writes on plain
sockets go at the end of the event loop's turn, with no schedule point either:
``outbox.py``.)
"""

from __future__ import annotations

import os
from collections.abc import Callable

import trio

from ..core.config import Address


def _socket_of(stream: trio.abc.Stream | trio.abc.Listener[trio.abc.Stream]) -> trio.socket.SocketType | None:
    """The socket under ``stream`` (through any wrapping stream), or None."""
    while True:
        sock = getattr(stream, "socket", None)
        if sock is not None:
            return sock
        inner = getattr(stream, "transport_stream", None)
        if inner is None:
            return None
        stream = inner


def peer_address(stream: trio.abc.Stream) -> Address:
    sock = _socket_of(stream)
    if sock is None:
        return Address("unknown", 0)
    peer = sock.getpeername()
    return Address(peer[0], peer[1])


def local_address(stream: trio.abc.Stream | trio.abc.Listener[trio.abc.Stream]) -> Address:
    sock = _socket_of(stream)
    if sock is None:
        return Address("unknown", 0)
    local = sock.getsockname()
    return Address(local[0], local[1])


async def receive(stream: trio.abc.Stream, max_bytes: int, due: Callable[[], bool]) -> bytes | bytearray:
    """``stream.receive_some(max_bytes)``; on a plain socket, when the peer has something
    ``due``, a read once the event loop's turn is over, and only if nothing is there yet
    a wait for readability and a read again. Raises as ``receive_some`` does.

    The turn's end writes what the reader's last event said (``outbox.py``); under load
    the next turn comes late enough for a peer that owes pipeproxy something to have
    answered, and the read finds its bytes without arming epoll (one system call) and
    waiting for the event loop to report them. A peer that owes nothing is waited for at
    once (its read would fail with EAGAIN, and the turn's end would be waited for in
    vain: a task switch an event)."""
    if not isinstance(stream, trio.SocketStream):
        return await stream.receive_some(max_bytes)
    sock = stream.socket
    ready = due()
    if ready:
        await trio.lowlevel.checkpoint()
    while True:
        if (fd := sock.fileno()) < 0:  # closed here (a failed write): before any wait on it
            raise trio.ClosedResourceError("the socket was closed")
        if ready:
            try:
                return os.read(fd, max_bytes)
            except BlockingIOError:
                pass
            except OSError as error:
                raise trio.BrokenResourceError(error) from error
        await trio.lowlevel.wait_readable(sock)
        ready = True


class Prefixed(trio.abc.HalfCloseableStream):
    """``transport_stream`` with ``prefix`` read first: bytes read ahead of their reader
    (the start of a TLS handshake, read with the PROXY header before it) given back."""

    def __init__(self, transport_stream: trio.abc.HalfCloseableStream, prefix: bytes) -> None:
        self.transport_stream = transport_stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self._prefix:
            return await self.transport_stream.receive_some(max_bytes)
        await trio.lowlevel.checkpoint()
        size = len(self._prefix) if max_bytes is None else max_bytes
        data, self._prefix = self._prefix[:size], self._prefix[size:]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.transport_stream.send_eof()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()
