"""Writes gathered over a turn of trio's event loop and made together at its end.

Writing to a local peer costs the writer the peer's wake-up too, and waking a process
that sleeps is the dearest part of a small write. One turn of the event loop runs every
task that is ready (under load, many sessions' readers); writes made the moment each
task produces them wake each peer process again and again, between one session's work
and the next's. Gathered, and made together when the turn ends (just before trio asks
epoll what is ready), they find a peer already awake from the first of them.

A ``Channel`` is one connection's outgoing side: its bytes, in order. The shell pushes
to it what the Session says to write; the ``Outbox``, an instrument trio calls before
each wait for I/O, writes every channel pushed to in the turn, as much as each socket
takes at once (never a checkpoint, never blocking). What a socket did not take (a peer
that is not reading) and a write that failed (a peer that is gone) stay in the channel
until the connection settles it, under its lock and with the write's time limit: so a
connection's actions still happen in order, and a peer that stops reading still holds
back the connection that writes to it. The channel's ``unsettled`` callback asks its
connection for that: called in the next turn for a channel the end of a turn left
unsettled, which is rare, and at once on the first push to a stream that is not a plain
socket (TLS), which only settling writes. The readers never pay for asking.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import trio

_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


class Outbox(trio.abc.Instrument):
    """The channels with bytes pushed in this turn, written when it ends."""

    def __init__(self) -> None:
        self._due: list[Channel] = []
        self._token = trio.lowlevel.current_trio_token()

    def add(self, channel: Channel) -> None:
        self._due.append(channel)

    def before_io_wait(self, timeout: float) -> None:
        due, self._due = self._due, []
        unsettled = []
        for channel in due:
            # An error here is a bug, not a peer's doing, and trio would disable an
            # instrument that raises, for the whole process. The bytes stay pushed:
            # settling the channel writes them, or raises the error in its connection,
            # which logs it.
            with contextlib.suppress(Exception):
                channel.write_nowait()
            if not channel.settled:
                unsettled.append(channel)
        if unsettled:
            # Not from here: trio has worked out how long to wait for I/O already, and
            # would wait that long before running the task the callback wakes.
            # run_sync_soon ends the wait at once.
            self._token.run_sync_soon(_ask_to_settle, unsettled)


def _ask_to_settle(channels: list[Channel]) -> None:
    for channel in channels:
        # An exception from a run_sync_soon callback would crash the whole trio run.
        with contextlib.suppress(Exception):
            channel.unsettled()


_OUTBOX: trio.lowlevel.RunVar[Outbox] = trio.lowlevel.RunVar("pipeproxy outbox")


def current() -> Outbox:
    """This trio run's Outbox, installed on first use."""
    try:
        return _OUTBOX.get()
    except LookupError:
        outbox = Outbox()
        trio.lowlevel.add_instrument(outbox)
        _OUTBOX.set(outbox)
        return outbox


class Channel:
    """One stream's outgoing bytes: pushed now, written at the end of the turn or when
    settled, always in the order pushed. After a failed write it writes nothing more.

    Settled only under its connection's lock, and pushed to only by a task that holds it
    or found it free with no schedule point since, so no push comes while a settle's
    ``send_all`` is under way; the outbox writes only between tasks' steps.
    ``unsettled``: called when the channel needs its connection to settle it (above)."""

    def __init__(self, stream: trio.abc.Stream, unsettled: Callable[[], None]) -> None:
        self.stream = stream
        self.unsettled = unsettled
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._outbox = current() if self._socket is not None else None
        self._pending: list[bytes] = []
        self._closed = False  # a write failed: nothing more is written
        self._unreported = False  # a write at the end of a turn failed: settle() says so

    @property
    def settled(self) -> bool:
        """Nothing waits to be written, and no failure waits to be reported."""
        return not self._pending and not self._unreported

    def close(self) -> None:
        """Write nothing more (the peer is gone, or told nothing more)."""
        self._pending.clear()
        self._closed = True
        self._unreported = False

    def push(self, data: bytes) -> None:
        if not data or self._closed:
            return
        if not self._pending:
            if self._outbox is not None:
                self._outbox.add(self)
            else:
                self.unsettled()
        self._pending.append(data)

    def write_nowait(self) -> None:
        """Write what the socket takes at once, with no checkpoint; keep the rest."""
        if not self._pending or self._socket is None:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        try:
            if (fd := self._socket.fileno()) < 0:
                raise ConnectionResetError("the socket was closed")
            sent = os.write(fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:  # EPIPE, ECONNRESET (Python ignores SIGPIPE), or closed here
            self._pending.clear()
            self._closed = self._unreported = True
            return
        self._pending = [data[sent:]] if sent < len(data) else []

    async def settle(self, limit: float) -> bool | None:
        """Write everything pushed, within ``limit`` seconds for what the socket does not
        take at once: None when written (or nothing more can be), True when the time ran
        out, False when the connection is gone; a failure is told once."""
        self.write_nowait()
        if self._unreported:
            self._unreported = False
            return False
        if not self._pending:
            return None
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        with trio.CancelScope(deadline=trio.current_time() + limit):
            try:
                await self.stream.send_all(data)
                return None
            except _GONE:
                self._closed = True
                return False
        self._closed = True  # part of it may have gone: nothing after it can follow
        return True
