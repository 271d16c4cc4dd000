"""Reading pipeproxy's JSON log lines and grouping them into sessions and transactions.

Input is files, plain or gzip (told by their first bytes, not their name), or standard
input; ``follow`` keeps reading one of them as it grows. A line is pipeproxy's when it
is a JSON object with a string ``event``, ``level`` and ``timestamp``; any other line
(plain text, other JSON, a line cut short) is counted, never an error. A prefix before
the JSON (``docker logs -t``, a container runtime's ``stdout F``) is allowed.

The Grouper streams: a transaction is handed on as its line arrives, a session when
its ``session closed`` line does (or at the end of the input, still open). It holds
only the sessions open at the moment, so memory follows open sessions, not the file.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

Line = dict[str, Any]

GZIP_MAGIC = b"\x1f\x8b"
FOLLOW_POLL = 0.2
MAX_EVENTS = 1000  # distinct event names counted  # seconds between looks at a file that has stopped growing


def open_input(name: str) -> io.BufferedIOBase:
    """A file (``-``: standard input) for reading bytes, un-gzipped if it is gzip."""
    source: Any = sys.stdin.buffer if name == "-" else open(name, "rb")  # noqa: SIM115 (closed by the caller)
    raw = source if isinstance(source, io.BufferedReader) else io.BufferedReader(source)
    if raw.peek(2)[:2] == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=raw, mode="rb")
    return raw


def read_lines(names: Iterable[str]) -> Iterator[bytes]:
    """Every line of every input, in order, to its end."""
    for name in names:
        stream = open_input(name)
        try:
            yield from stream
        finally:
            if name != "-":
                stream.close()


def follow_lines(name: str, poll: float = FOLLOW_POLL) -> Iterator[bytes]:
    """The lines of one input as they are written: ``tail -F``, for a file or a pipe.

    A file is read from its start, then watched; if it is truncated or replaced (log
    rotation) it is read again from the start. A pipe ends when its writer closes it.
    A line is handed on only once its newline has arrived.
    """
    stream = open_input(name)
    # A gzip file is read to its end: it is not one that is being written.
    regular = name != "-" and os.path.isfile(name) and not isinstance(stream, gzip.GzipFile)
    pending = b""
    while True:
        chunk = stream.read1(65536)
        if chunk:
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line + b"\n"
            continue
        if not regular:
            break
        time.sleep(poll)
        try:
            now = os.stat(name)
        except FileNotFoundError:
            continue  # rotated away; the new file may not be there yet
        before = os.fstat(stream.fileno())
        if now.st_ino != before.st_ino or now.st_size < stream.tell():
            stream.close()
            stream = open_input(name)
            pending = b""
    if pending:
        yield pending


_decode = json.JSONDecoder().raw_decode  # json.loads without its per-call detours


def parse_line(raw: bytes) -> Line | None:
    """The log line's fields, or None if it is not one of pipeproxy's JSON lines."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return None
    start = text.find("{")
    if start < 0:
        return None
    try:
        line, end = _decode(text, start)
    except (ValueError, RecursionError):
        return None
    if (
        type(line) is not dict
        or text[end:].strip()
        or type(line.get("event")) is not str
        or type(line.get("timestamp")) is not str
        or type(line.get("level")) is not str
    ):
        return None
    return line


@dataclass
class Session:
    """What the log says of one session, so far."""

    id: str
    first: Line  # its first line seen (``session open`` unless the log starts later)
    closed: Line | None = None
    helo: str | None = None
    transactions: int = 0
    lines: list[Line] | None = None  # every line, only for the sessions asked for
    tls: Any = None
    matched: int = 0  # transactions the filter picked (the outputs count them)

    @property
    def opened(self) -> str:
        return str(self.first["timestamp"])

    @property
    def client(self) -> str | None:
        return self.first.get("client")

    @property
    def server(self) -> str | None:
        return self.first.get("server")


@dataclass
class Counts:
    lines: int = 0
    skipped: int = 0
    first_skipped: int | None = None  # its line number, from 1, over all the input
    events: dict[str, int] = field(default_factory=dict)  # pipeproxy's lines, by event


class Grouper:
    """Feeds on lines; calls ``on_transaction(line, session)`` and ``on_session(session)``.

    ``keep``: whether to keep every line of a session (``--session``), by its id.
    """

    def __init__(
        self,
        on_transaction: Callable[[Line, Session], None] | None = None,
        on_session: Callable[[Session], None] | None = None,
        keep: Callable[[str], bool] | None = None,
    ) -> None:
        self.open: dict[str, Session] = {}
        self.counts = Counts()
        self.on_transaction = on_transaction
        self.on_session = on_session
        self.keep = keep

    def feed_all(self, lines: Iterable[bytes]) -> None:
        for raw in lines:
            self.feed(raw)

    def feed(self, raw: bytes) -> None:
        counts = self.counts
        counts.lines += 1
        line = parse_line(raw)
        if line is None:
            if raw.strip():
                counts.skipped += 1
                if counts.first_skipped is None:
                    counts.first_skipped = counts.lines
            return
        session_id = line.get("session")
        event = line["event"]
        events = counts.events
        if event in events:
            events[event] += 1
        elif len(events) < MAX_EVENTS:  # other programs' lines could name any number
            events[event] = 1
        if type(session_id) is not str:
            return
        session = self.open.get(session_id)
        if session is None:
            session = self.open[session_id] = Session(session_id, line)
            if self.keep is not None and self.keep(session_id):
                session.lines = []
        if session.lines is not None:
            session.lines.append(line)
        if event == "transaction":
            session.transactions += 1
            if line.get("helo") is None and session.helo is not None:
                line["helo"] = session.helo
            elif line.get("helo") is not None:
                session.helo = line["helo"]
            if line.get("tls") is None and session.tls is not None:
                line["tls"] = session.tls
            if self.on_transaction is not None:
                self.on_transaction(line, session)
        elif event == "transcript":
            command = line.get("line")
            if line.get("direction") == "client" and isinstance(command, str):
                verb, _, argument = command.partition(" ")
                if verb.upper() in ("EHLO", "HELO") and argument:
                    session.helo = argument.strip()
        elif event == "session closed":
            session.closed = line
            del self.open[session_id]
            if self.on_session is not None:
                self.on_session(session)
        elif line.get("tls") and session.tls is None:
            session.tls = line["tls"]

    def finish(self) -> None:
        """The end of the input: the sessions still open are handed on as they stand."""
        sessions, self.open = list(self.open.values()), {}
        if self.on_session is not None:
            for session in sessions:
                self.on_session(session)
