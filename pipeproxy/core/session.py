"""The proxy's state machine for one client and its upstream, with no I/O.

Theory of operation. The shell (proxy.py) feeds in what arrives: ``client_data``,
``upstream_data``, ``client_closed``, ``upstream_closed``, ``upstream_failed``,
``timed_out``, and, when pipeproxy stops, ``drain`` and ``shut_down``. Each returns
the actions to carry out, in order: ``ToClient``, ``ToUpstream``, ``Log`` and, last,
``Close``. The session keeps one clock (a callable given by the shell) for its deadlines,
exposed as ``deadline``.

Toward the upstream it is strictly lock-step: at most one command is outstanding, and
nothing is sent before the complete greeting (RFC 2920 §1 on why legacy servers break).
Client input is held, unparsed, while a reply is outstanding (like h11's PAUSED), and is
cut into the next command only once that reply is in. Toward the client it is a
PIPELINING server (RFC 2920 §3.2): replies go out in order; replies to RSET, MAIL and
RCPT are held and sent together; the reply to any other command, and everything pending
whenever no complete command waits in the input, is flushed in one write.

After the upstream's ``354``, client input goes through ``BodyReframer`` to the upstream
as it arrives, and the terminator is pipeproxy's own. A client that vanishes before its
terminator never gets its message completed: the upstream is closed without a final dot.
If the upstream fails, every command still owed a reply gets a ``421`` in order, then
the session closes: the client never sees a success the upstream did not give.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .ehlo import ehlo_from_helo, rewrite_ehlo
from .config import BareLineEndings, Config
from .wire import CRLF, BodyReframer, CommandReader, ProtocolError, Reply, ReplyReader, mailbox, reply

# RFC 2920 §3.1: these may appear anywhere in a group; their replies may be held.
GROUPABLE = frozenset({"RSET", "MAIL", "RCPT", "SEND", "SOML", "SAML"})
# Never forwarded: the proxy would go blind inside TLS (RFC 3207), or could not frame
# BDAT chunks (RFC 3030). Neither is advertised, so a client sending them gets 502.
REFUSED = {
    "STARTTLS": reply(502, "5.5.1 Error: STARTTLS is not available through this proxy"),
    "BDAT": reply(502, "5.5.1 Error: BDAT is not available through this proxy"),
}
UNAVAILABLE = reply(421, "4.4.2 Upstream server unavailable, closing connection")
SHUTTING_DOWN = reply(421, "4.3.2 Service shutting down, closing connection")
TOO_MANY_RECIPIENTS = reply(452, "4.5.3 Error: too many recipients")
TOO_BIG = Reply(552, ("5.3.4 Message size exceeds fixed maximum message size",))
TOO_BIG_REASON = "message too big"
BARE_LINE_ENDING = Reply(550, ("5.6.0 Message refused: bare CR, LF or NUL in content",))
# RFC 1870 §3: the SIZE parameter of MAIL FROM declares the message size in octets.
_SIZE_PARAMETER = re.compile(r"\sSIZE=(\d+)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class ToClient:
    data: bytes


@dataclass(frozen=True, slots=True)
class ToUpstream:
    data: bytes


@dataclass(frozen=True, slots=True)
class Log:
    level: str
    event: str
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Close:
    """End the session: close both connections. The upstream never sees a final dot."""

    reason: str
    clean: bool  # the client quit or hung up between commands; nothing went wrong


Action = ToClient | ToUpstream | Log | Close


class Mode(enum.Enum):
    COMMAND = "command"  # the next client line is an SMTP command
    SASL = "sasl"  # the next client line answers an AUTH 334 challenge
    BODY = "body"  # client input is message content
    CLOSED = "closed"


@dataclass(slots=True)
class _Outstanding:
    """The one command sent upstream whose reply has not arrived yet."""

    verb: str  # "GREETING" for the banner, "." for the end of a message
    argument: str
    sent_at: float
    deadline: float


@dataclass(slots=True)
class _Transaction:
    """One mail transaction, MAIL to its final reply, for the canonical log line."""

    sender: str
    recipients: int = 0  # RCPT commands sent upstream
    accepted: int = 0
    rejected: int = 0
    size: int = 0
    upstream_wait: float = 0.0
    groups: list[int] = field(default_factory=list)


class Session:
    def __init__(self, config: Config, clock: Callable[[], float]) -> None:
        self.config = config
        self._clock = clock
        self._debug = config.log_level == "debug"
        self._commands = CommandReader(config.max_line_length)
        self._replies = ReplyReader(config.max_reply_size)
        self._body: BodyReframer | None = None
        self._mode = Mode.COMMAND
        self._actions: list[Action] = []
        self._held: list[bytes] = []  # replies not yet sent to the client
        self._groups = 0  # writes of replies to the client so far
        self._transaction: _Transaction | None = None
        self._client_eof = False
        self._draining = False
        self._client_wait_since: float | None = None
        self._body_started = self._body_last = 0.0
        self._body_received = 0  # client octets since 354, for the minimum data rate
        now = clock()
        self._outstanding: _Outstanding | None = _Outstanding("GREETING", "", now, now + config.timeouts.greeting)
        self.commands = 0  # command lines received from the client
        self.messages = 0  # messages the upstream accepted

    # -- inputs ----------------------------------------------------------------------

    def client_data(self, data: bytes) -> list[Action]:
        if self._mode is Mode.BODY:
            self._stream_body(data)
        elif self._mode is not Mode.CLOSED:
            self._commands.feed(data)
        self._advance()
        return self._take_actions()

    def upstream_data(self, data: bytes) -> list[Action]:
        if self._mode is not Mode.CLOSED:
            self._replies.feed(data)
            self._advance()
        return self._take_actions()

    def client_closed(self) -> list[Action]:
        """The client sent EOF: commands already complete still run, then we close."""
        self._client_eof = True
        if self._mode is Mode.BODY:
            self._abort_body("client closed the connection before the end of the message")
        self._advance()
        return self._take_actions()

    def upstream_closed(self) -> list[Action]:
        if self._mode is not Mode.CLOSED:
            self._fail(reply(421, "4.4.2 Upstream server closed the connection"), "upstream closed the connection")
        return self._take_actions()

    def upstream_failed(self, reason: str) -> list[Action]:
        """The upstream could not be reached, or its connection broke."""
        if self._mode is not Mode.CLOSED:
            self._fail(UNAVAILABLE, reason)
        return self._take_actions()

    def drain(self) -> list[Action]:
        """pipeproxy is stopping: the transaction in progress may finish; then 421, close."""
        self._draining = True
        self._advance()
        return self._take_actions()

    def shut_down(self) -> list[Action]:
        """The grace period is over: 421 now, whatever is in progress (no final dot)."""
        if self._mode is not Mode.CLOSED:
            if self._mode is Mode.BODY:
                self._log("warning", "message abandoned, upstream closed without final dot", reason="shutdown")
            self._fail(SHUTTING_DOWN, "pipeproxy shut down")
        return self._take_actions()

    def timed_out(self) -> list[Action]:
        """``deadline`` passed with nothing arriving that moved the session on."""
        if self._mode is Mode.CLOSED:
            pass
        elif self._outstanding is not None:
            verb = self._outstanding.verb
            self._fail(reply(421, "4.4.2 Upstream server timed out, closing connection"), f"upstream timed out ({verb})")
        elif self._mode is Mode.BODY:
            self._abort_body("timed out waiting for message content")
        else:
            self._hold(reply(421, "4.4.2 Error: timeout exceeded, closing connection"))
            self._close("client idle timeout")
        return self._take_actions()

    # -- what the shell asks ---------------------------------------------------------

    @property
    def deadline(self) -> float:
        """When ``timed_out`` is due, on the session's clock."""
        if self._outstanding is not None:
            return self._outstanding.deadline
        if self._mode is Mode.BODY:
            # RFC 5321 §4.5.3.2.5 per block, and a minimum rate over the whole message.
            deadline = self._body_last + self.config.timeouts.data_block
            if self.config.min_data_rate:
                allowance = self._body_received / self.config.min_data_rate
                deadline = min(deadline, self._body_started + self.config.timeouts.data_block + allowance)
            return deadline
        if self._client_wait_since is not None:
            return self._client_wait_since + self.config.timeouts.client_idle
        return float("inf")

    def client_room(self) -> int:
        """How many more client bytes may be held; at 0 the shell stops reading."""
        if self._mode is Mode.CLOSED:
            return 0
        return max(0, self.config.max_pipeline_bytes - len(self._commands))

    # -- the machine -----------------------------------------------------------------

    def _advance(self) -> None:
        """Run as far as the input allows, one upstream command at a time."""
        while self._mode is not Mode.CLOSED:
            try:
                upstream_reply = self._replies.next_reply()
            except ProtocolError as error:
                self._fail(error.reply, f"upstream sent bad reply: {error.reason}")
                return
            if upstream_reply is not None:
                if self._outstanding is None:
                    self._unsolicited(upstream_reply)
                    return
                self._on_reply(upstream_reply)
                continue
            if self._outstanding is not None or self._mode is Mode.BODY:
                return
            if self._draining and self._transaction is None and self._mode is Mode.COMMAND:
                self._fail(SHUTTING_DOWN, "pipeproxy draining", in_flight=False, clean=True)
                return
            try:
                line = self._commands.next_line(sasl=self._mode is Mode.SASL)
            except ProtocolError as error:
                self.commands += 1
                self._refuse("", error.reply, error.reason)
                continue
            if line is None:
                self._flush()
                if self._client_eof:
                    self._close("client closed the connection", clean=True)
                elif self._client_wait_since is None:
                    self._client_wait_since = self._clock()
                return
            self._client_wait_since = None
            self._on_line(line)

    def _on_line(self, line: bytes) -> None:
        if self._mode is Mode.SASL:
            # A SASL response, not a command: relayed, never logged (RFC 4954 §4).
            self._send_command("AUTH", "", line)
            return
        self.commands += 1
        text = line.decode("utf-8", "surrogateescape")
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        if verb in REFUSED:
            self._refuse(verb, REFUSED[verb], "not relayable")
            return
        transaction = self._transaction
        if verb == "MAIL":
            self._end_transaction(None, "new MAIL command")
            declared = _SIZE_PARAMETER.search(argument)
            if self.config.max_message_size and declared and int(declared[1]) > self.config.max_message_size:
                self._refuse(verb, TOO_BIG.serialise(), "declared SIZE over the limit")
                return
            self._transaction = _Transaction(sender=mailbox(argument))
        elif verb == "RCPT" and transaction is not None:
            if transaction.recipients >= self.config.max_recipients:
                self._refuse(verb, TOO_MANY_RECIPIENTS, "too many recipients")
                return
            transaction.recipients += 1
        elif verb in ("RSET", "HELO", "EHLO", "QUIT"):
            self._end_transaction(None, f"{verb} command")
        self._send_command(verb, argument, line)

    def _refuse(self, verb: str, answer: bytes, reason: str) -> None:
        """Answer a command here, never forwarding it, and say why in the log."""
        self._log("info", "command refused", verb=verb or None, reason=reason)
        self._answer(answer, verb)

    def _send_command(self, verb: str, argument: str, line: bytes) -> None:
        now = self._clock()
        self._outstanding = _Outstanding(verb, argument, now, now + self._timeout_for(verb))
        self._emit(ToUpstream(line + CRLF))

    def _timeout_for(self, verb: str) -> float:
        timeouts = self.config.timeouts
        if verb == "RCPT":
            return timeouts.rcpt
        if verb == "MAIL":
            return timeouts.mail
        if verb == "DATA":
            return timeouts.data_init
        return timeouts.command

    def _on_reply(self, upstream_reply: Reply) -> None:
        pending = self._outstanding
        assert pending is not None
        self._outstanding = None
        waited = self._clock() - pending.sent_at
        verb, code = pending.verb, upstream_reply.code
        transaction = self._transaction
        if transaction is not None:
            transaction.upstream_wait += waited
        if self._debug and verb != "GREETING":
            # The group is the client write that will carry this reply.
            self._log("debug", "command", verb=verb, code=code, upstream_wait=round(waited, 6), group=self._groups + 1)

        outcome = None  # set when this reply ends the mail transaction
        if verb == "GREETING":
            self._log("info", "upstream greeting", code=code)
        elif verb == "EHLO" and code in (500, 502):
            # No ESMTP upstream (RFC 5321 §4.1.4): fall back to HELO, still answer EHLO.
            self._log("info", "upstream has no EHLO, falling back to HELO", code=code)
            self._send_command("HELO-FALLBACK", pending.argument, f"HELO {pending.argument}".rstrip().encode())
            return
        elif verb == "HELO-FALLBACK" and code == 250:
            upstream_reply = ehlo_from_helo(upstream_reply)
        elif verb == "EHLO" and code == 250:
            upstream_reply, dropped = rewrite_ehlo(
                upstream_reply, self.config.discard_ehlo_keywords, self.config.max_message_size
            )
            self._log("info", "ehlo rewritten", removed=list(dropped))
        elif verb == "AUTH" and code == 334:
            self._mode = Mode.SASL
        elif verb == "AUTH":
            self._mode = Mode.COMMAND
        elif transaction is not None and verb == "MAIL" and code >= 400:
            outcome = "MAIL refused"
        elif transaction is not None and verb == "RCPT":
            if code < 400:
                transaction.accepted += 1
            else:
                transaction.rejected += 1
        elif verb == "DATA" and code == 354:
            self._hold(upstream_reply.serialise())
            self._flush()
            self._start_body()
            return
        elif verb == "DATA":
            outcome = "DATA refused"
        elif verb == ".":
            self.messages += code < 400
            outcome = "message accepted" if code < 400 else "message refused"

        if code == 421:
            # The upstream is closing the channel (RFC 5321 §3.8): what is still queued
            # cannot be answered by it.
            self._hold(upstream_reply.serialise())
            self._fail(None, f"upstream answered {verb} with 421")
        elif verb == "QUIT":
            self._hold(upstream_reply.serialise())
            self._close("client quit", clean=True)
        else:
            self._answer(upstream_reply.serialise(), verb)
        if outcome:
            self._end_transaction(upstream_reply, outcome)

    def _unsolicited(self, upstream_reply: Reply) -> None:
        """A reply to nothing: a 421 shutdown notice (RFC 5321 §3.8) or a broken peer."""
        if upstream_reply.code == 421:
            self._hold(upstream_reply.serialise())  # after what is held: one write
            self._fail(None, "upstream sent 421 unprompted")
        else:
            self._fail(reply(421, "4.4.2 Upstream server broke the protocol, closing connection"), "unsolicited reply")

    # -- message content -------------------------------------------------------------

    def _start_body(self) -> None:
        self._mode = Mode.BODY
        self._body_started = self._clock()
        self._body_received = 0
        self._body = BodyReframer(reject_bare=self.config.bare_line_endings is BareLineEndings.REJECT)
        self._stream_body(self._commands.take_rest())
        if self._client_eof and self._mode is Mode.BODY:
            self._abort_body("client closed the connection before the end of the message")

    def _stream_body(self, data: bytes) -> None:
        body = self._body
        assert body is not None
        self._body_last = self._clock()
        self._body_received += len(data)
        if not data:
            return
        out = body.feed(data)
        if self.config.max_message_size and body.size > self.config.max_message_size:
            body.refuse(TOO_BIG_REASON)
        elif out:
            self._emit(ToUpstream(out))
        if not body.done:
            return
        self._mode = Mode.COMMAND
        self._body = None
        if self._transaction is not None:
            self._transaction.size = body.size
        self._commands.feed(body.leftover)
        if body.refused:
            # Part of the message is upstream already; only dropping the connection
            # without a final dot keeps it from being delivered.
            refusal = TOO_BIG if body.refused == TOO_BIG_REASON else BARE_LINE_ENDING
            self._end_transaction(refusal, f"refused: {body.refused}")
            self._fail(refusal.serialise(), f"message refused: {body.refused}")
            return
        now = self._clock()
        self._outstanding = _Outstanding(".", "", now, now + self.config.timeouts.data_end)
        self._emit(ToUpstream(body.finish()))

    def _abort_body(self, reason: str) -> None:
        self._log("warning", "message abandoned, upstream closed without final dot", reason=reason)
        self._end_transaction(None, reason)
        self._fail(reply(421, "4.4.2 Error: message not completed, closing connection"), reason)

    # -- output ----------------------------------------------------------------------

    def _hold(self, data: bytes) -> None:
        self._held.append(data)

    def _answer(self, data: bytes, verb: str) -> None:
        """Hold the reply to ``verb``; send the group unless more of it may follow."""
        self._hold(data)
        if verb not in GROUPABLE or not self._commands.has_line():
            self._flush()

    def _flush(self) -> None:
        """Send every held reply in one write (RFC 2920 §3.2 rule 4)."""
        if not self._held:
            return
        self._groups += 1
        if self._transaction is not None:
            self._transaction.groups.append(len(self._held))
        self._emit(ToClient(b"".join(self._held)))
        self._held.clear()

    def _fail(self, notice: bytes | None, reason: str, in_flight: bool = True, clean: bool = False) -> None:
        """Answer every command still owed a reply, in order, then close.

        ``notice`` answers the command in flight (the greeting, a command, a message),
        or, with ``in_flight`` false, the oldest command waiting in the input, or stands
        alone as the closing notice of RFC 5321 §3.8; every other complete command still
        waiting in the input then gets a 421 of its own.
        """
        owed = self._commands.count_lines()
        if notice is not None:
            self._hold(notice)
            owed -= 0 if in_flight or not owed else 1
        for _ in range(owed):
            self._hold(UNAVAILABLE)
        self._outstanding = None
        self._end_transaction(None, reason)
        self._close(reason, clean)

    def _close(self, reason: str, clean: bool = False) -> None:
        self._flush()
        self._mode = Mode.CLOSED
        self._emit(Close(reason, clean))

    def _end_transaction(self, final: Reply | None, outcome: str) -> None:
        transaction = self._transaction
        if transaction is None:
            return
        self._transaction = None
        self._log(
            "info",
            "transaction",
            sender=transaction.sender,
            recipients_accepted=transaction.accepted,
            recipients_rejected=transaction.rejected,
            size=transaction.size,
            reply_code=final.code if final else None,
            reply=final.text if final else None,
            outcome=outcome,
            upstream_wait=round(transaction.upstream_wait, 6),
            # replies per client write; a write still being gathered counts as it stands
            groups=transaction.groups + ([len(self._held)] if self._held else []),
        )

    def _log(self, level: str, event: str, **fields: Any) -> None:
        self._emit(Log(level, event, fields))

    def _emit(self, action: Action) -> None:
        self._actions.append(action)

    def _take_actions(self) -> list[Action]:
        actions, self._actions = self._actions, []
        return actions

