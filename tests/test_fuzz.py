"""Property tests of the whole protocol core: any client bytes, any upstream replies, any cuts.

hypothesis drives a Session with client input built from the tokens that matter to SMTP
framing (non-UTF-8 octets included), and a model upstream that answers each complete
command with a code drawn at random. Which of its replies the client must see comes from
the session's own table of exchanges (``transition``), so the model knows the protocol
(which exchange a command is) but not the session's decisions. Whatever happens, these hold:

* nothing but the session's own handling of protocol errors happens (no exception, and
  no "internal error" line: the session turns a bug into a 421, which would hide it);
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

from pipeproxy.core import session as core
from pipeproxy.core.actions import Close, ConnectUpstream, DropUpstream, Log, ToClient, ToUpstream
from pipeproxy.core.config import BareLineEndings, Config
from pipeproxy.core.events import (
    ClientClosed,
    ClientConnected,
    ClientData,
    Drain,
    ShutDown,
    Tick,
    UpstreamClosed,
    UpstreamConnected,
    UpstreamData,
)
from pipeproxy.core.session import NOT_RELAYED, Session, transition
from pipeproxy.core.wire import ReplyReader

from transcript import CLIENT, FakeClock

TOKENS = [
    b"EHLO c\r\n", b"HELO c\r\n", b"MAIL FROM:<a@b>\r\n", b"MAIL FROM:<a@b> SIZE=99999\r\n", b"RCPT TO:<c@d>\r\n",
    b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nRCPT TO:<g@h>\r\nDATA\r\n",
    b"DATA\r\n", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"AUTH PLAIN\r\n", b"dGVzdA==\r\n", b"STARTTLS\r\n",
    b"BDAT 5 LAST\r\n", b"body line\r\n", b".\r\n", b"\r\n.\r\n", b"..\r\n", b"\n.\n", b"\r.\r", b"\r", b"\n",
    b"\x00", b".", b"x" * 700, b"VRFY x\r\n", b"AUTH PLAIN dGVzdA==\r\n", b"*\r\n",
    # Not UTF-8: client names and addresses are octets, and must never crash the session.
    b"EHLO caf\xe9.test\r\n", b"HELO \xff\xfe\r\n", b"MAIL FROM:<\xe9@x> SIZE=\xd9\xa3\r\n", b"\xc3\r\n", b"\x80",
]
GREETINGS = [220, 220, 421, 554]
EVENTS = ["drain", "shut_down"]
CODES = [250, 250, 250, 251, 354, 334, 220, 221, 421, 450, 500, 502, 550, 554]
# What the lines after a reply's first say: EHLO replies may offer XCLIENT or XFORWARD.
CONTINUATIONS = [b"line", b"line", b"XCLIENT ADDR NAME HELO PROTO", b"XFORWARD ADDR HELO"]
CONFIGS = [
    Config(),
    Config(bare_line_endings=BareLineEndings.REJECT, max_recipients=2, max_message_size=64, max_line_length=64),
    Config(max_pipeline_bytes=32, max_reply_size=128),
    Config(xclient="off", xforward="off", early_talkers="reject", discard_ehlo_keywords=frozenset({"AUTH", "VRFY"})),
]
SEQ = re.compile(r"seq=(\d+)")


class ModelUpstream:
    """One upstream connection that records every protocol violation pipeproxy commits
    against it, and knows which exchange each command it received is."""

    def __init__(self, replay: bool, violations: list[str]) -> None:
        self.replay = replay  # pipeproxy reconnected: it greets this one on its own
        self.replaying = replay  # until pipeproxy's first line that is not EHLO/HELO/XCLIENT
        self.greeted = False
        self.buffer = b""
        self.in_body = False
        self.awaiting_reply = False  # a complete command or message is waiting for its reply
        self.exchange = core.REPLAY_GREETING if replay else core.GREETING
        self.violations = violations

    def receive(self, data: bytes) -> None:
        if not self.greeted:
            self.violations.append(f"{data!r} before the greeting")
        elif self.awaiting_reply:
            self.violations.append(f"{data!r} while a reply was outstanding")
        self.buffer += data
        if self.in_body:
            # The buffer holds the whole message so far: ".\r\n" first is an empty one.
            if self.buffer.startswith(b".\r\n"):
                self._complete(3, core.END_OF_DATA)
            elif (end := self.buffer.find(b"\r\n.\r\n")) >= 0:
                self._complete(end + 5, core.END_OF_DATA)
        elif (end := self.buffer.find(b"\r\n")) >= 0:
            self._complete(end + 2, self._classify(self.buffer.split(b" ", 1)[0].split(b"\r")[0].upper()))

    def _classify(self, verb: bytes) -> core.Exchange:
        """Which exchange a command line is, from what was said before it on this connection."""
        previous, code = self.exchange, self.last_code
        if previous in (core.AUTH, core.SASL) and code == 334:
            return core.SASL
        # Only pipeproxy sends these: a client's own are refused.
        if verb == b"XCLIENT":
            return core.REPLAY_XCLIENT if self.replaying else core.XCLIENT
        if verb == b"XFORWARD":
            return core.XFORWARD
        if self.replaying and verb in (b"EHLO", b"HELO"):
            return core.REPLAY_EHLO if verb == b"EHLO" else core.REPLAY_HELO
        self.replaying = False
        if previous is core.EHLO and code in (500, 502) and verb == b"HELO":
            return core.HELO_FALLBACK
        return core.VERBS.get(verb.decode("latin-1"), core.OTHER)

    def _complete(self, end: int, exchange: core.Exchange) -> None:
        if self.buffer[end:]:
            self.violations.append(f"{self.buffer[end:]!r} sent after {exchange.name} before its reply")
        self.buffer = b""
        self.in_body = False
        self.awaiting_reply = True
        self.exchange = exchange

    last_code = 0

    def replied(self, code: int) -> bool | None:
        """Take a reply; whether the client is to see it, by the session's table; None
        for an EHLO reply, which the client sees unless pipeproxy at once follows it with
        its own HELO (the EHLO was its own, asking whether XCLIENT is offered, or the HELO
        fallback) or an XCLIENT (then the EHLO after it is the one the client sees). On the
        wire pipeproxy's HELO looks like a client's pipelined one, so then either is right."""
        self.awaiting_reply = False
        self.last_code = code
        self.in_body = code == 354 and self.exchange is core.DATA
        if self.exchange is core.EHLO:
            return None
        return transition(self.exchange, code)[0] is not NOT_RELAYED

    def followed_by_helo_or_xclient(self) -> bool:
        return self.awaiting_reply and self.exchange in (core.HELO, core.HELO_FALLBACK, core.XCLIENT)

    def followed_by_xclient(self) -> bool:
        return self.awaiting_reply and self.exchange is core.XCLIENT


@pytest.mark.parametrize("config", CONFIGS, ids=["defaults", "strict-limits", "tiny-buffers", "closed-door"])
@settings(max_examples=max(settings().max_examples, 1000))
@given(data=st.data())
def test_any_conversation_keeps_the_proxys_promises(data, config):
    clock = FakeClock()
    session = Session(config, clock)
    violations: list[str] = []
    connections: list[ModelUpstream] = []
    client_bytes = bytearray()
    upstream_seqs: list[int] = []  # seq numbers of the replies the client must see
    maybe_seqs: list[int] = []  # and of those it may see (an EHLO reply followed by a HELO)
    closed = False
    client_gone = False
    seq = 0

    def apply(actions) -> None:
        nonlocal closed
        connects = 0
        for action in actions:
            assert not closed, f"{action!r} after Close"
            if isinstance(action, ToUpstream):
                assert connections, "a write with no upstream connection"
                connections[-1].receive(action.data)
            elif isinstance(action, ToClient):
                client_bytes.extend(action.data)
            elif isinstance(action, Close):
                closed = True
            elif isinstance(action, ConnectUpstream):
                connections.append(ModelUpstream(replay=bool(connections), violations=violations))
                connects += 1
            elif isinstance(action, DropUpstream):
                pass  # the next ConnectUpstream starts a fresh model connection
            else:
                assert isinstance(action, Log)
                assert action.event != "internal error", action.fields["exception"]
        for _ in range(connects):
            apply(session.handle(UpstreamConnected()))

    def feed_in_pieces(event, payload: bytes) -> None:
        points = sorted(set(data.draw(st.lists(st.integers(0, len(payload)), max_size=3))))
        for a, b in zip([0, *points], [*points, len(payload)], strict=True):
            if payload[a:b] and not closed:
                apply(session.handle(event(payload[a:b])))

    apply(session.handle(ClientConnected(CLIENT)))
    for _ in range(data.draw(st.integers(1, 40))):
        if closed:
            break
        upstream = connections[-1]
        move = data.draw(
            st.sampled_from(["client"] * 4 + ["upstream"] * 4 + ["client_eof", "upstream_eof", "timeout", *EVENTS])
        )
        if move == "client" and not client_gone:
            payload = b"".join(data.draw(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=8)))
            feed_in_pieces(ClientData, payload)
        elif move == "upstream" and (upstream.awaiting_reply or not upstream.greeted):
            code = data.draw(st.sampled_from(CODES if upstream.greeted else GREETINGS))
            seq += 1
            lines = data.draw(st.integers(1, 3))
            # The seq goes on the first line: the one an EHLO reply keeps whatever else changes.
            reply = b"%d%sseq=%d\r\n" % (code, b"-" if lines > 1 else b" ", seq)
            texts = [data.draw(st.sampled_from(CONTINUATIONS)) for _ in range(lines - 1)]
            separators = [b"-"] * (lines - 2) + [b" "]
            reply += b"".join(b"%d%s%s\r\n" % (code, sep, text) for sep, text in zip(separators, texts, strict=False))
            relayed = upstream.replied(code)
            upstream.greeted = True
            feed_in_pieces(UpstreamData, reply)
            followed = connections[-1] is upstream and upstream.followed_by_helo_or_xclient()
            if relayed or (relayed is None and not followed):
                upstream_seqs.append(seq)
            elif relayed is None and not upstream.followed_by_xclient():
                maybe_seqs.append(seq)
        elif move == "client_eof" and not client_gone:
            client_gone = True
            apply(session.handle(ClientClosed()))
        elif move == "upstream_eof":
            apply(session.handle(UpstreamClosed()))
        elif move == "drain":
            apply(session.handle(Drain()))
        elif move == "shut_down":
            apply(session.handle(ShutDown()))
        elif move == "timeout" and session.deadline != float("inf"):
            clock.now = max(clock.now, session.deadline)
            apply(session.handle(Tick()))

    assert violations == []
    reader = ReplyReader(max_size=1 << 20)
    reader.feed(bytes(client_bytes))
    seen: list[int] = []
    while (answer := reader.next_reply()) is not None:
        found = SEQ.search(" ".join(answer.lines))
        if found:
            seen.append(int(found[1]))
        else:
            assert answer.code >= 400, f"a success the upstream never gave: {answer}"
    assert not reader.pending(), f"half a reply sent to the client: {bytes(client_bytes)!r}"
    assert seen == sorted(seen) and len(set(seen)) == len(seen), "replies out of order or repeated"
    assert set(seen) <= set(upstream_seqs) | set(maybe_seqs)
    if closed:
        assert [s for s in seen if s not in maybe_seqs] == upstream_seqs, "an upstream reply never reached the client"
