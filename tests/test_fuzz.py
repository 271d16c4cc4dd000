"""Property tests of the whole protocol core: any client bytes, any upstream replies, any cuts.

hypothesis drives a Session with client input built from the tokens that matter to SMTP
framing, and a model upstream that answers each complete command with a code drawn at
random. Whatever happens, these hold:

* nothing but the session's own handling of protocol errors happens (no exception);
* the upstream never receives a byte before the greeting or while one of its replies is
  outstanding, and after a 354 nothing past the message's terminator;
* the client only ever receives well-formed replies, the upstream's in the order it gave
  them, and never a success (2xx or 3xx) that the upstream did not give.

CI runs 1,000 examples per configuration; ``HYPOTHESIS_PROFILE=long`` runs 20,000.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transcript import FakeClock

from pipeproxy.core.config import BareLineEndings, Config
from pipeproxy.core.session import Close, Log, Session, ToClient, ToUpstream
from pipeproxy.core.wire import ReplyReader

TOKENS = [
    b"EHLO c\r\n", b"HELO c\r\n", b"MAIL FROM:<a@b>\r\n", b"MAIL FROM:<a@b> SIZE=99999\r\n", b"RCPT TO:<c@d>\r\n",
    b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nRCPT TO:<g@h>\r\nDATA\r\n",
    b"DATA\r\n", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"AUTH PLAIN\r\n", b"dGVzdA==\r\n", b"STARTTLS\r\n",
    b"BDAT 5 LAST\r\n", b"body line\r\n", b".\r\n", b"\r\n.\r\n", b"..\r\n", b"\n.\n", b"\r.\r", b"\r", b"\n",
    b"\x00", b".", b"x" * 700, b"VRFY x\r\n",
]
CODES = [250, 250, 250, 251, 354, 334, 221, 421, 450, 500, 502, 550, 554]
CONFIGS = [
    Config(),
    Config(bare_line_endings=BareLineEndings.REJECT, max_recipients=2, max_message_size=64, max_line_length=64),
    Config(max_pipeline_bytes=32, max_reply_size=128),
]
SEQ = re.compile(r"seq=(\d+)")


class ModelUpstream:
    """An upstream that records every protocol violation pipeproxy commits against it."""

    def __init__(self) -> None:
        self.greeted = False
        self.buffer = b""
        self.in_body = False
        self.awaiting_reply = False  # a complete command or message is waiting for its reply
        self.last_verb = ""
        self.violations: list[str] = []

    def receive(self, data: bytes) -> None:
        if not self.greeted:
            self.violations.append(f"{data!r} before the greeting")
        elif self.awaiting_reply:
            self.violations.append(f"{data!r} while a reply was outstanding")
        self.buffer += data
        if self.in_body:
            # The buffer holds the whole message so far: ".\r\n" first is an empty one.
            if self.buffer.startswith(b".\r\n"):
                self._complete(3, "end of data")
            elif (end := self.buffer.find(b"\r\n.\r\n")) >= 0:
                self._complete(end + 5, "end of data")
        elif (end := self.buffer.find(b"\r\n")) >= 0:
            self._complete(end + 2, self.buffer.split(b" ", 1)[0].split(b"\r")[0].upper().decode("latin-1"))

    def _complete(self, end: int, verb: str) -> None:
        if self.buffer[end:]:
            self.violations.append(f"{self.buffer[end:]!r} sent after {verb} before its reply")
        self.buffer = b""
        self.in_body = False
        self.awaiting_reply = True
        self.last_verb = verb

    def replied(self, code: int) -> None:
        self.awaiting_reply = False
        self.in_body = code == 354 and self.last_verb == "DATA"


@pytest.mark.parametrize("config", CONFIGS, ids=["defaults", "strict-limits", "tiny-buffers"])
@settings(max_examples=max(settings.default.max_examples, 1000))
@given(data=st.data())
def test_any_conversation_keeps_the_proxys_promises(data, config):
    clock = FakeClock()
    session = Session(config, clock)
    upstream = ModelUpstream()
    client_bytes = bytearray()
    upstream_seqs: list[int] = []  # seq numbers of the replies the client must see
    closed = False
    client_gone = False
    seq = 0

    def apply(actions) -> None:
        nonlocal closed
        for action in actions:
            assert not closed, f"{action!r} after Close"
            if isinstance(action, ToUpstream):
                upstream.receive(action.data)
            elif isinstance(action, ToClient):
                client_bytes.extend(action.data)
            elif isinstance(action, Close):
                closed = True
            else:
                assert isinstance(action, Log)

    def feed_in_pieces(feed, payload: bytes) -> None:
        points = sorted(set(data.draw(st.lists(st.integers(0, len(payload)), max_size=3))))
        for a, b in zip([0, *points], [*points, len(payload)], strict=True):
            if payload[a:b] and not closed:
                apply(feed(payload[a:b]))

    for _ in range(data.draw(st.integers(1, 40))):
        if closed:
            break
        move = data.draw(
            st.sampled_from(["client"] * 4 + ["upstream"] * 4 + ["client_eof", "upstream_eof", "timeout", "drain", "shut_down"])
        )
        if move == "client" and not client_gone:
            payload = b"".join(data.draw(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=8)))
            feed_in_pieces(session.client_data, payload)
        elif move == "upstream" and (upstream.awaiting_reply or not upstream.greeted):
            code = data.draw(st.sampled_from([220, 220, 421, 554])) if not upstream.greeted else data.draw(st.sampled_from(CODES))
            seq += 1
            lines = data.draw(st.integers(1, 3))
            # The seq goes on the first line: the one an EHLO reply keeps whatever else changes.
            reply = b"%d%sseq=%d\r\n" % (code, b"-" if lines > 1 else b" ", seq)
            reply += b"".join(b"%d%sline\r\n" % (code, b"-" if i < lines - 2 else b" ") for i in range(lines - 1))
            swallowed = upstream.greeted and upstream.last_verb == "EHLO" and code in (500, 502)
            if not swallowed:
                upstream_seqs.append(seq)
            upstream.greeted = True
            upstream.replied(code)
            feed_in_pieces(session.upstream_data, reply)
        elif move == "client_eof" and not client_gone:
            client_gone = True
            apply(session.client_closed())
        elif move == "upstream_eof":
            apply(session.upstream_closed())
        elif move == "drain":
            apply(session.drain())
        elif move == "shut_down":
            apply(session.shut_down())
        elif move == "timeout" and session.deadline != float("inf"):
            clock.now = max(clock.now, session.deadline)
            apply(session.timed_out())

    assert upstream.violations == []
    reader = ReplyReader(max_size=1 << 20)
    reader.feed(bytes(client_bytes))
    seen: list[int] = []
    while (reply := reader.next_reply()) is not None:
        found = SEQ.search(" ".join(reply.lines))
        if found:
            seen.append(int(found[1]))
        else:
            assert reply.code >= 400, f"a success the upstream never gave: {reply}"
    assert not reader.pending(), f"half a reply sent to the client: {bytes(client_bytes)!r}"
    assert seen == sorted(seen) and len(set(seen)) == len(seen), "replies out of order or repeated"
    assert set(seen) <= set(upstream_seqs)
    if closed:
        assert seen == upstream_seqs, "an upstream reply never reached the client"
