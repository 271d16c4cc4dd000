"""Transcripts: drive a Session with bytes, check the exact bytes it sends, no sockets.

A transcript is a list of steps. ``C`` and ``U`` feed bytes from the client and from the
upstream; ``TO_CLIENT`` and ``TO_UPSTREAM`` check everything the session sent that way
since the last check; ``CLIENT_EOF``, ``UPSTREAM_EOF`` and ``TIMEOUT`` feed those events;
``CLOSED`` checks that the session ended. ``play`` can cut every fed piece of bytes into
smaller pieces: the checks compare concatenated bytes, so they hold for any cut, while
``Run.client_writes`` keeps the write boundaries for tests about batching.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from pipeproxy.core.config import Config
from pipeproxy.core.session import Action, Close, Log, Session, ToClient, ToUpstream

C, U = "client sends", "upstream sends"
TO_CLIENT, TO_UPSTREAM = "proxy sent client", "proxy sent upstream"
CLIENT_EOF, UPSTREAM_EOF, TIMEOUT, CLOSED = "client eof", "upstream eof", "timeout", "closed"

Step = tuple[str, bytes] | tuple[str]
Cutter = Callable[[bytes], list[bytes]]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Run:
    session: Session
    clock: FakeClock
    client_writes: list[bytes] = field(default_factory=list)
    upstream_writes: list[bytes] = field(default_factory=list)
    logs: list[Log] = field(default_factory=list)
    closed: Close | None = None
    _client_seen: int = 0
    _upstream_seen: int = 0

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            assert self.closed is None, f"action {action!r} after close"
            if isinstance(action, ToClient):
                assert action.data, "empty write to the client"
                self.client_writes.append(action.data)
            elif isinstance(action, ToUpstream):
                assert action.data, "empty write to the upstream"
                self.upstream_writes.append(action.data)
            elif isinstance(action, Log):
                self.logs.append(action)
            else:
                self.closed = action

    def new_client_bytes(self) -> bytes:
        data = b"".join(self.client_writes)
        new, self._client_seen = data[self._client_seen :], len(data)
        return new

    def new_upstream_bytes(self) -> bytes:
        data = b"".join(self.upstream_writes)
        new, self._upstream_seen = data[self._upstream_seen :], len(data)
        return new

    def events(self, name: str) -> list[dict]:
        return [log.fields for log in self.logs if log.event == name]


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def play(steps: Sequence[Step], config: Config | None = None, cut: Cutter = whole) -> Run:
    clock = FakeClock()
    run = Run(Session(config or Config(), clock), clock)
    for step in steps:
        kind = step[0]
        if kind == C:
            for piece in cut(step[1]):
                run.apply(run.session.client_data(piece))
        elif kind == U:
            for piece in cut(step[1]):
                run.apply(run.session.upstream_data(piece))
        elif kind == TO_CLIENT:
            assert run.new_client_bytes() == step[1]
        elif kind == TO_UPSTREAM:
            assert run.new_upstream_bytes() == step[1]
        elif kind == CLIENT_EOF:
            run.apply(run.session.client_closed())
        elif kind == UPSTREAM_EOF:
            run.apply(run.session.upstream_closed())
        elif kind == TIMEOUT:
            clock.now = run.session.deadline
            run.apply(run.session.timed_out())
        elif kind == CLOSED:
            assert run.closed is not None, "session still open"
        else:
            raise ValueError(kind)
    # Whatever a transcript does not check must not have been sent.
    assert run.new_client_bytes() == b"", "unchecked bytes to the client"
    assert run.new_upstream_bytes() == b"", "unchecked bytes to the upstream"
    return run


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
    return play(cut_steps, config)


def play_every_way(steps: Sequence[Step], config: Config | None = None) -> Run:
    """Play whole, byte by byte, and cut at every offset; return the whole run."""
    run = play(steps, config)
    play(steps, config, cut=bytewise)
    for index, offset in splits(steps):
        play_split(steps, index, offset, config)
    return run
