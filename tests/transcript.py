"""Transcripts: drive a Session with events, check what it does in one ordered timeline.

A transcript is a list of steps, in the order things happen (mitmproxy's Playbook):

* inputs: ``C`` and ``U`` feed bytes from the client and from the upstream;
  ``UPSTREAM_TLS_UP`` and ``UPSTREAM_TLS_FAILED`` (with a reason) end the upstream TLS
  handshake an ``UpstreamStartTls`` asked for;
  ``CLIENT_EOF``, ``UPSTREAM_EOF``, ``TIMEOUT`` (the clock jumps to the session's
  deadline, then a ``Tick``), ``DRAIN``, ``SHUTDOWN``, ``CLIENT_WRITE_FAILED`` and
  ``UPSTREAM_FAILED`` feed those events;
* checks: ``TO_CLIENT`` and ``TO_UPSTREAM`` check the bytes sent that way; ``LOG`` checks a
  log line by event name and (some of) its fields; ``RECONNECTED`` checks a new upstream
  connection opened here, after the old one was dropped; ``CLOSED`` checks that the session ended.

Played whole, the checks must match the session's actions in order, across both
directions, with log lines in their place (logs not named are not checked). ``play`` can
also cut every fed piece of bytes into smaller pieces; then the checks take the next bytes
of each direction (the same for any cut; an empty check means none were sent) and the log
lines in order, while
``Run.client_writes`` keeps the write boundaries for tests about batching. Every session
starts with a client connecting and the upstream connection opening at once. Every log
line must match its entry in the log schema.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeproxy.core.actions import (
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
from pipeproxy.core.config import Address, Config
from pipeproxy.core.events import (
    ClientClosed,
    ClientConnected,
    ClientData,
    ClientWriteFailed,
    Drain,
    Event,
    ShutDown,
    Tick,
    TlsEstablished,
    TlsInfo,
    UpstreamClosed,
    UpstreamConnected,
    UpstreamData,
    UpstreamFailed,
    UpstreamTlsEstablished,
    UpstreamTlsFailed,
)
from pipeproxy.core.logschema import EVENTS
from pipeproxy.core.session import Session

C, U = "client sends", "upstream sends"
TO_CLIENT, TO_UPSTREAM = "proxy sent client", "proxy sent upstream"
CLIENT_EOF, UPSTREAM_EOF, TIMEOUT, CLOSED = "client eof", "upstream eof", "timeout", "closed"
DRAIN, SHUTDOWN = "drain", "shut down"
CLIENT_WRITE_FAILED, UPSTREAM_FAILED = "client write failed", "upstream failed"
LOG, RECONNECTED = "log", "reconnected"
TLS_UP = "tls established"  # the handshake a StartTls asked for succeeded
TLS = TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", "mx.legacy.test")
# TLS with the upstream: the handshake an UpstreamStartTls asked for succeeded, or failed.
UPSTREAM_TLS_UP, UPSTREAM_TLS_FAILED = "upstream tls established", "upstream tls failed"
UPSTREAM_TLS = TlsInfo("TLSv1.2", "ECDHE-RSA-AES256-GCM-SHA384", None)
CLIENT = Address("127.0.0.1", 40000)
SERVER = Address("127.0.0.1", 2525)  # where the client connected
SESSION = "5e55104"

Step = tuple[Any, ...]
Cutter = Callable[[bytes], list[bytes]]
_SIMPLE_EVENTS: dict[str, Callable[[], Event]] = {
    CLIENT_EOF: ClientClosed,
    UPSTREAM_EOF: UpstreamClosed,
    DRAIN: Drain,
    SHUTDOWN: ShutDown,
    CLIENT_WRITE_FAILED: lambda: ClientWriteFailed("client connection lost"),
    UPSTREAM_FAILED: lambda: UpstreamFailed("upstream connection reset"),
}
_DATA = ("client", "upstream", "close")  # timeline entries checked in order, the rest found


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Run:
    session: Session
    clock: FakeClock
    connect_fails: bool = False
    client_writes: list[bytes] = field(default_factory=list)
    upstream_writes: list[bytes] = field(default_factory=list)
    logs: list[Log] = field(default_factory=list)
    closed: Close | None = None
    timeline: list[tuple[str, Any]] = field(default_factory=list)
    _cursor: int = 0  # timeline entries before it are checked (strict mode)
    _found: set[int] = field(default_factory=set)  # log/reconnect entries checked
    _client_seen: int = 0
    _upstream_seen: int = 0
    _logs_seen: int = 0

    def feed(self, event: Event) -> None:
        self.apply(self.session.handle(event))

    def apply(self, actions: list[Action]) -> None:
        connects = 0
        for action in actions:
            assert self.closed is None, f"action {action!r} after close"
            if isinstance(action, ToClient):
                assert action.replies, "empty write to the client"
                self.client_writes.append(action.data)
                self.timeline.append(("client", action.data))
            elif isinstance(action, ToUpstream):
                assert action.data, "empty write to the upstream"
                self.upstream_writes.append(action.data)
                self.timeline.append(("upstream", action.data))
            elif isinstance(action, Log):
                assert action.event in EVENTS, f"log event {action.event!r} is not in the log schema"
                EVENTS[action.event].check(action.fields)
                self.logs.append(action)
                self.timeline.append(("log", action))
            elif isinstance(action, ConnectUpstream):
                connects += 1
                self.timeline.append(("connect", None))
            elif isinstance(action, DropUpstream):
                self.timeline.append(("drop", None))
            elif isinstance(action, UpstreamStartTls):
                self.timeline.append(("upstream starttls", None))
            elif isinstance(action, StartTls):  # the shell says its 220, then starts TLS
                self.client_writes.append(action.ready.serialise())
                self.timeline.append(("client", action.ready.serialise()))
                self.timeline.append(("starttls", None))
            else:
                assert isinstance(action, Close)
                self.closed = action
                self.timeline.append(("close", action))
        for _ in range(connects):
            self.feed(UpstreamFailed("connection refused") if self.connect_fails else UpstreamConnected())

    def events(self, name: str) -> list[dict[str, Any]]:
        return [log.fields for log in self.logs if log.event == name]

    # -- checks, per direction (any cut) ----------------------------------------------

    def new_client_bytes(self) -> bytes:
        data = b"".join(self.client_writes)
        new, self._client_seen = data[self._client_seen :], len(data)
        return new

    def new_upstream_bytes(self) -> bytes:
        data = b"".join(self.upstream_writes)
        new, self._upstream_seen = data[self._upstream_seen :], len(data)
        return new

    def take_client_bytes(self, expected: bytes) -> None:
        """The next unchecked client bytes are ``expected``; none at all if it is empty."""
        data = b"".join(self.client_writes)[self._client_seen :]
        assert data[: len(expected) or None] == expected
        self._client_seen += len(expected)

    def take_upstream_bytes(self, expected: bytes) -> None:
        data = b"".join(self.upstream_writes)[self._upstream_seen :]
        assert data[: len(expected) or None] == expected
        self._upstream_seen += len(expected)

    def find_log(self, name: str, fields: dict[str, Any]) -> None:
        for index in range(self._logs_seen, len(self.logs)):
            log = self.logs[index]
            if log.event == name and fields.items() <= log.fields.items():
                self._logs_seen = index + 1
                return
        raise AssertionError(f"no log {name!r} with {fields} after the last one checked: {self.logs[self._logs_seen:]}")

    # -- checks, in one timeline (whole feeds) -----------------------------------------

    def expect_data(self, kind: str, data: bytes) -> None:
        if not data:
            pending = [entry for entry in self.timeline[self._cursor :] if entry[0] == kind]
            assert not pending, f"unexpected {kind} bytes: {pending}"
            return
        got = b""
        while len(got) < len(data):
            index = self._next_data()
            assert index is not None, f"expected {kind} bytes {data!r}, got only {got!r}"
            entry_kind, payload = self.timeline[index]
            wanted = data[len(got) :]
            assert entry_kind == kind, f"expected {kind} bytes {wanted!r} next; the {entry_kind} got {payload!r}"
            got += payload
            self._cursor = index + 1
        assert got == data

    def expect_closed(self) -> None:
        index = self._next_data()
        assert index is not None and self.timeline[index][0] == "close", "session still open, or more came first"
        self._cursor = index + 1

    def expect_inline(self, kind: str, match: Callable[[Any], bool], what: str) -> None:
        """An entry that is not data: found before the next data entry, after the last."""
        for index in range(self._cursor, len(self.timeline)):
            entry_kind, payload = self.timeline[index]
            if entry_kind in _DATA:
                break
            if entry_kind == kind and index not in self._found and match(payload):
                self._found.add(index)
                return
        raise AssertionError(f"{what} not found here in the timeline: {self.timeline[self._cursor:]}")

    def _next_data(self) -> int | None:
        for index in range(self._cursor, len(self.timeline)):
            if self.timeline[index][0] in _DATA:
                return index
        return None


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def start(config: Config | None = None, connect_fails: bool = False) -> Run:
    """A session whose client has just connected (and whose upstream connection opened)."""
    clock = FakeClock()
    run = Run(Session(config or Config(), clock), clock, connect_fails)
    run.feed(ClientConnected(CLIENT, SERVER, SESSION))
    return run


def play(steps: Sequence[Step], config: Config | None = None, cut: Cutter = whole, connect_fails: bool = False) -> Run:
    run = start(config, connect_fails)
    strict = cut is whole
    for step in steps:
        kind = step[0]
        if kind == C:
            for piece in cut(step[1]):
                run.feed(ClientData(piece))
        elif kind == U:
            for piece in cut(step[1]):
                run.feed(UpstreamData(piece))
        elif kind in _SIMPLE_EVENTS:
            run.feed(_SIMPLE_EVENTS[kind]())
        elif kind == TLS_UP:
            assert "starttls" in [entry[0] for entry in run.timeline], "TLS up, but nobody asked"
            run.feed(TlsEstablished(TLS))
        elif kind in (UPSTREAM_TLS_UP, UPSTREAM_TLS_FAILED):
            assert "upstream starttls" in [entry[0] for entry in run.timeline], "upstream TLS, but nobody asked"
            if kind == UPSTREAM_TLS_UP:
                run.feed(UpstreamTlsEstablished(UPSTREAM_TLS))
            else:
                run.feed(UpstreamTlsFailed(step[1] if len(step) > 1 else "certificate verify failed"))
        elif kind == TIMEOUT:
            run.clock.now = run.session.deadline
            run.feed(Tick())
        elif kind == TO_CLIENT:
            run.take_client_bytes(step[1])
            if strict:
                run.expect_data("client", step[1])
        elif kind == TO_UPSTREAM:
            run.take_upstream_bytes(step[1])
            if strict:
                run.expect_data("upstream", step[1])
        elif kind == LOG:
            name, fields = step[1], step[2] if len(step) > 2 else {}
            run.find_log(name, fields)
            if strict:
                run.expect_inline("log", _log_matcher(name, fields), f"log {name!r}")
        elif kind == RECONNECTED:
            kinds = [entry[0] for entry in run.timeline]
            assert "drop" in kinds and "connect" in kinds[kinds.index("drop") :], "no reconnection"
            if strict:  # the drop may come earlier (as soon as a message is refused)
                run.expect_inline("connect", lambda _: True, "a new upstream connection")
        elif kind == CLOSED:
            assert run.closed is not None, "session still open"
            if strict:
                run.expect_closed()
        else:
            raise ValueError(kind)
    # Whatever a transcript does not check must not have been sent.
    assert run.new_client_bytes() == b"", "unchecked bytes to the client"
    assert run.new_upstream_bytes() == b"", "unchecked bytes to the upstream"
    return run


def _log_matcher(name: str, fields: dict[str, Any]) -> Callable[[Log], bool]:
    return lambda log: log.event == name and fields.items() <= log.fields.items()


def splits(steps: Sequence[Step]) -> Iterator[tuple[int, int]]:
    """(step index, offset) for every place a fed piece of bytes can be cut in two."""
    for index, step in enumerate(steps):
        if step[0] in (C, U):
            for offset in range(1, len(step[1])):
                yield index, offset


def play_split(steps: Sequence[Step], index: int, offset: int, config: Config | None = None) -> Run:
    """``play`` with the bytes of step ``index`` fed in two pieces, cut at ``offset``."""
    kind, data = steps[index]
    cut_steps = [*steps[:index], (kind, data[:offset]), (kind, data[offset:]), *steps[index + 1 :]]
    return play(cut_steps, config, cut=_already_cut)


def _already_cut(data: bytes) -> list[bytes]:
    return [data]


def play_every_way(steps: Sequence[Step], config: Config | None = None) -> Run:
    """Play whole, byte by byte, and cut at every offset; return the whole run."""
    run = play(steps, config)
    play(steps, config, cut=bytewise)
    for index, offset in splits(steps):
        play_split(steps, index, offset, config)
    return run
