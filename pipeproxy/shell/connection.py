"""The trio shell around one Session: a client connection and its upstream connection.

Each connection has a reader task that feeds what it reads into the Session and then
carries out the actions the Session returns, in order. Session calls are synchronous, so
they never interleave; the actions are carried out under one FIFO lock taken straight
after the call, with no checkpoint in between, so they happen in the order the Session
produced them and each group of replies is a single ``send_all``. A reader that waits for
its actions to be done reads nothing meanwhile: that is the backpressure. The client
reader also parks while the Session can hold no more input. A third task sleeps until
the Session's deadline (on trio's clock) and reports a timeout when it passes.
"""

from __future__ import annotations

import secrets
import time

import structlog
import trio

from ..core.config import Address, Config
from ..core.session import Action, Close, Log, Session, ToClient, ToUpstream

CHUNK = 64 * 1024
# After the last reply, how long to wait for the client to close before we do, so a
# client still sending does not get a reset that could destroy our final reply.
LINGER = 2.0


class _ClientGone(Exception):
    """Writing to the client failed: nobody is left to answer."""


class Connection:
    """One client connection and its upstream connection, for their whole life."""

    def __init__(
        self, client: trio.SocketStream, config: Config, real_client: Address | None = None, early: bytes = b""
    ) -> None:
        """``real_client``: the address a PROXY header gave; ``early``: bytes read after it."""
        self.client = client
        self.config = config
        peer = client.socket.getpeername()
        self.log = structlog.get_logger("pipeproxy.session").bind(
            session=secrets.token_hex(6),
            client=str(real_client or Address(peer[0], peer[1])),
            upstream=str(config.upstream),
        )
        self.session = Session(config, clock=trio.current_time)
        self._early = early
        self.upstream: trio.SocketStream | None = None
        self.reason = "unknown"
        self.clean = False
        self._lock = trio.StrictFIFOLock()
        self._room = trio.lowlevel.ParkingLot()
        self._closed = trio.Event()
        self._watch = trio.CancelScope()
        self._client_gone_error = False

    async def serve(self) -> None:
        """Proxy until either side ends it; log the session's opening and its close."""
        started = time.monotonic()
        self.log.info("session open")
        try:
            await self.run()
        finally:
            log_closed = self.log.info if self.clean else self.log.warning
            log_closed(
                "session closed",
                reason=self.reason,
                duration=round(time.monotonic() - started, 6),
                commands=self.session.commands,
                messages=self.session.messages,
            )

    async def drain(self) -> None:
        """pipeproxy is stopping: finish what is in progress, then say 421 and close."""
        await self._carry_out(self.session.drain())

    async def shut_down(self) -> None:
        """The grace period is over: 421 and close now."""
        await self._carry_out(self.session.shut_down())

    async def run(self) -> None:
        try:
            if self._early:
                await self._carry_out(self.session.client_data(self._early))
            if await self._connect():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_client)
                    nursery.start_soon(self._read_upstream)
                    nursery.start_soon(self._watch_deadline)
                    await self._closed.wait()
                    nursery.cancel_scope.cancel()
            if self._client_gone_error:
                self._client_gone()
            else:
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

    def _client_gone(self) -> None:
        # The reply cannot be delivered; closing both sides is all that is left, and the
        # upstream never got a final dot the client did not send.
        self.reason = "client connection lost"
        self.log.warning("client connection lost")

    async def _read_client(self) -> None:
        session = self.session
        while True:
            while (size := min(CHUNK, session.client_room())) == 0:
                await self._room.park()
            try:
                data = await self.client.receive_some(size)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""  # a reset client is as gone as a closed one: what it sent counts
            await self._carry_out(session.client_data(data) if data else session.client_closed())
            if not data:
                return

    async def _read_upstream(self) -> None:
        session = self.session
        assert self.upstream is not None
        while True:
            try:
                # A reply is never there the moment we look (the upstream is lock-step):
                # waiting first saves the recv that would fail with EAGAIN every time.
                await trio.lowlevel.wait_readable(self.upstream.socket)
                data = await self.upstream.receive_some(CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self._carry_out(session.upstream_failed("upstream connection reset"))
                return
            await self._carry_out(session.upstream_data(data) if data else session.upstream_closed())
            if not data:
                return

    async def _watch_deadline(self) -> None:
        while True:
            with trio.CancelScope(deadline=self.session.deadline) as self._watch:
                await trio.sleep_forever()
            if trio.current_time() >= self.session.deadline:
                await self._carry_out(self.session.timed_out())

    async def _carry_out(self, actions: list[Action]) -> None:
        """Perform ``actions`` after those of every earlier Session call, before any later."""
        # Called with no checkpoint since the Session call: when the lock is free, take
        # it without one, so nothing can slip in between.
        if self._lock.locked():
            await self._lock.acquire()
        else:
            self._lock.acquire_nowait()
        try:
            await self._perform(actions)
        except _ClientGone:
            self._client_gone_error = True
            self._closed.set()
        finally:
            self._lock.release()
        # Only a deadline that comes earlier needs the watchdog woken; one that moves
        # later (every command sent does) is found when the watchdog wakes and looks.
        if (deadline := self.session.deadline) < self._watch.deadline:
            self._watch.deadline = deadline
        if self._room:
            self._room.unpark_all()

    async def _perform(self, actions: list[Action]) -> None:
        upstream_lost = False
        for action in actions:
            if isinstance(action, ToClient):
                await self._send_client(action.data)
            elif isinstance(action, ToUpstream):
                assert self.upstream is not None
                if upstream_lost:
                    continue
                try:
                    await self.upstream.send_all(action.data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    # The rest still runs: a Close later in this list must be seen.
                    upstream_lost = True
            elif isinstance(action, Log):
                getattr(self.log, action.level)(action.event, **action.fields)
            elif isinstance(action, Close):
                # Only now: the Session may be closed while another reader still waits to
                # carry out the replies that came before its Close.
                self.reason, self.clean = action.reason, action.clean
                self._closed.set()
        if upstream_lost:  # a no-op if the Session had closed already
            await self._perform(self.session.upstream_failed("upstream connection lost while sending"))

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
