"""The trio shell around one Session: a client connection and its upstream connection.

Two reader tasks, one per connection, hand what they read to the one task that owns the
Session; it feeds the Session and carries out its actions in order, so each stream has a
single writer and each group of replies is a single ``send_all``. The client reader asks
the Session how much it may still hold and parks while the answer is zero: backpressure,
never unbounded buffering. Deadlines come from the Session (on trio's clock) and are
applied here with ``move_on_at``.
"""

from __future__ import annotations

import secrets
import time

import structlog
import trio

from .config import Address, Config
from .session import Action, Close, Log, Session, ToClient, ToUpstream

CHUNK = 64 * 1024
# After the last reply, how long to wait for the client to close before we do, so a
# client still sending does not get a reset that could destroy our final reply.
LINGER = 2.0

CLIENT, UPSTREAM = "client", "upstream"


class _ClientGone(Exception):
    """Writing to the client failed: nobody is left to answer."""


async def proxy_connection(client: trio.SocketStream, config: Config) -> None:
    """Serve one client connection until either side ends it."""
    peer = client.socket.getpeername()
    log = structlog.get_logger("pipeproxy.session").bind(
        session=secrets.token_hex(6), client=str(Address(peer[0], peer[1])), upstream=str(config.upstream)
    )
    started = time.monotonic()
    log.info("session open")
    connection = _Connection(client, config, log)
    try:
        await connection.run()
    finally:
        session = connection.session
        log_closed = log.info if connection.clean else log.warning
        log_closed(
            "session closed",
            reason=connection.reason,
            duration=round(time.monotonic() - started, 6),
            commands=session.commands,
            messages=session.messages,
        )


class _Connection:
    def __init__(self, client: trio.SocketStream, config: Config, log: structlog.typing.FilteringBoundLogger) -> None:
        self.client = client
        self.config = config
        self.log = log
        self.session = Session(config, clock=trio.current_time)
        self.upstream: trio.SocketStream | None = None
        self.reason = "unknown"
        self.clean = False
        self._events_in, self._events_out = trio.open_memory_channel[tuple[str, bytes | None]](0)
        self._room = trio.lowlevel.ParkingLot()

    async def run(self) -> None:
        try:
            if await self._connect():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read, self.client, CLIENT)
                    nursery.start_soon(self._read, self.upstream, UPSTREAM)
                    await self._drive()
                    nursery.cancel_scope.cancel()
            await self._linger()
        except _ClientGone:
            self._client_gone()
        finally:
            with trio.CancelScope(shield=True):
                if self.upstream is not None:
                    await self.upstream.aclose()
                await self.client.aclose()

    async def _connect(self) -> bool:
        host, port = self.config.upstream
        with trio.move_on_at(self.session.deadline):
            try:
                self.upstream = await trio.open_tcp_stream(host, port)
            except OSError as error:
                self.log.warning("upstream unreachable", error=str(error))
                await self._perform(self.session.upstream_failed(f"upstream unreachable: {error}"))
                return False
            return True
        self.log.warning("upstream unreachable", error="connect timed out")
        await self._perform(self.session.timed_out())
        return False

    async def _drive(self) -> None:
        try:
            await self._drive_session()
        except _ClientGone:
            self._client_gone()

    def _client_gone(self) -> None:
        # The reply cannot be delivered; closing both sides is all that is left, and the
        # upstream never got a final dot the client did not send.
        self.reason = "client connection lost"
        self.log.warning("client connection lost")

    async def _drive_session(self) -> None:
        session = self.session
        while not session.closed:
            with trio.move_on_at(session.deadline) as scope:
                source, data = await self._events_out.receive()
            if scope.cancelled_caught:
                actions = session.timed_out()
            elif source == CLIENT:
                # A reset client is as gone as a closed one: what it sent still counts.
                actions = session.client_data(data) if data else session.client_closed()
            elif data:
                actions = session.upstream_data(data)
            elif data is None:
                actions = session.upstream_failed("upstream connection reset")
            else:
                actions = session.upstream_closed()
            await self._perform(actions)
            self._room.unpark_all()

    async def _read(self, stream: trio.SocketStream, source: str) -> None:
        """Hand over what arrives: b"" for EOF, None for a broken connection."""
        while True:
            size = CHUNK
            if source == CLIENT:
                while (size := min(CHUNK, self.session.client_room())) == 0:
                    await self._room.park()
            try:
                data: bytes | None = await stream.receive_some(size)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = None
            await self._events_in.send((source, data))
            if not data:
                return

    async def _perform(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, ToClient):
                await self._send_client(action.data)
            elif isinstance(action, ToUpstream):
                assert self.upstream is not None
                try:
                    await self.upstream.send_all(action.data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._perform(self.session.upstream_failed("upstream connection lost while sending"))
                    return
            elif isinstance(action, Log):
                getattr(self.log, action.level)(action.event, **action.fields)
            elif isinstance(action, Close):
                self.reason, self.clean = action.reason, action.clean

    async def _send_client(self, data: bytes) -> None:
        with trio.move_on_after(self.config.timeouts.client_idle) as scope:
            try:
                await self.client.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                raise _ClientGone from error
        if scope.cancelled_caught:
            raise _ClientGone

    async def _linger(self) -> None:
        """Half-close toward the client and let it finish reading our last reply."""
        with trio.move_on_after(LINGER):
            try:
                await self.client.send_eof()
                while await self.client.receive_some(CHUNK):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
