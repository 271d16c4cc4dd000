"""The proxy's state machine for one client and its upstream, with no I/O.

Theory of operation. The shell turns every I/O outcome into an event (``events.py``)
and calls ``Session.handle(event)``, which returns the actions to carry out, in order
(``actions.py``). The session keeps one clock (a callable given by the shell) for its
deadlines, exposed as ``deadline``; the shell sends ``Tick`` when it passes.

Toward the upstream it is strictly lock-step: at most one exchange is outstanding, and
nothing is sent before the complete greeting (RFC 2920 §1 on why legacy servers break).
Client input waits, unparsed, in one buffer while a reply is outstanding (like h11's
PAUSED), and the next command is cut from it only once that reply is in. Toward the
client it is a PIPELINING server (RFC 2920 §3.2): replies go out in order; replies to
RSET, MAIL and RCPT are held and sent together; the reply to any other command, and
everything pending whenever no complete command waits in the input, is flushed in one
write. Held replies also go out once the upstream has kept pipeproxy waiting longer than
``hold_time``, so a slow upstream never holds back replies a client is waiting for.

What the upstream owes a reply to is an ``Exchange``. ``TRANSITIONS`` below says, for
each exchange and reply, whether the client sees the reply (as it is, or rewritten) and
what happens next; pipeproxy's own exchanges (the HELO fallback, the replay after a
reconnect) are rows like the client's. After DATA's ``354`` client input is content: it
is unstuffed from the client's framing and stuffed again for the upstream, and the
terminator is pipeproxy's own. A client that vanishes before its terminator never gets
its message completed: the upstream is closed without a final dot. If the upstream
fails, every command still owed a reply gets a ``421`` in order, then the session
closes: the client never sees a success the upstream did not give.
"""

from __future__ import annotations

import functools
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from . import logschema as L
from .actions import (
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
from .config import Address, BareLineEndings, Config
from .ehlo import ehlo_from_helo, offered, rewrite_ehlo
from .events import (
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
from .identity import ClientIdentity, command_line, offered_attributes
from .message import HeaderScanner, queue_id, show_address
from .replies import (
    BARE_LINE_ENDING,
    BEFORE_HELLO,
    DISABLED_WITH_KEYWORD,
    EARLY_TALKER,
    INTERNAL_ERROR,
    NOT_COMPLETED,
    READY_FOR_TLS,
    REFUSED,
    SEND_HELLO_FIRST,
    SHUTTING_DOWN,
    TLS_ACTIVE,
    TOO_BIG,
    TOO_BIG_REASON,
    TOO_MANY_RECIPIENTS,
    TRANSACTION_IN_PROGRESS,
    UNAVAILABLE,
    UPSTREAM_TIMED_OUT,
    UPSTREAM_TLS_UNAVAILABLE,
    needs_tls,
)
from .transaction import Transaction
from .wire import (
    CRLF,
    MAX_AUTH_LINE,
    UPSTREAM_BROKE_PROTOCOL,
    ClientError,
    ClientInput,
    Reply,
    ReplyReader,
    Stuffer,
    Unstuffer,
    UpstreamError,
    mailbox,
    reply,
)


@dataclass(frozen=True, slots=True, eq=False)
class Exchange:
    """Something the upstream owes a reply to; each one a constant, compared by identity."""

    name: str
    timeout: str  # the Timeouts field that bounds the wait for the reply
    groupable: bool = False  # RFC 2920 §3.1: its reply may be held for the group
    proxy: bool = False  # pipeproxy's own command: the client did not send it


GREETING: Final = Exchange("greeting", "greeting", proxy=True)
EHLO: Final = Exchange("EHLO", "command")
HELO: Final = Exchange("HELO", "command")
HELO_FALLBACK: Final = Exchange("HELO fallback", "command", proxy=True)
AUTH: Final = Exchange("AUTH", "command")
SASL: Final = Exchange("SASL response", "command")  # a client line answering AUTH's 334
MAIL: Final = Exchange("MAIL", "mail", groupable=True)
RCPT: Final = Exchange("RCPT", "rcpt", groupable=True)
RSET: Final = Exchange("RSET", "command", groupable=True)
LEGACY_FROM: Final = Exchange("SEND/SOML/SAML", "mail", groupable=True)  # RFC 2920 §3.1 lists them
DATA: Final = Exchange("DATA", "data_init")
END_OF_DATA: Final = Exchange("end of data", "data_end")
QUIT: Final = Exchange("QUIT", "command")
OTHER: Final = Exchange("other command", "command")  # NOOP, VRFY, HELP, unknown verbs: relayed as they are
# A new upstream connection after pipeproxy had to drop one mid-message: the client has
# seen a greeting and its EHLO reply already, so these replies are not relayed.
REPLAY_GREETING: Final = Exchange("greeting (reconnect)", "greeting", proxy=True)
REPLAY_EHLO: Final = Exchange("EHLO (reconnect)", "command", proxy=True)
REPLAY_HELO: Final = Exchange("HELO (reconnect)", "command", proxy=True)
# Telling a trusting upstream who the client is (identity.py). A client that says HELO
# gets an EHLO sent first, since only an EHLO reply says whether XCLIENT is offered.
HELO_PROBE: Final = Exchange("EHLO before HELO", "command", proxy=True)
XCLIENT: Final = Exchange("XCLIENT", "command", proxy=True)
REPLAY_XCLIENT: Final = Exchange("XCLIENT (reconnect)", "command", proxy=True)
XFORWARD: Final = Exchange("XFORWARD", "command", proxy=True)
# TLS toward the upstream (--upstream-tls): after an EHLO reply offering STARTTLS,
# pipeproxy's STARTTLS; after its 220 the handshake, which the shell does and which owes
# no reply but blocks the upstream like one (nothing from the client goes upstream
# meanwhile); then the EHLO again, inside TLS, whose reply is the one the client sees.
UPSTREAM_STARTTLS: Final = Exchange("STARTTLS (upstream)", "command", proxy=True)
UPSTREAM_TLS: Final = Exchange("TLS handshake (upstream)", "tls_handshake", proxy=True)
REPLAY_STARTTLS: Final = Exchange("STARTTLS (reconnect)", "command", proxy=True)
REPLAY_UPSTREAM_TLS: Final = Exchange("TLS handshake (reconnect)", "tls_handshake", proxy=True)
# --upstream-tls may and a failed handshake: a new connection, in clear, whose greeting
# the client (still waiting for its EHLO reply) never sees.
CLEAR_GREETING: Final = Exchange("greeting (in clear after TLS failed)", "greeting", proxy=True)

REPLAY: Final = (REPLAY_GREETING, REPLAY_EHLO, REPLAY_HELO, REPLAY_XCLIENT, REPLAY_STARTTLS, REPLAY_UPSTREAM_TLS)

_EHLO_REPLIES: Final = frozenset({EHLO, HELO_PROBE, REPLAY_EHLO})  # what they offer is learnt

VERBS: Final = {
    "EHLO": EHLO,
    "HELO": HELO,
    "AUTH": AUTH,
    "MAIL": MAIL,
    "RCPT": RCPT,
    "RSET": RSET,
    "SEND": LEGACY_FROM,
    "SOML": LEGACY_FROM,
    "SAML": LEGACY_FROM,
    "DATA": DATA,
    "QUIT": QUIT,
}


# Relay and Mode values are constants compared by identity, like exchanges, not enum
# members: on Python 3.11 ``Enum.MEMBER`` goes through EnumType.__getattr__ and costs
# several times a global's lookup, and the session asks its mode several times an event.
@dataclass(frozen=True, slots=True, eq=False)
class Relay:
    """What the client sees of an upstream reply."""

    name: str


AS_IS: Final = Relay("as is")
EHLO_REWRITTEN: Final = Relay("EHLO reply rewritten")  # PIPELINING added, the unrelayable removed
HELO_AS_EHLO: Final = Relay("HELO reply as an EHLO reply")
NOT_RELAYED: Final = Relay("not relayed")


# exchange -> rows of (reply code: exact, "2xx"-style class or "*"; relayed as; then).
# "2xx+XCLIENT" is a 2xx EHLO reply that offers XCLIENT while pipeproxy has yet to use it
# on this connection. "2xx+STARTTLS" is a 2xx EHLO reply offering STARTTLS on a clear
# connection while --upstream-tls wants TLS; "2xx-STARTTLS" one that does not offer it
# while TLS is required (encrypt, verify). STARTTLS comes first, XCLIENT inside TLS.
# The first row that matches the reply wins. "then" names the step taken after the reply
# is relayed: a ``_then_<name>`` method below; None: nothing more. A 421 from the upstream
# ends the channel whatever was asked (RFC 5321 §3.8): it is relayed and the session
# closes, answering what is still waiting with 421; only during the silent replay after a
# reconnect, which the client knows nothing of, is it a failed replay like any other.
TRANSITIONS: Final[dict[Exchange, tuple[tuple[str, Relay, str | None], ...]]] = {
    GREETING: (("*", AS_IS, "greeting"),),
    EHLO: (
        ("2xx+STARTTLS", NOT_RELAYED, "upstream_starttls"),  # the client sees the EHLO inside TLS
        ("2xx-STARTTLS", NOT_RELAYED, "upstream_tls_missing"),
        ("2xx+XCLIENT", NOT_RELAYED, "xclient"),  # the client sees the EHLO after it
        ("2xx", EHLO_REWRITTEN, "greeted"),
        ("500", NOT_RELAYED, "helo_fallback"),  # no ESMTP upstream (RFC 5321 §4.1.4)
        ("502", NOT_RELAYED, "helo_fallback"),
        ("*", AS_IS, None),
    ),
    HELO: (("2xx", AS_IS, "greeted"), ("*", AS_IS, None)),
    HELO_FALLBACK: (("2xx", HELO_AS_EHLO, "greeted"), ("*", AS_IS, None)),
    HELO_PROBE: (
        ("2xx+STARTTLS", NOT_RELAYED, "upstream_starttls"),
        ("2xx-STARTTLS", NOT_RELAYED, "upstream_tls_missing"),
        ("2xx+XCLIENT", NOT_RELAYED, "xclient"),
        ("*", NOT_RELAYED, "helo_after_probe"),
    ),
    UPSTREAM_STARTTLS: (
        ("220", NOT_RELAYED, "upstream_tls"),
        ("*", NOT_RELAYED, "upstream_starttls_refused"),
    ),
    UPSTREAM_TLS: (("*", NOT_RELAYED, "reply_during_tls"),),  # nothing is read during the handshake
    CLEAR_GREETING: (("2xx", NOT_RELAYED, "hello_again"), ("*", NOT_RELAYED, "clear_greeting_failed")),
    # Postfix answers a good XCLIENT with a new 220; older ones, and smtp-sink, with 250.
    XCLIENT: (("2xx", NOT_RELAYED, "xclient_accepted"), ("*", NOT_RELAYED, "xclient_refused")),
    XFORWARD: (("2xx", NOT_RELAYED, "mail_after_xforward"), ("*", NOT_RELAYED, "xforward_refused")),
    AUTH: (("334", AS_IS, "sasl"), ("2xx", AS_IS, "authenticated"), ("*", AS_IS, "auth_over")),
    SASL: (("334", AS_IS, "sasl"), ("2xx", AS_IS, "authenticated"), ("*", AS_IS, "auth_over")),
    MAIL: (("2xx", AS_IS, None), ("*", AS_IS, "mail_refused")),
    RCPT: (("*", AS_IS, "rcpt_answered"),),
    RSET: (("*", AS_IS, None),),
    LEGACY_FROM: (("*", AS_IS, None),),
    DATA: (("354", AS_IS, "content"), ("*", AS_IS, "data_refused")),
    END_OF_DATA: (("2xx", AS_IS, "delivered"), ("*", AS_IS, "not_delivered")),
    QUIT: (("*", AS_IS, "quit"),),
    OTHER: (("*", AS_IS, None),),
    REPLAY_GREETING: (("2xx", NOT_RELAYED, "replay_hello"), ("*", NOT_RELAYED, "replay_failed")),
    REPLAY_EHLO: (
        ("2xx+STARTTLS", NOT_RELAYED, "upstream_starttls"),
        ("2xx-STARTTLS", NOT_RELAYED, "upstream_tls_missing"),
        ("2xx+XCLIENT", NOT_RELAYED, "replay_xclient"),
        ("2xx", NOT_RELAYED, "replay_ehlo_done"),
        ("500", NOT_RELAYED, "replay_helo"),
        ("502", NOT_RELAYED, "replay_helo"),
        ("*", NOT_RELAYED, "replay_failed"),
    ),
    REPLAY_HELO: (("2xx", NOT_RELAYED, "replayed"), ("*", NOT_RELAYED, "replay_failed")),
    REPLAY_XCLIENT: (("2xx", NOT_RELAYED, "replay_hello"), ("*", NOT_RELAYED, "xclient_refused")),
    REPLAY_STARTTLS: (
        ("220", NOT_RELAYED, "upstream_tls"),
        ("*", NOT_RELAYED, "upstream_starttls_refused"),
    ),
    REPLAY_UPSTREAM_TLS: (("*", NOT_RELAYED, "reply_during_tls"),),
}


@functools.lru_cache(maxsize=1024)  # a few exchanges and codes: looked up once each
def transition(
    exchange: Exchange, code: int, xclient_due: bool = False, starttls: str = ""
) -> tuple[Relay, str | None]:
    """How the session answers ``code`` to ``exchange``: relayed as what, then what.

    ``xclient_due``: the reply is an EHLO reply offering XCLIENT, not yet used here.
    ``starttls``: "+" an EHLO reply offering STARTTLS that --upstream-tls wants used,
    "-" one without it while TLS is required; "" otherwise.
    """
    if code == 421 and exchange not in REPLAY:
        return AS_IS, "upstream_closing"
    text, klass = str(code), f"{code // 100}xx"
    patterns = (
        text,
        klass,
        "*",
        *((f"{klass}+XCLIENT",) if xclient_due else ()),
        *((f"{klass}{starttls}STARTTLS",) if starttls else ()),
    )
    for pattern, relay, then in TRANSITIONS[exchange]:
        if pattern in patterns:
            return relay, then
    raise AssertionError(f"no row for {exchange.name} {code}")  # every row list ends with "*"


# RFC 1870 §3: the SIZE parameter of MAIL FROM declares the message size in octets.
_SIZE_PARAMETER: Final = re.compile(r"\sSIZE=(\d+)", re.IGNORECASE | re.ASCII)


@dataclass(frozen=True, slots=True, eq=False)
class Mode:
    """Which reader takes the next client bytes."""

    name: str


READING_COMMANDS: Final = Mode("commands")  # the next client line is an SMTP command
READING_SASL: Final = Mode("SASL response")  # the next client line answers an AUTH 334 challenge
READING_CONTENT: Final = Mode("content")  # client input is message content
IN_TLS_HANDSHAKE: Final = Mode("TLS handshake")  # after STARTTLS: nothing is read until TLS is up
CLOSED: Final = Mode("closed")


class _Outstanding:
    """The one exchange whose reply has not arrived yet."""

    __slots__ = ("exchange", "verb", "argument", "sent_at", "deadline")

    # Not a dataclass: a dataclass's generated __init__ stays interpreted (wire.Reply).
    def __init__(self, exchange: Exchange, verb: str, argument: bytes, sent_at: float, deadline: float) -> None:
        self.exchange = exchange
        self.verb = verb  # what the debug log calls it
        self.argument = argument  # of the command, for the HELO fallback; never logged
        self.sent_at = sent_at
        self.deadline = deadline


class _Message:
    """The content of a message on its way: unframed from the client, framed again."""

    __slots__ = ("unstuffer", "stuffer", "started", "last_data", "headers")

    # Not a dataclass, as _Outstanding is not.
    def __init__(self, unstuffer: Unstuffer, stuffer: Stuffer, started: float) -> None:
        self.unstuffer = unstuffer
        self.stuffer = stuffer
        self.started = started
        self.last_data = started
        self.headers = HeaderScanner()


class Session:
    def __init__(self, config: Config, clock: Callable[[], float]) -> None:
        self.config = config
        self._clock = clock
        self._debug = config.log_level == "debug"
        self._hash_key = config.log_hash_key.encode()  # for --log-addresses hash, once
        self._input = ClientInput(config.max_line_length)
        self._replies = ReplyReader(config.max_reply_size)
        self._mode = READING_COMMANDS
        self._message: _Message | None = None
        self._actions: list[Action] = []
        self._held: list[Reply] = []  # replies not yet sent to the client
        self._held_since = 0.0
        self._groups = 0  # writes of replies to the client so far
        self._transaction: Transaction | None = None
        self._client = Address("unknown", 0)
        self._server: Address | None = None
        self._session_id = ""
        self._client_eof = False
        self._client_lost = False  # writing to the client failed: say nothing more
        self._draining = False
        self._authenticated = False
        self._upstream = "none"  # the upstream connection: "connecting", "open" or "none"
        self._hello: tuple[Exchange, bytes] | None = None  # the client's accepted EHLO/HELO
        self._hello_request: tuple[Exchange, bytes] | None = None  # its last EHLO/HELO sent
        # Per upstream connection: has pipeproxy told it who the client is? "unknown"
        # until an EHLO reply says whether XCLIENT is offered; then "done" or "none".
        self._xclient = "none"
        self._xclient_attributes: frozenset[str] = frozenset()
        self._xforward_attributes: frozenset[str] | None = None  # None: not offered
        self._mail_waiting: tuple[Exchange, bytes, bytes, str] | None = None  # for XFORWARD
        self._early_talker_seen = False
        self._tls: TlsInfo | None = None
        # TLS with the upstream: per connection; and whether --upstream-tls may gave up
        # on it for this session after a failed handshake (as Postfix's may does).
        self._upstream_tls: TlsInfo | None = None
        self._upstream_tls_given_up = False
        self._hello_needed = False  # after STARTTLS the client must greet again (RFC 3207 §4.2)
        self._client_wait_since: float | None = None
        self._started = self._now = clock()
        self._outstanding: _Outstanding | None = None
        self.commands = 0  # command lines received from the client
        self.messages = 0  # messages the upstream accepted

    # -- the one entry point -----------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        """Take one event; return the actions to carry out, in order."""
        try:
            self._now = self._clock()  # the time of the event: one read of the clock
            self._handle(event)
        except Exception:
            self._crash(traceback.format_exc())
        actions, self._actions = self._actions, []
        return actions

    def _handle(self, event: Event) -> None:
        if self._mode is CLOSED:
            return
        match event:
            # The two events of nearly every call first: a match tries its cases in order.
            case UpstreamData(data) if self._upstream != "none" and not self._in_upstream_handshake():
                self._replies.feed(data)
                self._advance()
            case ClientData() if self._mode is IN_TLS_HANDSHAKE:
                pass  # the shell reads nothing now; cleartext here would be an injection
            case ClientData(data):
                greeted = self._outstanding is None or self._outstanding.exchange is not GREETING
                if not greeted and self._early_talker():
                    return
                self._input.feed(data)
                if self._message is not None:
                    self._message.last_data = self._now
                self._advance()
            case UpstreamConnected():
                self._upstream = "open"  # the greeting is awaited already
            case UpstreamData() | UpstreamClosed() | UpstreamFailed() if self._upstream == "none":
                pass  # from a connection dropped on purpose: it has nothing more to say
            case UpstreamData(data):
                # Clear bytes after the upstream's 220 to STARTTLS: never replies.
                self._log(L.UPSTREAM_BYTES_AFTER_STARTTLS, octets=len(data))
            case ClientClosed():
                self._client_eof = True
                self._advance()
            case ClientConnected(client, server, session, tls):
                self._client, self._server, self._session_id = client, server, session
                self._log(L.SESSION_OPEN, server=str(server) if server else None)
                if tls is not None:
                    self._tls_up(tls)
                self._connect_upstream(GREETING)
            case UpstreamClosed():
                self._abandon_message("upstream closed the connection")
                self._fail(reply(421, "4.4.2 Upstream server closed the connection"), "upstream closed the connection")
            case UpstreamFailed(reason):
                if self._upstream == "connecting":
                    self._log(L.UPSTREAM_UNREACHABLE, error=reason)
                self._abandon_message(reason)
                self._fail(UNAVAILABLE, reason)
            case ClientWriteFailed(reason):
                self._client_lost = True
                self._held.clear()
                self._abandon_message(reason)
                self._end_transaction(None, reason)
                self._close(reason)
            case TlsEstablished(info):
                self._tls_up(info)
                self._mode = READING_COMMANDS
                self._advance()
            case UpstreamTlsEstablished(info):
                self._upstream_tls_established(info)
            case UpstreamTlsFailed(reason):
                self._upstream_tls_failed(reason)
            case TlsFailed(reason):
                self._log(L.TLS_FAILED, reason=reason)
                self._client_lost = True  # nothing can be said to it any more, in clear or not
                self._end_transaction(None, f"TLS handshake failed: {reason}")
                self._close(f"TLS handshake failed: {reason}")
            case Tick():
                self._tick()
            case Drain():
                self._draining = True
                self._advance()
            case ShutDown():
                self._abandon_message("shutdown")
                self._fail(SHUTTING_DOWN, "pipeproxy shut down", owed=SHUTTING_DOWN)

    def _early_talker(self) -> bool:
        """The client sent before the greeting; whether that ended the session."""
        if not self._early_talker_seen:
            self._early_talker_seen = True
            self._log(L.EARLY_TALKER, action=self.config.early_talkers)
        if self.config.early_talkers != "reject":
            return False
        self._hold(EARLY_TALKER)
        self._close("client talked before the greeting")
        return True

    def _crash(self, trace: str) -> None:
        """A bug: say so in the log, and end the session with a 421, never a silent EOF."""
        # What the broken call queued for the upstream (content, a final dot, a connect)
        # must not happen: only its log lines and replies already due stay.
        self._actions = [action for action in self._actions if isinstance(action, Log | ToClient)]
        self._emit(Log("error", L.INTERNAL_ERROR.name, {"exception": trace}))
        if self._mode is CLOSED:
            return
        self._mode = CLOSED
        if not self._client_lost:
            self._emit(ToClient((*self._held, INTERNAL_ERROR)))
        self._held.clear()
        self._emit_closed("internal error", clean=False)

    # -- what the shell asks ---------------------------------------------------------

    @property
    def deadline(self) -> float:
        """When a ``Tick`` is due, on the session's clock."""
        deadline = self._deadline()
        if self._held and self._mode is not CLOSED:
            deadline = min(deadline, self._held_since + self.config.hold_time)
        return deadline

    def _deadline(self) -> float:
        if self._outstanding is not None:
            return self._outstanding.deadline
        if self._message is not None:
            # RFC 5321 §4.5.3.2.5 per block, and a minimum rate over the whole message.
            data_block = self.config.timeouts.data_block
            deadline = self._message.last_data + data_block
            if self.config.min_data_rate:
                allowance = self._message.unstuffer.size / self.config.min_data_rate
                deadline = min(deadline, self._message.started + data_block + allowance)
            return deadline
        if self._client_wait_since is not None:
            return self._client_wait_since + self.config.timeouts.client_idle
        return float("inf")

    def awaiting_upstream(self) -> bool:
        """Whether the upstream owes a reply now."""
        return self._outstanding is not None

    def awaiting_client(self) -> bool:
        """Whether the session waits for client input now (no reply is outstanding)."""
        return self._outstanding is None

    def client_room(self) -> int:
        """How many more client bytes may be held; at 0 the shell stops reading."""
        if self._mode is CLOSED:
            return 0
        # Never less than the longest legal line: with no room and no line end, nothing
        # could move (a 4 kB AUTH line under a 4 kB bound would stall the session).
        bound = max(self.config.max_pipeline_bytes, self.config.max_line_length, MAX_AUTH_LINE)
        return max(0, bound - len(self._input))

    # -- the machine -----------------------------------------------------------------

    def _advance(self) -> None:
        """Run as far as the input allows, one upstream exchange at a time."""
        while self._mode is not CLOSED:
            try:
                upstream_reply = self._replies.next_reply()
            except UpstreamError as bad_reply:  # a name of its own: compiled, a variable keeps one type
                self._abandon_message(f"upstream sent bad reply: {bad_reply.reason}")
                self._fail(bad_reply.reply, f"upstream sent bad reply: {bad_reply.reason}")
                return
            if upstream_reply is not None:
                if self._outstanding is None:
                    self._unsolicited(upstream_reply)
                    return
                self._on_reply(upstream_reply)
                continue
            if self._outstanding is not None:
                return
            if self._mode is READING_CONTENT:
                self._read_content()
                if self._mode is READING_CONTENT:
                    return
                continue
            if self._mode is IN_TLS_HANDSHAKE:
                return
            if self._draining and self._transaction is None and self._mode is READING_COMMANDS:
                self._fail(SHUTTING_DOWN, "pipeproxy draining", in_flight=False, clean=True, owed=SHUTTING_DOWN)
                return
            try:
                line = self._input.next_line(sasl=self._mode is READING_SASL)
            except ClientError as bad_line:
                self.commands += 1
                self._refuse("", bad_line.reply, bad_line.reason)
                continue
            if line is None:
                self._flush()
                if self._client_eof:
                    self._close("client closed the connection", clean=True)
                elif self._client_wait_since is None:
                    self._client_wait_since = self._now
                return
            self._client_wait_since = None
            if self._replies.pending():
                # Part of a reply nobody asked for: sent now, the command's reply would
                # be taken from it.
                self._unsolicited(None)
                return
            self._on_line(line)

    def _on_line(self, line: bytes) -> None:
        if self._mode is READING_SASL:
            # A SASL response, not a command: relayed, never logged (RFC 4954 §4).
            self._transcript("client", line="[SASL response]")
            self._send(SASL, b"", line)
            return
        self.commands += 1
        verb_octets, _, argument = line.partition(b" ")
        verb = verb_octets.decode("ascii", "replace").upper()
        if self.config.transcript:
            self._transcript("client", line=self._redacted(verb, argument))
        if verb == "STARTTLS" and self.config.tls:
            self._starttls()
            return
        if verb in REFUSED:
            self._refuse(verb, REFUSED[verb], "not relayable")
            return
        if self._tls is None and self.config.tls and (refusal := needs_tls(verb, self.config)):
            self._refuse(verb, refusal, "needs TLS")
            return
        if verb in DISABLED_WITH_KEYWORD and verb in self.config.discard_ehlo_keywords:
            self._refuse(verb, DISABLED_WITH_KEYWORD[verb], "extension discarded")
            return
        if (self._xclient == "unknown" or self._hello_needed) and verb not in BEFORE_HELLO:
            # Forwarded now, it would reach the upstream as from pipeproxy's address.
            self._refuse(verb, SEND_HELLO_FIRST, "no EHLO or HELO yet")
            return
        exchange = VERBS.get(verb, OTHER)
        if exchange in (EHLO, HELO):
            self._hello_request = (exchange, argument)
            # Only an EHLO reply says whether XCLIENT or STARTTLS is offered.
            if exchange is HELO and (self._xclient == "unknown" or self._upstream_tls_wanted()):
                self._send(HELO_PROBE, argument, _hello_line(b"EHLO", argument), verb)
                return
        transaction = self._transaction
        if exchange is MAIL:
            self._end_transaction(None, "new MAIL command")
            text = argument.decode("utf-8", "surrogateescape")
            declared = _SIZE_PARAMETER.search(text)
            if self.config.max_message_size and declared and _over(declared[1], self.config.max_message_size):
                self._refuse(verb, TOO_BIG, "declared SIZE over the limit")
                return
            helo = self._hello[1].decode("utf-8", "surrogateescape") if self._hello else None
            self._transaction = Transaction(sender=self._show(mailbox(text)), helo=helo)
        elif exchange is RCPT and transaction is not None:
            if transaction.rcpt_sent >= self.config.max_recipients:
                transaction.answered(self._recipient(argument), TOO_MANY_RECIPIENTS)
                self._refuse(verb, TOO_MANY_RECIPIENTS, "too many recipients")
                return
            transaction.rcpt_sent += 1
        elif exchange in (RSET, HELO, EHLO, QUIT):
            self._end_transaction(None, f"{verb} command")
        if exchange is MAIL and self._xforward_attributes is not None:
            self._mail_waiting = (exchange, argument, line, verb)
            self._send(XFORWARD, b"", command_line(b"XFORWARD", self._identity(), self._xforward_attributes))
            return
        self._send(exchange, argument, line, verb)

    def _starttls(self) -> None:
        """RFC 3207, terminated here: the 220 in clear, then nothing more in clear."""
        if self._tls is not None:
            self._refuse("STARTTLS", TLS_ACTIVE, "TLS already active")
            return
        if self._transaction is not None:
            self._refuse("STARTTLS", TRANSACTION_IN_PROGRESS, "STARTTLS inside a mail transaction")
            return
        self._flush()
        # STARTTLS ends its group (RFC 2920 §3.1, RFC 3207 §4.2): what came after it in
        # clear is never read as commands inside TLS (CVE-2011-0411).
        if octets := self._input.discard():
            self._log(L.PLAINTEXT_AFTER_STARTTLS, octets=octets)
        self._mode = IN_TLS_HANDSHAKE
        self._hello, self._hello_needed = None, True
        self._groups += 1
        self._emit(StartTls(READY_FOR_TLS))

    def _tls_up(self, info: TlsInfo) -> None:
        self._tls = info
        self._log(L.TLS_ESTABLISHED, version=info.version, cipher=info.cipher, sni=info.sni)

    def _ehlo_policy(self) -> tuple[frozenset[str], tuple[str, ...]]:
        """(keywords to remove, keywords pipeproxy adds) for the client's EHLO reply."""
        discard = self.config.discard_ehlo_keywords
        if not self.config.tls or self._tls is not None:
            return discard, ()
        if not self.config.auth_without_tls or self.config.require_tls:
            discard |= {"AUTH"}  # offered once the session is encrypted
        return discard, ("STARTTLS",)

    def _identity(self) -> ClientIdentity:
        hello, argument = self._hello_request or (HELO, b"")
        return ClientIdentity(self._client, self._server, argument, hello is EHLO, self._session_id)

    def _learn_extensions(self, upstream_reply: Reply) -> bool:
        """Note what an EHLO reply offers; whether XCLIENT is offered and still to be sent."""
        if upstream_reply.code in (500, 502) and self._xclient == "unknown":
            self._xclient = "none"  # no ESMTP: no XCLIENT, ever, on this connection
        if upstream_reply.code // 100 != 2:
            return False
        extensions = offered(upstream_reply)
        self._xforward_attributes = None
        if self.config.xforward == "auto" and "XFORWARD" in extensions:
            self._xforward_attributes = offered_attributes(extensions["XFORWARD"])
        if self._xclient != "unknown":
            return False
        if "XCLIENT" not in extensions:
            self._xclient = "none"
            return False
        self._xclient_attributes = offered_attributes(extensions["XCLIENT"])
        return True

    def _redacted(self, verb: str, argument: bytes) -> str:
        """A command as the transcript shows it: AUTH data out, addresses as configured."""
        text = argument.decode("utf-8", "surrogateescape")
        if verb == "AUTH":
            mechanism, _, initial = text.partition(" ")
            return f"AUTH {mechanism}" + (" [redacted]" if initial else "")
        if verb in ("MAIL", "RCPT") and self.config.log_addresses != "full":
            return f"{verb} {text.partition(':')[0]}:<{self._show(mailbox(text))}>"
        return f"{verb} {text}".rstrip()

    def _transcript(self, direction: str, **fields: Any) -> None:
        if self.config.transcript:
            self._log(L.TRANSCRIPT, direction=direction, **fields)

    def _refuse(self, verb: str, answer: Reply, reason: str) -> None:
        """Answer a command here, never forwarding it, and say why in the log."""
        self._log(L.COMMAND_REFUSED, verb=verb or None, reason=reason)
        self._transcript("to client", code=answer.code, text=answer.text)
        self._answer(answer, groupable=VERBS.get(verb, OTHER).groupable)

    def _send(self, exchange: Exchange, argument: bytes, line: bytes, verb: str = "") -> None:
        if exchange.proxy and self.config.transcript:
            self._transcript("to upstream", line=line.decode("utf-8", "surrogateescape"))
        self._expect(exchange, argument, verb)
        self._emit(ToUpstream(line + CRLF))

    def _expect(self, exchange: Exchange, argument: bytes = b"", verb: str = "") -> None:
        now = self._now
        timeout: float = getattr(self.config.timeouts, exchange.timeout)
        self._outstanding = _Outstanding(exchange, verb or exchange.name, argument, now, now + timeout)

    def _on_reply(self, upstream_reply: Reply) -> None:
        pending = self._outstanding
        assert pending is not None
        self._outstanding = None
        exchange = pending.exchange
        if self.config.transcript:  # not even the text built otherwise
            self._transcript("upstream", code=upstream_reply.code, text=upstream_reply.text)
        waited = self._now - pending.sent_at
        if self._transaction is not None:
            self._transaction.upstream_wait += waited
        if self._debug and not exchange.proxy:
            # The group is the client write that will carry this reply.
            self._log(
                L.COMMAND, verb=pending.verb, code=upstream_reply.code, upstream_wait=round(waited, 6),
                group=self._groups + 1,
            )
        starttls = ""
        xclient_due = False
        if exchange in _EHLO_REPLIES:
            # Before STARTTLS, what the reply offers is not learnt: the EHLO inside TLS says.
            starttls = self._starttls_due(upstream_reply)
            xclient_due = not starttls and self._learn_extensions(upstream_reply)
        relay, then = transition(exchange, upstream_reply.code, xclient_due, starttls)
        if relay is EHLO_REWRITTEN:
            discard, added = self._ehlo_policy()
            upstream_reply, removed = rewrite_ehlo(upstream_reply, discard, self.config.max_message_size, added)
            self._log(L.EHLO_REWRITTEN, removed=list(removed))
        elif relay is HELO_AS_EHLO:
            upstream_reply = ehlo_from_helo(upstream_reply, self.config.max_message_size, self._ehlo_policy()[1])
        if relay is not NOT_RELAYED:
            # A 421 is held: the 421s for what is still waiting join it in one write.
            self._answer(upstream_reply, groupable=exchange.groupable or then == "upstream_closing")
        if then is not None:
            _STEPS[then](self, pending, upstream_reply)

    # -- the steps named in TRANSITIONS ---------------------------------------------------

    def _then_greeting(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        self._log(L.UPSTREAM_GREETING, code=upstream_reply.code)

    def _then_greeted(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        self._hello_needed = False
        hello = EHLO if pending.exchange in (EHLO, HELO_FALLBACK) else HELO
        self._hello = (hello, pending.argument)

    def _then_helo_fallback(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        if self._upstream_tls_required():
            self._then_upstream_tls_missing(pending, upstream_reply)
            return
        self._log(L.HELO_FALLBACK, code=upstream_reply.code)
        self._send(HELO_FALLBACK, pending.argument, _hello_line(b"HELO", pending.argument))

    def _then_sasl(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        self._mode = READING_SASL

    def _then_authenticated(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        self._authenticated = True
        self._mode = READING_COMMANDS

    def _then_auth_over(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        self._mode = READING_COMMANDS

    def _then_mail_refused(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        self._end_transaction(upstream_reply, "MAIL refused")

    def _then_rcpt_answered(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        if self._transaction is not None:
            self._transaction.answered(self._recipient(pending.argument), upstream_reply)

    def _recipient(self, argument: bytes) -> str:
        return self._show(mailbox(argument.decode("utf-8", "surrogateescape")))

    def _show(self, address: str) -> str:
        return show_address(address, self.config.log_addresses, self._hash_key)

    def _then_content(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        now = self._now
        reject = self.config.bare_line_endings is BareLineEndings.REJECT
        self._message = _Message(Unstuffer(), Stuffer(reject_bare=reject), started=now)
        self._mode = READING_CONTENT

    def _then_data_refused(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        self._end_transaction(upstream_reply, "DATA refused")

    def _then_delivered(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        self.messages += 1
        if self._transaction is not None:
            self._transaction.queue_id = queue_id(upstream_reply.text)
        self._end_transaction(upstream_reply, "message accepted")

    def _then_not_delivered(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        self._end_transaction(upstream_reply, "message refused")

    def _then_quit(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        self._close("client quit", clean=True)

    def _then_upstream_closing(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        # The upstream is closing the channel (RFC 5321 §3.8): what is still queued
        # cannot be answered by it.
        self._fail(None, f"upstream answered {pending.exchange.name} with 421")

    def _then_xclient(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        line = command_line(b"XCLIENT", self._identity(), self._xclient_attributes)
        self._log(L.XCLIENT_SENT, attributes=[part.partition(b"=")[0].decode() for part in line.split()[1:]])
        self._send(REPLAY_XCLIENT if pending.exchange in REPLAY else XCLIENT, b"", line)

    def _then_replay_xclient(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        self._then_xclient(pending, upstream_reply)

    def _then_xclient_accepted(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        # The session restarted with a new 220 (Postfix's XCLIENT_README): the client's
        # EHLO or HELO goes again, and its reply is the one the client sees.
        self._xclient = "done"
        assert self._hello_request is not None
        hello, argument = self._hello_request
        self._send(hello, argument, _hello_line(hello.name.encode(), argument))

    def _then_xclient_refused(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        # Going on would make the client pipeproxy: fail closed.
        self._log(L.XCLIENT_REFUSED, code=upstream_reply.code, reply=upstream_reply.text)
        reason = f"upstream refused XCLIENT ({upstream_reply.code})"
        self._fail(UNAVAILABLE, reason, in_flight=pending.exchange is XCLIENT)

    def _then_helo_after_probe(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        if self._upstream_tls_required():
            self._then_upstream_tls_missing(pending, upstream_reply)
            return
        self._send(HELO, pending.argument, _hello_line(b"HELO", pending.argument))

    def _then_mail_after_xforward(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        assert self._mail_waiting is not None
        exchange, argument, line, verb = self._mail_waiting
        self._mail_waiting = None
        self._send(exchange, argument, line, verb)

    def _then_xforward_refused(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        # XFORWARD only feeds the MTA's logs: the mail goes on without it.
        self._log(L.XFORWARD_REFUSED, code=upstream_reply.code, reply=upstream_reply.text)
        self._then_mail_after_xforward(pending, upstream_reply)

    def _then_replay_hello(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        if pending.exchange is REPLAY_XCLIENT:
            self._xclient = "done"
        self._replay_hello()

    def _replay_hello(self) -> None:
        assert self._hello is not None
        exchange, argument = self._hello
        # A HELO client's session is probed with EHLO first, as at the start.
        if exchange is EHLO or self._xclient == "unknown" or self._upstream_tls_wanted():
            self._send(REPLAY_EHLO, argument, _hello_line(b"EHLO", argument))
        else:
            self._send(REPLAY_HELO, argument, _hello_line(b"HELO", argument))

    def _then_replay_ehlo_done(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        assert self._hello is not None
        if self._hello[0] is EHLO:
            self._then_replayed(pending, upstream_reply)
        else:
            self._send(REPLAY_HELO, pending.argument, _hello_line(b"HELO", pending.argument))

    def _then_replay_helo(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        if self._upstream_tls_required():
            self._then_upstream_tls_missing(pending, upstream_reply)
            return
        self._send(REPLAY_HELO, pending.argument, _hello_line(b"HELO", pending.argument))

    def _then_replayed(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        self._log(L.UPSTREAM_RECONNECTED)

    def _then_replay_failed(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        reason = f"upstream refused the reconnection ({pending.exchange.name} {upstream_reply.code})"
        self._fail(UNAVAILABLE, reason, in_flight=False)

    # -- TLS toward the upstream (--upstream-tls) ----------------------------------------

    def _upstream_tls_wanted(self) -> bool:
        """Whether this upstream connection is in clear and --upstream-tls wants it not to be."""
        return self.config.upstream_tls != "none" and self._upstream_tls is None and not self._upstream_tls_given_up

    def _in_upstream_handshake(self) -> bool:
        return self._outstanding is not None and self._outstanding.exchange in (UPSTREAM_TLS, REPLAY_UPSTREAM_TLS)

    def _upstream_tls_required(self) -> bool:
        return self.config.upstream_tls in ("encrypt", "verify") and self._upstream_tls is None

    def _starttls_due(self, upstream_reply: Reply) -> str:
        """"+": use the STARTTLS this EHLO reply offers; "-": TLS is required and it has
        none; "": neither (TLS is up, not wanted, or the reply is not a 2xx)."""
        if upstream_reply.code // 100 != 2 or not self._upstream_tls_wanted():
            return ""
        if "STARTTLS" in offered(upstream_reply):
            return "+"
        return "-" if self._upstream_tls_required() else ""

    def _then_upstream_starttls(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        replay = pending.exchange in REPLAY
        self._send(REPLAY_STARTTLS if replay else UPSTREAM_STARTTLS, b"", b"STARTTLS")

    def _then_upstream_tls(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        # Anything after the 220 came in clear, before TLS: a reply to a command sent
        # inside TLS must never be taken from it (response injection, CVE-2011-1575 style).
        if octets := self._replies.discard():
            self._log(L.UPSTREAM_BYTES_AFTER_STARTTLS, octets=octets)
        self._expect(REPLAY_UPSTREAM_TLS if pending.exchange is REPLAY_STARTTLS else UPSTREAM_TLS)
        self._emit(UpstreamStartTls())

    def _upstream_tls_established(self, info: TlsInfo) -> None:
        pending = self._outstanding
        if pending is None or pending.exchange not in (UPSTREAM_TLS, REPLAY_UPSTREAM_TLS):
            return  # not asked for (a shell bug, or the session failed meanwhile)
        self._outstanding = None
        self._upstream_tls = info
        self._log(L.UPSTREAM_TLS_ESTABLISHED, version=info.version, cipher=info.cipher)
        # The session starts over inside TLS (RFC 3207 §4.2): EHLO again.
        if pending.exchange is REPLAY_UPSTREAM_TLS:
            self._replay_hello()
        else:
            self._hello_again()
        self._advance()

    def _hello_again(self) -> None:
        """The client's EHLO (or HELO, probed with EHLO) again: its reply is the one it sees."""
        assert self._hello_request is not None
        exchange, argument = self._hello_request
        self._send(EHLO if exchange is EHLO else HELO_PROBE, argument, _hello_line(b"EHLO", argument), exchange.name)

    def _then_hello_again(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        self._hello_again()

    def _upstream_tls_failed(self, reason: str) -> None:
        pending = self._outstanding
        if pending is None or pending.exchange not in (UPSTREAM_TLS, REPLAY_UPSTREAM_TLS):
            return
        replay = pending.exchange is REPLAY_UPSTREAM_TLS
        self._drop_upstream()
        self._no_upstream_tls(f"TLS handshake failed: {reason}", replay)
        if self._mode is not CLOSED:  # may: a new connection, in clear
            self._connect_upstream(REPLAY_GREETING if replay else CLEAR_GREETING)
        self._advance()

    def _no_upstream_tls(self, reason: str, replay: bool) -> None:
        """No TLS on this upstream connection: with may, say so and go on in clear; with
        encrypt and verify, fail closed."""
        if self.config.upstream_tls == "may":
            self._upstream_tls_given_up = True
            self._log(L.UPSTREAM_TLS_FAILED, reason=reason, action="clear")
            return
        self._log(L.UPSTREAM_TLS_FAILED, reason=reason, action="closed")
        self._fail(UPSTREAM_TLS_UNAVAILABLE, f"no TLS with the upstream: {reason}", in_flight=not replay)

    def _then_upstream_tls_missing(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        reason = f"STARTTLS not offered ({pending.exchange.name} {upstream_reply.code})"
        self._no_upstream_tls(reason, pending.exchange in REPLAY)

    def _then_upstream_starttls_refused(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        replay = pending.exchange in REPLAY
        self._no_upstream_tls(f"STARTTLS refused ({upstream_reply.code} {upstream_reply.text})", replay)
        if self._mode is not CLOSED:  # may: the same connection goes on in clear
            self._replay_hello() if replay else self._hello_again()

    def _then_clear_greeting_failed(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        reason = f"upstream refused the reconnection in clear ({upstream_reply.code})"
        self._fail(UNAVAILABLE, reason)

    def _then_reply_during_tls(self, pending: _Outstanding, upstream_reply: Reply) -> None:
        self._unsolicited(upstream_reply)

    def _unsolicited(self, upstream_reply: Reply | None) -> None:
        """A reply to nothing (None: the start of one): a 421 shutdown notice (RFC 5321
        §3.8), or a broken peer, whose next reply would be taken for the next command's."""
        self._abandon_message("upstream replied during the message")
        if upstream_reply is not None and upstream_reply.code == 421:
            self._hold(upstream_reply)  # after what is held: one write
            self._fail(None, "upstream sent 421 unprompted")
        else:
            self._fail(UPSTREAM_BROKE_PROTOCOL, "unsolicited reply")

    # -- message content -------------------------------------------------------------

    def _read_content(self) -> None:
        message = self._message
        assert message is not None
        content = self._input.read_content(message.unstuffer)
        framed = b""  # content for the upstream; sent with the terminator if this is the end
        if content:
            message.headers.feed(content)
            if self.config.max_message_size and message.unstuffer.size > self.config.max_message_size:
                message.stuffer.refuse(TOO_BIG_REASON)
            framed = message.stuffer.frame(content)
            if message.stuffer.refused and self._upstream != "none":
                # Part of the message is upstream already; only dropping the connection
                # without a final dot keeps it from being delivered. At once: an upstream
                # left waiting mid-message might time out before the client's end.
                self._drop_upstream()
        if not message.unstuffer.done:
            if framed:
                self._emit(ToUpstream(framed))
            if self._client_eof:
                self._abandon_message("client closed the connection before the end of the message")
                self._fail(NOT_COMPLETED, "client closed the connection before the end of the message")
            return
        self._message = None
        self._mode = READING_COMMANDS
        if self._transaction is not None:
            message.headers.finish()
            self._transaction.size = message.unstuffer.size
            self._transaction.message_id = message.headers.message_id
        end = b"" if message.stuffer.refused else message.stuffer.finish()
        if message.stuffer.refused:  # also by finish(): a last bare CR under the reject policy
            self._drop_upstream()
            self._refuse_message(message.stuffer.refused)
            return
        self._expect(END_OF_DATA)
        self._emit(ToUpstream(framed + end))  # the last of the content and the terminator: one write

    def _refuse_message(self, reason: str) -> None:
        """pipeproxy refused a message and dropped its upstream connection.

        The client's session goes on over a new upstream connection, greeted as the old
        one was; an authenticated session cannot be replayed (pipeproxy keeps no
        credentials), so it ends.
        """
        refusal = TOO_BIG if reason == TOO_BIG_REASON else BARE_LINE_ENDING
        self._end_transaction(refusal, f"refused: {reason}")
        if self._authenticated or self._hello is None:
            self._fail(refusal, f"message refused: {reason}")
            return
        self._answer(refusal, groupable=False)
        self._log(L.UPSTREAM_RECONNECTING, reason=f"message refused: {reason}")
        self._connect_upstream(REPLAY_GREETING)

    def _drop_upstream(self) -> None:
        if self._upstream != "none":
            self._upstream = "none"
            self._emit(DropUpstream())
            self._replies.clear()

    def _connect_upstream(self, greeting: Exchange) -> None:
        self._upstream = "connecting"
        self._upstream_tls = None
        self._xclient = "unknown" if self.config.xclient == "auto" else "none"
        self._xforward_attributes = None
        self._expect(greeting)
        self._emit(ConnectUpstream())

    def _abandon_message(self, reason: str) -> None:
        """Say so if a message on its way will not be completed (no final dot)."""
        if self._message is not None:
            self._message = None
            self._log(L.MESSAGE_ABANDONED, reason=reason)

    # -- deadlines ---------------------------------------------------------------------

    def _tick(self) -> None:
        now = self._now
        if self._held and now >= self._held_since + self.config.hold_time:
            self._flush()
        if now < self._deadline():
            return
        if self._outstanding is not None:
            name = self._outstanding.exchange.name
            self._abandon_message(f"upstream timed out ({name})")
            self._fail(UPSTREAM_TIMED_OUT, f"upstream timed out ({name})")
        elif self._message is not None:
            self._abandon_message("timed out waiting for message content")
            self._fail(NOT_COMPLETED, "timed out waiting for message content")
        elif self._client_wait_since is not None:
            self._hold(reply(421, "4.4.2 Error: timeout exceeded, closing connection"))
            self._close("client idle timeout")

    # -- output ----------------------------------------------------------------------

    def _hold(self, answer: Reply) -> None:
        if not self._held:
            self._held_since = self._now
        self._held.append(answer)

    def _answer(self, answer: Reply, groupable: bool) -> None:
        """Hold a reply; send the group unless more of it may follow (RFC 2920 §3.2)."""
        self._hold(answer)
        if not groupable or not self._input.has_line():
            self._flush()

    def _flush(self) -> None:
        """Send every held reply in one write (RFC 2920 §3.2 rule 4)."""
        if not self._held:
            return
        self._groups += 1
        if self._transaction is not None:
            self._transaction.groups.append(len(self._held))
        self._emit(ToClient(tuple(self._held)))
        self._held.clear()

    def _fail(
        self,
        notice: Reply | None,
        reason: str,
        in_flight: bool | None = None,
        clean: bool = False,
        owed: Reply = UNAVAILABLE,
    ) -> None:
        """Answer every command still owed a reply, in order, then close.

        ``notice`` answers the exchange in flight (the greeting, a command, a message),
        or, with ``in_flight`` false, the oldest command waiting in the input, or stands
        alone as the closing notice of RFC 5321 §3.8; every other complete command still
        waiting in the input then gets ``owed``. By default something is in flight
        unless the upstream is being greeted again, which no client command waits for.
        """
        if in_flight is None:
            in_flight = self._outstanding is None or self._outstanding.exchange not in REPLAY
        # Mid-message the input is content (an undecided tail of it), not commands.
        lines = 0 if self._mode is READING_CONTENT else self._input.count_lines()
        if notice is not None:
            self._transcript("to client", code=notice.code, text=notice.text)
            self._hold(notice)
            lines -= 0 if in_flight or not lines else 1
        for _ in range(lines):
            self._hold(owed)
        self._outstanding = None
        self._end_transaction(None, reason)
        self._close(reason, clean)

    def _close(self, reason: str, clean: bool = False) -> None:
        if not self._client_lost:
            self._flush()
        self._mode = CLOSED
        self._emit_closed(reason, clean)

    def _emit_closed(self, reason: str, clean: bool) -> None:
        self._emit(
            Log(
                "info" if clean else "warning",
                L.SESSION_CLOSED.name,
                {
                    "reason": reason,
                    "duration": round(self._now - self._started, 6),
                    "commands": self.commands,
                    "messages": self.messages,
                },
            )
        )
        self._emit(Close(reason, clean))

    def _end_transaction(self, final: Reply | None, outcome: str) -> None:
        transaction = self._transaction
        if transaction is None:
            return
        self._transaction = None
        # A write of replies still being gathered counts as it stands.
        held = len(self._held)
        self._log(L.TRANSACTION, **transaction.log_fields(final, outcome, held, self._tls))

    def _log(self, event: L.LogEvent, **fields: Any) -> None:
        self._emit(Log(event.level, event.name, fields))

    def _emit(self, action: Action) -> None:
        self._actions.append(action)


# The steps TRANSITIONS names, by name: found once here, not by getattr at each reply.
# They are Session's own: a subclass's override of a step is not seen (a test that needs
# a step to fail replaces it in this table).
_STEPS: Final[dict[str, Callable[[Session, _Outstanding, Reply], None]]] = {
    name.removeprefix("_then_"): step for name, step in vars(Session).items() if name.startswith("_then_")
}


def _over(digits: str, limit: int) -> bool:
    """Whether a decimal number is above ``limit``, without int() of thousands of digits."""
    digits = digits.lstrip("0")
    return len(digits) > len(str(limit)) or (len(digits) == len(str(limit)) and int(digits) > limit)


def _hello_line(verb: bytes, argument: bytes) -> bytes:
    """A HELO or EHLO line of pipeproxy's own, with the client's argument as it sent it."""
    return verb + b" " + argument if argument else verb
