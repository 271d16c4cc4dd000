"""Listening, accepting, and stopping gracefully.

A ``Server`` gives each client connection its own ``Connection``. A failure inside one
session is logged and ends that session only. Past ``max_sessions`` a new client gets
421 at once and is closed. ``shutdown`` stops accepting (the listeners close, so new
clients are refused), lets every session finish the transaction it is in, answers
the rest with 421, and after the grace period ends whatever is left with 421.

With ``proxy_protocol`` on, each connection must start with a PROXY header (v1 or v2)
naming the real client, which the logs then show; a connection without a valid one
is closed and logged.

With ``shared=True`` the listening sockets set SO_REUSEPORT, so several worker
processes can listen on one port and the kernel spreads connections between them.
"""

from __future__ import annotations

import contextlib
import socket

import structlog
import trio

from ..core import proxy_protocol
from ..core.config import Address, Config
from ..core.wire import reply
from .connection import Connection

# Connections can arrive in bursts. With a backlog as small as socat's default of 5, a
# burst of 20 clients had SYNs dropped, each retried only after the 1 s initial
# retransmission timeout (RFC 6298 §2.1). The kernel caps this at net.core.somaxconn.
BACKLOG = 4096
TOO_MANY_SESSIONS = reply(421, "4.7.0 Error: too many sessions, try again later")
REFUSAL_TIMEOUT = 5.0
# After the grace period, how long sessions get to deliver their 421 and close.
FINAL_CLOSE_TIMEOUT = 5.0
PROXY_HEADER_TIMEOUT = 10.0


async def listen(address: Address, shared: bool = False) -> list[trio.SocketListener]:
    """The listening sockets for ``address``; OSError if it cannot be had."""
    if not shared:
        return await trio.open_tcp_listeners(address.port, host=address.host, backlog=BACKLOG)
    listeners = []
    for family, kind, proto, _, sockaddr in await trio.socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        sock = trio.socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind(sockaddr)
        sock.listen(BACKLOG)
        listeners.append(trio.SocketListener(sock))
    return listeners


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.connections: set[Connection] = set()
        self._log = structlog.get_logger("pipeproxy.server")
        self._accepting = trio.CancelScope()
        self._hurry = trio.CancelScope()
        self._changed = trio.lowlevel.ParkingLot()

    async def serve(
        self,
        listeners: list[trio.SocketListener] | None = None,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept until ``shutdown``; return once every session has ended."""
        listeners = listeners or await listen(self.config.listen)
        addresses = [str(Address(*listener.socket.getsockname()[:2])) for listener in listeners]
        self._log.info("listening", addresses=addresses, upstream=str(self.config.upstream))
        async with trio.open_nursery() as sessions:
            with self._accepting:
                task_status.started(listeners)
                # Sessions live in our nursery, so ending the accept loops (which closes
                # the listeners) leaves them running.
                await trio.serve_listeners(self._handle, listeners, handler_nursery=sessions)

    async def shutdown(self, grace: float) -> None:
        """Stop accepting; let sessions finish within ``grace`` seconds, then end them."""
        self._accepting.cancel()
        self._log.info("draining", sessions=len(self.connections), grace_period=grace)
        for connection in list(self.connections):
            await connection.drain()
        with self._hurry:
            with trio.move_on_after(grace):
                await self._wait_for_sessions()
        if self.connections:
            self._log.warning("grace period over, closing sessions", sessions=len(self.connections))
            for connection in list(self.connections):
                await connection.shut_down()
            with trio.move_on_after(FINAL_CLOSE_TIMEOUT):
                await self._wait_for_sessions()
        self._log.info("stopped", sessions_left=len(self.connections))

    @property
    def stopping(self) -> bool:
        return self._accepting.cancel_called

    def health(self) -> tuple[bool, str]:
        """For the health endpoint: serving, or draining."""
        if self.stopping:
            return False, f"draining sessions={len(self.connections)}"
        return True, f"ok sessions={len(self.connections)}"

    def hurry(self) -> None:
        """End the grace period now (a second signal)."""
        self._hurry.cancel()

    async def _wait_for_sessions(self) -> None:
        while self.connections:
            await self._changed.park()

    async def _handle(self, stream: trio.SocketStream) -> None:
        if len(self.connections) >= self.config.max_sessions:
            await self._refuse(stream)
            return
        client, early = None, b""
        if self.config.proxy_protocol:
            try:
                client, early = await _read_proxy_header(stream)
            except (ValueError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
                peer = stream.socket.getpeername()
                self._log.warning(
                    "bad PROXY header, closing", peer=str(Address(*peer[:2])), error=str(error) or "timeout"
                )
                await stream.aclose()
                return
        connection = Connection(stream, self.config, client, early)
        self.connections.add(connection)
        try:
            if self._accepting.cancel_called:  # accepted just before shutdown began
                await connection.drain()
            await connection.serve()
        except Exception:
            self._log.exception("session failed")
        finally:
            self.connections.discard(connection)
            self._changed.unpark_all()

    async def _refuse(self, stream: trio.SocketStream) -> None:
        # At once, not a hang: the client can try again or go to another MX.
        self._log.warning("session refused: too many sessions", max_sessions=self.config.max_sessions)
        with trio.move_on_after(REFUSAL_TIMEOUT):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(TOO_MANY_SESSIONS)
        await stream.aclose()


async def _read_proxy_header(stream: trio.SocketStream) -> tuple[Address | None, bytes]:
    """One PROXY header: (the real client, or None for the connection's own; bytes after it)."""
    data = b""
    with trio.fail_after(PROXY_HEADER_TIMEOUT):
        while (parsed := proxy_protocol.parse(data)) is None:
            chunk = await stream.receive_some(proxy_protocol.V2_MAX_PAYLOAD)
            if not chunk:
                raise ValueError("connection closed before the PROXY header ended")
            data += chunk
    client, consumed = parsed
    return client, data[consumed:]


async def serve(
    config: Config,
    listeners: list[trio.SocketListener] | None = None,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Proxy every connection on ``listeners`` (default: ``config.listen``); never stops."""
    await Server(config).serve(listeners, task_status=task_status)
