"""What the Session (the protocol core, no I/O) costs a lock-step message, by event.

One Session in steady state, fed the events a lock-step client and a legacy MTA make for
a message of 5 recipients (MAIL, 5 RCPT, DATA, about 1.9 kB of content and its end, each
answered), the way the shell feeds it; prints microseconds a message for each kind of
event, and the total. Nothing is written anywhere: the actions are built and dropped.

    .venv/bin/python benchmarks/session_events.py [--messages N]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

# The checkout's pipeproxy, not whichever the interpreter has installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeproxy.core.config import Address, Config
from pipeproxy.core.events import ClientConnected, ClientData, Event, UpstreamConnected, UpstreamData
from pipeproxy.core.session import Session

CONTENT = (
    b"From: bench@client.test\r\nSubject: bench\r\nMessage-ID: <1@client.test>\r\n\r\n"
    + b"A line of a benchmark message body.\r\n" * 50
    + b".\r\n"
)
MESSAGE: list[tuple[str, Event]] = [
    ("MAIL", ClientData(b"MAIL FROM:<bench@client.test>\r\n")),
    ("reply to MAIL", UpstreamData(b"250 2.1.0 Ok\r\n")),
    *[
        event
        for number in range(5)
        for event in (
            ("RCPT", ClientData(b"RCPT TO:<r%d@legacy.test>\r\n" % number)),
            ("reply to RCPT", UpstreamData(b"250 2.1.5 Ok\r\n")),
        )
    ],
    ("DATA", ClientData(b"DATA\r\n")),
    ("354", UpstreamData(b"354 End data with <CR><LF>.<CR><LF>\r\n")),
    ("content and its end", ClientData(CONTENT)),
    ("reply to the end", UpstreamData(b"250 2.0.0 Ok: queued as 4ABC123\r\n")),
]


def greeted_session() -> Session:
    """A session past its greeting and HELO (probed with EHLO, as smtp-source's is)."""
    session = Session(Config(upstream=Address("127.0.0.1", 25)), clock=time.monotonic)
    for event in (
        ClientConnected(Address("127.0.0.1", 50000), Address("127.0.0.1", 2525), "bench", None),
        UpstreamConnected(),
        UpstreamData(b"220 legacy.test ESMTP\r\n"),
        ClientData(b"HELO client.test\r\n"),
        UpstreamData(b"250-legacy.test\r\n250 8BITMIME\r\n"),
        UpstreamData(b"250 legacy.test\r\n"),
    ):
        session.handle(event)
    return session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    args = parser.parse_args()
    session = greeted_session()
    clock = time.perf_counter_ns
    spent: collections.Counter[str] = collections.Counter()
    for _ in range(2):  # the first round warms up; the second is printed
        spent.clear()
        for _ in range(args.messages):
            for name, event in MESSAGE:
                started = clock()
                session.handle(event)
                spent[name] += clock() - started
    for name, nanoseconds in spent.items():
        print(f"{name:<22}{nanoseconds / args.messages / 1000:8.1f} µs a message")
    print(f"{'total':<22}{sum(spent.values()) / args.messages / 1000:8.1f} µs a message ({len(MESSAGE)} events)")


if __name__ == "__main__":
    main()
