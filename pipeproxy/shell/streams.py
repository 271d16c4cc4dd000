"""The one place that knows a stream may be a socket.

Everything else in the shell works on ``trio.abc.Stream``, so a TLS stream (or any
other) can take a socket's place; what only a socket can tell (its addresses) or do
(wait for readability without reading, write without a checkpoint) is asked here, and
degrades gracefully for other streams.

The fast paths: each of trio's reads and writes ends with a schedule point. On a plain
socket ``receive`` lets every other ready task run first and then reads, so that under
load, when the peer has answered meanwhile, no epoll wait is armed for the read; and
``send_nowait`` writes what the socket takes at once with no schedule point: a round
trip costs one task switch a side instead of several.
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
    """``stream.receive_some(max_bytes)``; on a plain socket, one schedule point, then a
    read if the peer has something ``due`` (asked then), and only if nothing is there
    yet a wait for readability and a read again. Raises as ``receive_some`` does."""
    if not isinstance(stream, trio.SocketStream):
        return await stream.receive_some(max_bytes)
    sock = stream.socket
    # Every other task ready to run goes first. Under load that is long enough for a
    # peer that owes pipeproxy something to have answered, and the read finds its bytes
    # without arming epoll (one system call) and waiting for the event loop to report
    # them; a peer that owes nothing is waited for (its read would fail with EAGAIN).
    await trio.lowlevel.checkpoint()
    if not due():
        await trio.lowlevel.wait_readable(sock)
    while True:
        if (fd := sock.fileno()) < 0:
            raise trio.ClosedResourceError("the socket was closed")
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:
            pass
        except OSError as error:
            raise trio.BrokenResourceError(error) from error
        await trio.lowlevel.wait_readable(sock)


def send_nowait(stream: trio.abc.Stream, data: bytes) -> int:
    """How much of ``data`` a plain socket took at once, written with no checkpoint; 0
    for other streams. Raises ``trio.BrokenResourceError`` if the connection is gone."""
    if not data or not isinstance(stream, trio.SocketStream):
        return 0
    if (fd := stream.socket.fileno()) < 0:
        raise trio.ClosedResourceError("the socket was closed")
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0
    except OSError as error:  # EPIPE, ECONNRESET: Python ignores SIGPIPE
        raise trio.BrokenResourceError(error) from error
