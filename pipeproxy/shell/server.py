"""Listening, accepting, and stopping gracefully.

A ``Server`` gives each client connection its own ``Connection``. A failure inside one
session is logged and ends that session only. Past ``max_sessions`` a new client gets
421 at once and is closed. ``shutdown`` stops accepting (the listeners close, so new
clients are refused) and tells every session at once to finish the transaction it is
in and then answer 421; the grace period runs from when the stop was asked for, and
after it whatever is left is ended with 421.

With ``proxy_protocol`` on, each connection must start with a PROXY header (v1 or v2)
naming the real client, which the logs then show; a connection without a valid one
is closed and logged. The real client is then judged at the door: the allow and deny
lists (554) and the sessions it already has (421), before any upstream session opens.

``bind`` makes listening sockets before anything runs, so a busy address is reported
as such; with ``shared=True`` they set SO_REUSEPORT, so several worker processes can
each listen on one port and the kernel spreads connections between them. It first
checks that nothing else listens there (``probe``): SO_REUSEPORT alone would let a
second pipeproxy share the port silently.

``reload`` runs the hooks that later parts register (``reload_hooks``: each reloads one
thing, a TLS certificate say, and returns its name) when pipeproxy gets SIGHUP.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import trio

from ..core import access, proxy_protocol
from ..core import logschema as L
from ..core.config import Address, Config
from ..core.logschema import write
from ..core.wire import Reply, reply
from . import metrics, streams
from .connection import Connection
from .tls import ServerTls, upstream_context

# Connections can arrive in bursts. With a backlog as small as socat's default of 5, a
# burst of 20 clients had SYNs dropped, each retried only after the 1 s initial
# retransmission timeout (RFC 6298 §2.1). The kernel caps this at net.core.somaxconn.
BACKLOG = 4096
TOO_MANY_SESSIONS = reply(421, "4.7.0 Error: too many sessions, try again later")
TOO_MANY_FROM_CLIENT = reply(421, "4.7.0 Error: too many connections from your address, try again later")
ACCESS_DENIED = reply(554, "5.7.1 Error: access denied")
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


class ListenError(OSError):
    """An address that cannot be had, and which one."""

    def __init__(self, address: Address, error: OSError) -> None:
        super().__init__(error.errno, error.strerror or str(error))
        self.address = address

    def __str__(self) -> str:
        return f"cannot listen on {self.address}: {self.strerror}"


def _addresses(address: Address) -> list[tuple[Any, ...]]:
    return socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)


def probe(address: Address) -> int:
    """Raise ListenError if anything listens on ``address`` (another pipeproxy's workers
    included); the port, the kernel's pick if 0 was asked for.

    SO_REUSEADDR without SO_REUSEPORT: a bind that only a listening socket refuses, not
    the TIME_WAIT connections of a pipeproxy that just stopped.
    """
    port = address.port
    try:
        for family, kind, proto, _, sockaddr in _addresses(address):
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((sockaddr[0], port, *sockaddr[2:]))
                port = sock.getsockname()[1]
    except OSError as error:
        raise ListenError(address, error) from None
    return port


def bind(address: Address, shared: bool = False) -> list[socket.socket]:
    """Listening sockets for ``address`` (one per address it resolves to); ListenError if
    it cannot be had. ``shared``: SO_REUSEPORT, for workers (``probe`` first)."""
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, sockaddr in _addresses(address):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if shared:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(BACKLOG)
    except OSError as error:
        for sock in sockets:
            sock.close()
        if isinstance(error, socket.gaierror):
            error = OSError(errno.EADDRNOTAVAIL, str(error))
        raise ListenError(address, error) from None
    return sockets


def listeners_of(sockets: list[socket.socket]) -> list[trio.SocketListener]:
    return [trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in sockets]


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.connections: set[Connection] = set()
        self._per_client: collections.Counter[str] = collections.Counter()  # open sessions by client
        self._log = structlog.get_logger("pipeproxy.server")
        self._accepting = trio.CancelScope()
        self._hurry = trio.CancelScope()
        self._changed = trio.lowlevel.ParkingLot()
        self._sessions: trio.Nursery | None = None
        # Called on SIGHUP; each reloads one thing and returns its name.
        self.reload_hooks: list[Callable[[], str]] = []
        # TLS toward clients (STARTTLS, and the implicit TLS listeners); ValueError if the
        # certificate or key cannot be loaded.
        self.tls = ServerTls(config) if config.tls else None
        if self.tls is not None:
            self.reload_hooks.append(self._reload_tls)
        # TLS toward the upstream (--upstream-tls); ValueError if the CA cannot be loaded.
        self.upstream_tls = upstream_context(config)

    async def serve(
        self,
        listeners: list[trio.SocketListener] | None = None,
        tls_listeners: list[trio.SocketListener] | None = None,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept until ``shutdown``; return once every session has ended. ``tls_listeners``
        take implicit TLS (default: those of ``config.tls_listen``); ``task_status`` gets
        the plain listeners, then the TLS ones."""
        listeners = listeners or await listen(self.config.listen)
        if tls_listeners is None:
            tls_listeners = [each for address in self.config.tls_listen for each in await listen(address)]
        addresses = [str(streams.local_address(listener)) for listener in listeners + tls_listeners]
        write(self._log, L.LISTENING, addresses=addresses, upstream=str(self.config.upstream))
        async with trio.open_nursery() as sessions:
            self._sessions = sessions
            with self._accepting:
                task_status.started(listeners + tls_listeners)
                # Sessions live in our nursery, so ending the accept loops (which closes
                # the listeners) leaves them running.
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(
                        functools.partial(trio.serve_listeners, handler_nursery=sessions), self._handle, listeners
                    )
                    if tls_listeners:
                        accepting.start_soon(
                            functools.partial(trio.serve_listeners, handler_nursery=sessions),
                            functools.partial(self._handle, implicit_tls=True),
                            tls_listeners,
                        )

    async def shutdown(self, grace: float, asked_at: float | None = None) -> None:
        """Stop accepting; let sessions finish until ``grace`` seconds after ``asked_at``
        (trio's clock: when the signal came; default now), then end them."""
        deadline = (trio.current_time() if asked_at is None else asked_at) + grace
        self._accepting.cancel()
        write(self._log, L.DRAINING, sessions=len(self.connections), grace_period=grace)
        self._tell_all(Connection.drain)
        with self._hurry, trio.move_on_at(deadline):
            await self._wait_for_sessions()
        if self.connections:
            write(self._log, L.GRACE_OVER, sessions=len(self.connections))
            self._tell_all(Connection.shut_down)
            with trio.move_on_after(FINAL_CLOSE_TIMEOUT):
                await self._wait_for_sessions()
        write(self._log, L.STOPPED, sessions_left=len(self.connections))

    def _tell_all(self, tell: Callable[[Connection], Awaitable[None]]) -> None:
        """Tell every connection at once: one whose client is stuck must not hold up the rest.

        The calls run in the sessions' nursery, not under shutdown's deadline: cancelled
        halfway, a connection would lose the rest of its actions (a Close after a 421),
        and nothing later would close it. A stuck call ends with its connection, whose
        writes have their own timeout.
        """
        assert self._sessions is not None, "connections exist only while serve runs"
        for connection in list(self.connections):
            self._sessions.start_soon(tell, connection)

    @property
    def stopping(self) -> bool:
        return self._accepting.cancel_called

    def health(self) -> tuple[bool, str]:
        """For the health endpoint: serving, or draining."""
        if self.stopping:
            return False, f"draining sessions={len(self.connections)}"
        return True, f"ok sessions={len(self.connections)}"

    def reload(self) -> list[str]:
        """Run the reload hooks; the names of what was reloaded (a failed hook is logged
        and what it guards stays as it was)."""
        reloaded = []
        for hook in self.reload_hooks:
            try:
                reloaded.append(hook())
            except Exception:
                self._log.exception(L.RELOAD_FAILED.name)
        return reloaded

    def _reload_tls(self) -> str:
        """Certificate rotation: new sessions use the files as they are now; sessions
        already in TLS keep theirs. ValueError (logged) if the new pair is bad."""
        assert self.tls is not None
        if error := self.tls.reload():
            raise ValueError(error)
        return "tls certificate"

    def hurry(self) -> None:
        """End the grace period now (a second signal)."""
        self._hurry.cancel()

    async def _wait_for_sessions(self) -> None:
        while self.connections:
            await self._changed.park()

    async def _handle(self, stream: trio.SocketStream, implicit_tls: bool = False) -> None:
        if len(self.connections) >= self.config.max_sessions:
            write(self._log, L.TOO_MANY_SESSIONS, max_sessions=self.config.max_sessions)
            metrics.observe_line(L.TOO_MANY_SESSIONS)
            await _refuse(stream, TOO_MANY_SESSIONS)
            return
        client, early = streams.peer_address(stream), b""
        if self.config.proxy_protocol:
            try:
                real, early = await _read_proxy_header(stream)
            except (ValueError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
                write(self._log, L.BAD_PROXY_HEADER, peer=str(client), error=str(error) or "timeout")
                metrics.observe_line(L.BAD_PROXY_HEADER)
                await stream.aclose()
                return
            client = real or client
        if reason := access.refusal(client.host, self.config.allow, self.config.deny):
            write(self._log, L.CLIENT_REFUSED, client=str(client), reason=reason)
            metrics.observe_line(L.CLIENT_REFUSED, reason=reason)
            await _refuse(stream, ACCESS_DENIED)
            return
        key = str(access.client_ip(client.host) or client.host)
        if 0 < self.config.max_sessions_per_client <= self._per_client[key]:
            write(self._log, L.CLIENT_REFUSED, client=str(client), reason="too many sessions from this client")
            metrics.observe_line(L.CLIENT_REFUSED, reason="too many sessions from this client")
            await _refuse(stream, TOO_MANY_FROM_CLIENT)
            return
        self._per_client[key] += 1
        connection = Connection(stream, self.config, client, early, self.tls, implicit_tls, self.upstream_tls)
        self.connections.add(connection)
        if metrics.current:
            metrics.current.session_opened()
        try:
            if self._accepting.cancel_called:  # accepted just before shutdown began
                await connection.drain()
            await connection.serve()
        except Exception:
            self._log.exception(L.SESSION_FAILED.name)
        finally:
            self.connections.discard(connection)
            if metrics.current:
                metrics.current.session_ended()
            self._per_client[key] -= 1
            if not self._per_client[key]:
                del self._per_client[key]
            self._changed.unpark_all()


async def _refuse(stream: trio.SocketStream, answer: Reply) -> None:
    """Say ``answer`` and close, at once, not a hang: the client can try again later or
    go to another MX. No upstream session is opened for it."""
    with trio.move_on_after(REFUSAL_TIMEOUT):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(answer.serialise())
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
