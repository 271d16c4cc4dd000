"""The trio shell around one Session: a client connection and its upstream connection.

Each connection has a reader task that turns what it reads into an event for the
Session and carries out the actions the Session returns. One FIFO lock is held from the
first action that awaits (a settle, a connect, a handshake) until its actions and the
events they lead to (a failed write, a connect) are done, and an event that finds the
lock held waits for it before the Session sees it; an event whose actions are writes and
log lines reaches no schedule point at all. So actions happen in the order the Session
produced them, never overtaken by a later call's. A reader that waits for the lock or
for its actions reads nothing meanwhile: that is the backpressure. The client reader
also parks while the Session can hold no more input. A third task, the watchdog, sleeps
until the Session's deadline (on trio's clock) and sends ``Tick``, or until a channel
needs settling.

What the Session says to write is pushed to the side's ``Channel`` (``outbox.py``),
each group of replies one piece, and written at the end of the event loop's turn with
every other session's writes. What a socket did not take then, and a write that failed,
wake the watchdog, which settles the channels under the lock: it writes the rest and
turns a failure into an event, while the readers' events wait for the lock. Other
tasks settle at once, and anything but a write waits until what was said before it is
written. Every settling has a time limit, so no peer can hold the lock for ever: a
client that stops reading is gone after ``client_idle``, an upstream that stops reading
fails after ``data_block``. Reads on plain sockets go through ``streams``' fast path:
one task switch a side per round trip.

The Session decides when to connect to the upstream (``ConnectUpstream``) and when to
drop a connection (``DropUpstream``); what a dropped connection still delivers is never
given to the Session, which has moved on.
"""

from __future__ import annotations

import contextlib
import secrets
import ssl

import structlog
import trio

from ..core import logschema as L
from ..core import proxy_protocol
from ..core.actions import (
    Action,
    Close,
    ConnectUpstream,
    DropUpstream,
    Log,
    StartTls,
    ToClient,
    ToUpstream,
    UpstreamStartTls,
)
from ..core.config import Address, Config
from ..core.events import (
    ClientClosed,
    ClientConnected,
    ClientData,
    ClientWriteFailed,
    Drain,
    Event,
    ShutDown,
    Tick,
    TlsEstablished,
    TlsFailed,
    TlsInfo,
    UpstreamClosed,
    UpstreamConnected,
    UpstreamData,
    UpstreamFailed,
    UpstreamTlsEstablished,
    UpstreamTlsFailed,
)
from ..core.logschema import write
from ..core.session import Session
from ..core.wire import Reply
from . import metrics, streams
from .outbox import Channel
from .tls import ServerTls, upstream_context

CHUNK = 64 * 1024
# After the last reply, how long to wait for the client to close before we do, so a
# client still sending does not get a reset that could destroy our final reply.
LINGER = 2.0
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


class Connection:
    """One client connection and its upstream connections, for their whole life."""

    def __init__(
        self,
        client: trio.abc.Stream,
        config: Config,
        real_client: Address | None = None,
        early: bytes = b"",
        tls: ServerTls | None = None,
        implicit_tls: bool = False,
        upstream_tls: ssl.SSLContext | None = None,
    ) -> None:
        """``real_client``: the address a PROXY header gave; ``early``: bytes read after it;
        ``tls``: for STARTTLS, or, with ``implicit_tls``, from the first byte;
        ``upstream_tls``: the context for the upstream's STARTTLS (made from ``config``
        if not given)."""
        self.client = client
        self.config = config
        self.client_address = real_client or streams.peer_address(client)
        self.server_address = streams.local_address(client)
        self.id = secrets.token_hex(6)
        self.log = structlog.get_logger("pipeproxy.session").bind(
            session=self.id, client=str(self.client_address), upstream=str(config.upstream)
        )
        # The clock trio.current_time() reads, without the two calls to find it each time.
        self.session = Session(config, clock=trio.lowlevel.current_clock().current_time)
        self._early = early
        self.upstream: trio.abc.Stream | None = None
        # What is written to each side: at the end of the event loop's turn (outbox.py).
        self._to_client = Channel(client, self._settle_soon)
        self._to_upstream: Channel | None = None
        # Bumped the moment the Session drops an upstream connection: a reader of an
        # older one reports nothing more.
        self._upstream_epoch = 0
        # The same for the client's stream, which STARTTLS replaces: cleartext read before
        # the switch must never reach the Session after it.
        self._client_epoch = 0
        self._reading: trio.CancelScope | None = None  # while the client reader waits in a read
        self._reader_done = trio.Event()
        self._tls = tls
        self._implicit_tls = implicit_tls
        if upstream_tls is None and config.upstream_tls != "none":
            upstream_tls = upstream_context(config)
        self._upstream_tls = upstream_tls
        self._lock = trio.StrictFIFOLock()
        self._room = trio.lowlevel.ParkingLot()
        self._closed = trio.Event()
        self._client_lost = False
        self._watch = trio.CancelScope()
        self._nursery: trio.Nursery | None = None

    async def serve(self) -> None:
        """Proxy until the Session closes; then close both connections."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._watch_deadline)
                info = None
                if self._implicit_tls:
                    if self._early:  # read with the PROXY header: the handshake's first bytes
                        assert isinstance(self.client, trio.abc.HalfCloseableStream)
                        self.client, self._early = streams.Prefixed(self.client, self._early), b""
                    outcome = await self._handshake()
                    if isinstance(outcome, str):
                        # Nothing was said and no upstream session opened: log it, close.
                        write(self.log, L.TLS_FAILED, reason=outcome)
                        self._client_lost = True
                        nursery.cancel_scope.cancel()
                        return
                    info = outcome
                await self._event(ClientConnected(self.client_address, self.server_address, self.id, info), now=True)
                if self._early:
                    await self._event(ClientData(self._early), now=True)
                self._start_reading()
                await self._closed.wait()
                nursery.cancel_scope.cancel()
            if not self._client_lost:
                await self._linger()
        finally:
            # Settled before any Close; what a cancelled session left goes if it can at once.
            self._to_client.write_nowait()
            if self._to_upstream is not None:
                self._to_upstream.write_nowait()
            with trio.CancelScope(shield=True):
                if self.upstream is not None:
                    with trio.move_on_after(LINGER), contextlib.suppress(*_GONE):
                        await self.upstream.aclose()
                with trio.move_on_after(LINGER), contextlib.suppress(*_GONE):
                    await self.client.aclose()  # TLS says close_notify, if the peer listens

    async def drain(self) -> None:
        """pipeproxy is stopping: finish what is in progress, then say 421 and close."""
        await self._event(Drain(), now=True)

    async def shut_down(self) -> None:
        """The grace period is over: 421 and close now."""
        await self._event(ShutDown(), now=True)

    async def _event(
        self, event: Event, epoch: int | None = None, client_epoch: int | None = None, now: bool = False
    ) -> None:
        """Hand ``event`` to the Session and carry out what it says, after every earlier
        event's actions and before any later; ``epoch``/``client_epoch``: the upstream
        connection or client stream it came from, dropped if that has been replaced.
        What the actions write goes at the end of the turn; ``now``: settled before this
        returns (a reader's writes are settled by the watchdog, when they need it)."""
        if not self._lock.locked() and not now:
            # Nearly always: nobody's actions are under way, and these are writes pushed
            # to channels and log lines, carried out with no schedule point, so nothing
            # can come between the Session call and them; the lock is taken (1.3 µs in
            # trio, a fifth of an event's cost) only from the first action that awaits.
            actions = self._handle(event) if self._current(epoch, client_epoch) else []
            if rest := actions[self._perform_at_once(actions) :]:
                self._lock.acquire_nowait()
                try:
                    await self._perform(rest)
                finally:
                    self._lock.release()
        else:
            # Held or with waiters, this call queues behind them (FIFO).
            try:
                self._lock.acquire_nowait()
            except trio.WouldBlock:
                await self._lock.acquire()
            try:
                # Asked only now: while this call waited, the actions before it may have
                # replaced the stream it came from (STARTTLS: what was read in clear must
                # never reach the Session inside TLS; a dropped upstream's last bytes).
                if self._current(epoch, client_epoch):
                    await self._perform(self._handle(event))
                if now:
                    await self._settle_and_report()
            finally:
                self._lock.release()
        # Only a deadline that comes earlier needs the watchdog woken; one that moves
        # later (every command sent does) is found when the watchdog wakes and looks.
        if (deadline := self.session.deadline) < self._watch.deadline:
            self._watch.deadline = deadline
        if self._room:
            self._room.unpark_all()

    def _current(self, epoch: int | None, client_epoch: int | None) -> bool:
        """Whether the streams an event came from are still the ones in use."""
        return (epoch is None or epoch == self._upstream_epoch) and (
            client_epoch is None or client_epoch == self._client_epoch
        )

    def _handle(self, event: Event) -> list[Action]:
        actions = self.session.handle(event)
        for action in actions:
            if type(action) is DropUpstream:
                self._upstream_epoch += 1
                break
        return actions

    def _start_reading(self) -> None:
        assert self._nursery is not None
        self._reader_done = trio.Event()
        self._nursery.start_soon(self._read_client, self.client, self._client_epoch, self._reader_done)

    def _settled(self) -> bool:
        return self._to_client.settled and (self._to_upstream is None or self._to_upstream.settled)

    def _settle_soon(self) -> None:
        """A channel needs settling: the watchdog does it in the next turn."""
        self._watch.cancel()

    async def _settle_and_report(self) -> None:
        """Under the lock: write what is pending; hand failed writes to the Session."""
        while outcomes := await self._settle():
            for outcome in outcomes:
                await self._perform(self._handle(outcome))

    async def _settle(self) -> list[Event]:
        """Under the lock: write what each side still has pending, within its time limit
        (a client that stops reading is gone after ``client_idle``, an upstream after
        ``data_block``); the failures, as events."""
        client, upstream = await self._settle_client(), await self._settle_upstream()
        return [failure for failure in (client, upstream) if failure is not None]

    async def _settle_client(self) -> Event | None:
        if self._client_lost:
            self._to_client.close()  # nothing more is said to it
            return None
        if (failure := await self._to_client.settle(self.config.timeouts.client_idle)) is None:
            return None
        self._client_lost = True
        return ClientWriteFailed("client stopped reading" if failure else "client connection lost")

    async def _settle_upstream(self) -> Event | None:
        if self._to_upstream is None:
            return None
        if (failure := await self._to_upstream.settle(self.config.timeouts.data_block)) is None:
            return None
        await self._drop_upstream()
        return UpstreamFailed("upstream stopped reading" if failure else "upstream connection lost while sending")

    async def _read_client(self, stream: trio.abc.Stream, epoch: int, done: trio.Event) -> None:
        session = self.session
        # One scope for the reader's life (entering one costs more than a read), offered
        # to STARTTLS to cancel only while the reader waits in a read.
        with trio.CancelScope() as reading:
            try:
                while epoch == self._client_epoch:
                    while (size := min(CHUNK, session.client_room())) == 0:
                        await self._room.park()
                    if epoch != self._client_epoch:
                        return
                    self._reading = reading
                    try:
                        data = await streams.receive(stream, size, session.awaiting_client)
                    except _GONE:
                        data = b""  # a reset client is as gone as a closed one: what it sent counts
                    finally:
                        self._reading = None
                    if epoch != self._client_epoch:
                        return  # STARTTLS came meanwhile: the stream is TLS's now
                    await self._event(ClientData(data) if data else ClientClosed(), client_epoch=epoch)
                    if not data:
                        return
            finally:
                done.set()

    async def _read_upstream(self, stream: trio.abc.Stream, epoch: int) -> None:
        while True:
            try:
                data = await streams.receive(stream, CHUNK, self.session.awaiting_upstream)
            except _GONE:
                await self._event(UpstreamFailed("upstream connection reset"), epoch, now=True)
                return
            await self._event(UpstreamData(data) if data else UpstreamClosed(), epoch)
            if not data or epoch != self._upstream_epoch:
                return

    async def _watch_deadline(self) -> None:
        """Sends ``Tick`` when the Session's deadline passes, and settles the channels
        when one asks (``_settle_soon`` cancels the sleep)."""
        while True:
            with trio.CancelScope(deadline=self.session.deadline) as self._watch:
                if self._settled():  # a request that came while it was busy is seen here
                    await trio.sleep_forever()
            if not self._settled():
                async with self._lock:
                    await self._settle_and_report()
            if trio.current_time() >= self.session.deadline:
                await self._event(Tick(), now=True)

    async def _perform(self, actions: list[Action]) -> None:
        """Carry out ``actions``; what they lead to (a failed write, a connect) is handed
        back to the Session as events once the whole list is done, so an action later
        in the list (a Close) is never skipped."""
        outcomes: list[Event] = []
        for action in actions:
            if self._perform_at_once((action,)):
                continue
            # Anything else acts on what was said before it: that is written first.
            outcomes += await self._settle()
            if isinstance(action, ConnectUpstream):
                if not self._client_lost:  # the Session will close on the failed write
                    outcomes.append(await self._connect())
            elif isinstance(action, DropUpstream):
                await self._drop_upstream()
            elif isinstance(action, StartTls):
                if not self._client_lost:  # the write before it failed: no handshake to wait for
                    outcomes.append(await self._start_tls(action.ready))
            elif isinstance(action, UpstreamStartTls):
                outcomes.append(await self._upstream_start_tls())
            elif isinstance(action, Close):
                # Only now: the Session may be closed while another reader still waits to
                # carry out the replies that came before its Close.
                self._closed.set()
        for outcome in outcomes:  # no-ops once the Session has closed
            await self._perform(self._handle(outcome))

    def _perform_at_once(self, actions: list[Action] | tuple[Action]) -> int:
        """Carry out the writes and log lines that start ``actions`` (none of them awaits);
        how many that was: the next one is for ``_perform``."""
        for done, action in enumerate(actions):
            if isinstance(action, ToClient):
                if not self._client_lost:
                    self._to_client.push(action.data)
            elif isinstance(action, ToUpstream):
                if self._to_upstream is not None:
                    self._to_upstream.push(action.data)
            elif isinstance(action, Log):
                getattr(self.log, action.level)(action.event, **action.fields)
                metrics.observe(action)
            else:
                return done
        return len(actions)

    async def _start_tls(self, ready: Reply) -> Event:
        """STARTTLS: stop reading in clear, say ``ready`` in clear, then the handshake."""
        self._client_epoch += 1  # whatever the old reader still holds is dropped
        if self._reading is not None:  # the old reader waits in a read: it stops there
            self._reading.cancel()
            await self._reader_done.wait()
        self._to_client.push(ready.serialise())
        if failure := await self._settle_client():
            return failure
        outcome = await self._handshake()
        if isinstance(outcome, str):
            self._client_lost = True
            return TlsFailed(outcome)
        self._start_reading()
        return TlsEstablished(outcome)

    async def _handshake(self) -> TlsInfo | str:
        """TLS as the server on the client's stream, bounded in time: what it is, or why not."""
        assert self._tls is not None
        stream = trio.SSLStream(self.client, self._tls.context, server_side=True)
        with trio.move_on_after(self.config.timeouts.tls_handshake):
            try:
                await stream.do_handshake()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                cause = error.__cause__
                return str(cause) if cause else "the client closed the connection"
            self.client = stream
            self._to_client = Channel(stream, self._settle_soon)
            cipher = stream.cipher()
            return TlsInfo(str(stream.version()), cipher[0] if cipher else "", getattr(stream, "sni", None))
        return "the client did not finish the handshake in time"

    async def _upstream_start_tls(self) -> Event:
        """The upstream said 220 to STARTTLS: TLS as its client, bounded in time.

        Carried out by the upstream's reader (the 220 came through it), which therefore
        reads nothing meanwhile; the epoch moves on, so that reader stops reading the
        clear stream once back, and a new one reads the TLS stream."""
        assert self.upstream is not None and self._upstream_tls is not None
        self._upstream_epoch += 1
        hostname = self.config.upstream.host
        stream = trio.SSLStream(self.upstream, self._upstream_tls, server_hostname=hostname)
        with trio.move_on_after(self.config.timeouts.tls_handshake):
            try:
                await stream.do_handshake()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                cause = error.__cause__
                return UpstreamTlsFailed(str(cause) if cause else "the upstream closed the connection")
            self._use_upstream(stream)
            cipher = stream.cipher()
            return UpstreamTlsEstablished(TlsInfo(str(stream.version()), cipher[0] if cipher else "", None))
        return UpstreamTlsFailed("the upstream did not finish the handshake in time")

    async def _connect(self) -> Event:
        host, port = self.config.upstream
        limit = trio.current_time() + self.config.timeouts.greeting
        with trio.move_on_at(min(self.session.deadline, limit)):
            try:
                stream = await trio.open_tcp_stream(host, port)
                if (version := self.config.upstream_proxy_protocol) != "off":
                    # First on the connection: who the client is, and where it came in.
                    await stream.send_all(proxy_protocol.header(version, self.client_address, self.server_address))
            except (OSError, trio.BrokenResourceError) as error:
                return UpstreamFailed(f"upstream unreachable: {error}")
            self._use_upstream(stream)
            return UpstreamConnected()
        return UpstreamFailed("upstream unreachable: connect timed out")

    def _use_upstream(self, stream: trio.abc.Stream) -> None:
        """From now on the upstream is ``stream``: written through a channel of its own,
        read by a reader of its own."""
        assert self._nursery is not None
        self.upstream = stream
        self._to_upstream = Channel(stream, self._settle_soon)
        self._nursery.start_soon(self._read_upstream, stream, self._upstream_epoch)

    async def _drop_upstream(self) -> None:
        stream, self.upstream = self.upstream, None
        self._to_upstream = None  # what it had not written yet goes with it
        self._upstream_epoch += 1  # (again, when the Session dropped it) its reader says no more
        if stream is not None:
            # Shielded, and bounded: a TLS stream's close_notify waits on the peer.
            with trio.CancelScope(shield=True), trio.move_on_after(LINGER), contextlib.suppress(*_GONE):
                await stream.aclose()

    async def _linger(self) -> None:
        """Half-close toward the client and let it finish reading our last reply."""
        with trio.move_on_after(LINGER):
            try:
                if isinstance(self.client, trio.abc.HalfCloseableStream):
                    await self.client.send_eof()
                while await self.client.receive_some(CHUNK):
                    pass
            except _GONE:
                pass

