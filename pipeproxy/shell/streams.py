"""The one place that knows a stream may be a socket.

Everything else in the shell works on ``trio.abc.Stream``, so a TLS stream (or any
other) can take a socket's place; what only a socket can tell (its addresses) or do
(wait for readability without reading) is asked here, and degrades gracefully for
other streams.
"""

from __future__ import annotations

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


async def wait_readable(stream: trio.abc.Stream) -> None:
    """Wait until a plain socket stream has data, so the read after it never fails
    with EAGAIN; a no-op for other streams (a TLS stream may have decrypted data
    buffered that its socket does not show)."""
    if isinstance(stream, trio.SocketStream):
        await trio.lowlevel.wait_readable(stream.socket)
