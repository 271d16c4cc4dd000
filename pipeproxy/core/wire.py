"""Bytes to SMTP lines and replies, and message content framed and unframed.

Theory of operation: nothing here does I/O. Each side has one receive buffer:

* ``ClientInput`` holds everything the client sent that is not consumed yet. The session
  chooses the reader by its state (like h11's ``READERS``): ``next_line`` for a command
  or a SASL line, ``read_content`` with an ``Unstuffer`` while a message is coming. Bytes
  after the end of a message simply stay in the buffer for the next reader: nothing is
  handed from one reader to another.
* ``ReplyReader`` cuts upstream output into complete, possibly multi-line, replies
  (RFC 5321 §4.2.1), keeping each line's octets as they came (only the line end is made
  CRLF), so a relayed reply is the upstream's, trailing spaces and all.

Message content is unframed and framed by two separate pieces, so that a later BDAT to
DATA translation can reuse the framing toward the upstream:

* ``Unstuffer`` undoes the client's DATA framing: its line ``.`` is the only end, and
  its stuffed dots are removed (RFC 5321 §4.5.2).
* ``Stuffer`` frames content for the upstream: canonical CRLF lines, every leading dot
  stuffed, and one terminator that pipeproxy writes. No bare CR/LF/NUL the client sends
  can end the message early (SMTP smuggling, CVE-2023-51764..51766).

Errors say which side broke the protocol: ``ClientError`` (the client gets its reply and
the session goes on) and ``UpstreamError`` (the upstream cannot be trusted any more).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

CRLF: Final = b"\r\n"

# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets, CRLF included, "unless an
# extension raises it"; a legal RCPT with an RFC 3461 ORCPT runs to about 1,000. 2048 is
# Postfix's line_length_limit.
DEFAULT_MAX_COMMAND_LINE: Final = 2048
# RFC 4954 §4: SASL exchanges may send lines of up to 12288 octets.
MAX_AUTH_LINE: Final = 12288
# RFC 5321 §4.5.3.1.5 says 512 for a reply line; real MTAs exceed it, and EHLO replies
# run to many lines, so pipeproxy bounds a whole reply instead, generously.
DEFAULT_MAX_REPLY_SIZE: Final = 16 * 1024


@dataclass(frozen=True, slots=True, init=False)
class Reply:
    """One complete SMTP reply: its code and the text of each line after the separator.

    ``raw`` is the reply as the upstream sent it (with CRLF line ends), when it came from
    the upstream; a reply pipeproxy builds or rewrites has none and is serialised from
    its lines.
    """

    code: int
    lines: tuple[str, ...]
    raw: bytes = field(compare=False, repr=False)

    # Written out for the compiled core: mypyc compiles this one, where a dataclass's
    # generated __init__ stays interpreted (five times slower); object.__setattr__ is
    # how a frozen dataclass sets its own fields.
    def __init__(self, code: int, lines: tuple[str, ...], raw: bytes = b"") -> None:
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "lines", lines)
        object.__setattr__(self, "raw", raw)

    def serialise(self) -> bytes:
        if self.raw:
            return self.raw
        last = len(self.lines) - 1
        return b"".join(
            f"{self.code}{' ' if i == last else '-'}{text}".encode("utf-8", "surrogateescape") + CRLF
            for i, text in enumerate(self.lines)
        )

    @property
    def text(self) -> str:
        return " ".join(line.strip() for line in self.lines)


def reply(code: int, *lines: str) -> Reply:
    """A reply that pipeproxy itself gives."""
    return Reply(code, lines or ("",))


class ClientError(Exception):
    """The client broke the protocol; it is told ``reply`` and the session goes on."""

    def __init__(self, reply: Reply, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason


UPSTREAM_BROKE_PROTOCOL: Final = reply(421, "4.4.2 Upstream server broke the protocol, closing connection")


class UpstreamError(Exception):
    """The upstream broke the protocol: nothing more it says can be trusted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reply = UPSTREAM_BROKE_PROTOCOL
        self.reason = reason


def mailbox(argument: str) -> str:
    """The path of a MAIL or RCPT argument, ``FROM:<addr> PARAMS``, without brackets."""
    _, _, rest = argument.partition(":")
    rest = rest.strip()
    if rest.startswith("<") and ">" in rest:
        return rest[1 : rest.find(">")]
    return rest.split(" ", 1)[0]


LINE_TOO_LONG: Final = reply(500, "5.5.2 Error: line too long")
BARE_LF: Final = reply(500, "5.5.2 Error: bare <LF> received")
BARE_CR_OR_NUL: Final = reply(500, "5.5.2 Error: bare <CR> or NUL in command line")


class ClientInput:
    """The client's receive buffer, bounded by the session, read by whichever reader fits.

    Command lines: only CRLF ends a line; a line carrying a bare CR, a bare LF or a NUL
    is refused whole, because a lenient upstream would read such a line as two commands
    (RFC 5321 §2.3.8). An overlong line is discarded up to its end and reported once, so
    the session can go on (§4.5.3.1.4).
    """

    def __init__(self, max_line: int = DEFAULT_MAX_COMMAND_LINE) -> None:
        self.max_line = max_line
        self._buffer = bytearray()
        self._discarding = False

    def feed(self, data: bytes | bytearray) -> None:
        self._buffer += data

    def __len__(self) -> int:
        return len(self._buffer)

    def discard(self) -> int:
        """Forget everything buffered (plaintext after STARTTLS); how many octets."""
        octets = len(self._buffer)
        self._buffer.clear()
        self._discarding = False
        return octets

    def count_lines(self) -> int:
        """How many complete lines are buffered: the commands still owed a reply."""
        return self._buffer.count(b"\n")

    def _limit(self, sasl: bool) -> int:
        # AUTH and the SASL lines after it may be long (RFC 4954 §4); the rest may not.
        if sasl or self._buffer[:5].upper() == b"AUTH ":
            return max(self.max_line, MAX_AUTH_LINE)
        return self.max_line

    def has_line(self) -> bool:
        """Whether a complete line (or one to refuse) is waiting."""
        size = len(self._buffer)
        # An octet's presence is asked as ``10 in buffer``, with an integer: a memchr. With
        # a bytes operand ``in`` first tries it as an integer, raising and clearing a
        # TypeError each call; ``find`` parses its arguments as a tuple (1,000 instructions).
        return 10 in self._buffer or (size >= self.max_line and size >= self._limit(sasl=False))

    def next_line(self, sasl: bool = False) -> bytes | None:
        """The next line without its CRLF, None if incomplete; ClientError if bad.

        ``sasl``: the line answers an AUTH challenge, so the longer SASL limit applies.
        """
        end = self._buffer.find(b"\n")
        # The limit is never below max_line: only a line that long needs it worked out.
        limit = self.max_line if len(self._buffer) < self.max_line else self._limit(sasl)
        if end < 0:
            if len(self._buffer) >= limit:
                # Too long already: drop what we have and keep dropping to the end of
                # the line, holding nothing, then report once (below).
                self._buffer.clear()
                self._discarding = True
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        if self._discarding or end + 1 > limit:
            self._discarding = False
            raise ClientError(LINE_TOO_LONG, "command line too long")
        if not line.endswith(b"\r"):
            raise ClientError(BARE_LF, "bare LF in command line")
        line = line[:-1]
        if 13 in line or 0 in line:  # CR, NUL (octets as integers: see has_line)
            raise ClientError(BARE_CR_OR_NUL, "bare CR or NUL in command line")
        return line

    def read_content(self, unstuffer: Unstuffer) -> bytes:
        """Message content decided so far, taken from the buffer (see ``Unstuffer``)."""
        content, consumed = unstuffer.unframe(self._buffer)
        del self._buffer[:consumed]
        return content


class ReplyReader:
    """Upstream output cut into complete replies, each bounded in size."""

    def __init__(self, max_size: int = DEFAULT_MAX_REPLY_SIZE) -> None:
        self.max_size = max_size
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._raw: list[bytes] = []
        self._code: int | None = None
        self._size = 0  # octets of the reply being read, lines already taken included

    def feed(self, data: bytes | bytearray) -> None:
        self._buffer += data

    def pending(self) -> bool:
        """Whether any part of a reply has arrived and not been returned yet."""
        return bool(self._buffer) or bool(self._lines)

    def discard(self) -> int:
        """Forget what has arrived and not been returned; how many octets it was."""
        octets = len(self._buffer) + sum(len(raw) for raw in self._raw)
        self.clear()
        return octets

    def clear(self) -> None:
        """Forget everything: the connection it came from is gone."""
        self._buffer.clear()
        self._lines, self._raw, self._code, self._size = [], [], None, 0

    def next_reply(self) -> Reply | None:
        if not self._buffer:  # the common case between replies: nothing has arrived
            return None
        while True:
            end = self._buffer.find(b"\n")
            if self._size + (len(self._buffer) if end < 0 else end + 1) > self.max_size:
                raise UpstreamError("reply too long")
            if end < 0:
                return None
            if end + 1 == len(self._buffer):  # the usual: what arrived is one whole line
                line = bytes(self._buffer)
                self._buffer.clear()
            else:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
            crlf = line.endswith(b"\r\n")
            raw = line[:-2] if crlf else line[:-1]
            code, last, text = _parse_reply_line(raw)
            if last and not self._lines:  # a one-line reply, nearly every reply: as it came
                return Reply(code, (text,), line if crlf else raw + CRLF)
            self._size += end + 1
            if self._code is not None and code != self._code:
                raise UpstreamError("multi-line reply changes its code")
            self._code = code
            self._lines.append(text)
            self._raw.append(raw + CRLF)
            if last:
                complete = Reply(code, tuple(self._lines), b"".join(self._raw))
                self._lines, self._raw, self._code, self._size = [], [], None, 0
                return complete


def _parse_reply_line(raw: bytes) -> tuple[int, bool, str]:
    """(code, is last line, text) of one reply line; RFC 5321 §4.2.

    Well formed: a code of 2xx to 5xx, then nothing, or " " or "-" and a text with no CR
    or NUL. Checked octet by octet, as integers: compiled, that costs a tenth of what a
    regular expression's match (and int() of its group) did, for each of the upstream's
    replies."""
    size = len(raw)
    if size < 3 or not (50 <= raw[0] <= 53 and 48 <= raw[1] <= 57 and 48 <= raw[2] <= 57):
        raise UpstreamError("malformed reply line")
    separator = raw[3] if size > 3 else 32
    if separator != 32 and separator != 45:  # " ", "-"
        raise UpstreamError("malformed reply line")
    if 13 in raw or 0 in raw:  # CR, NUL (octets as integers: see ClientInput.has_line)
        raise UpstreamError("control character in reply")
    code = (raw[0] - 48) * 100 + (raw[1] - 48) * 10 + raw[2] - 48
    return code, separator != 45, raw[4:].decode("utf-8", "surrogateescape")


_END_OF_DATA: Final = b"\r\n.\r\n"


def _undecided_tail(text: bytes) -> int:
    """How many final octets of ``text`` could be the start of CRLF "." CRLF."""
    for keep in (4, 3, 2, 1):
        if text.endswith(_END_OF_DATA[:keep]):
            return keep
    return 0


class Unstuffer:
    """The client's DATA framing undone: content out, its end found (RFC 5321 §4.5.2).

    Works on the client's buffer in place: ``unframe`` says how much of it is decided
    content; an undecided tail (what may yet become CRLF "." CRLF) stays in the buffer,
    and so does everything after the end, for the command reader. ``done`` once the end
    is seen; ``size`` counts content octets.
    """

    def __init__(self) -> None:
        self.done = False
        self.size = 0
        # The buffer starts right after the DATA command's CRLF: a line start, so a "."
        # there is special. That CRLF is put in front while nothing has been consumed.
        self._at_start = True

    def unframe(self, buffer: bytearray) -> tuple[bytes, int]:
        """(content, octets of ``buffer`` consumed)."""
        prefix = CRLF if self._at_start else b""
        text = prefix + buffer
        end = text.find(_END_OF_DATA)
        if end >= 0:
            self.done = True
            decided, consumed = end + 2, end + 5
        else:
            decided = consumed = len(text) - _undecided_tail(text)
        if consumed <= len(prefix):
            return b"", 0  # nothing decided beyond the line start we put there
        # Every line start follows a CRLF, so the client's stuffed dots are the "." after
        # each CRLF: found with bytes methods, not a loop per line.
        content = bytes(text[:decided]).replace(b"\r\n.", CRLF)
        if self._at_start:
            self._at_start = False
            content = content[2:]
        self.size += len(content)
        return content, consumed - len(prefix)


# Every line break a lenient MTA might honour: CRLF, bare CR, bare LF.
_LINE_BREAKS: Final = re.compile(rb"\r\n|\r|\n")


def _has_bare(data: bytes) -> bool:
    """Whether ``data`` holds a CR or LF outside a CRLF, or a NUL.

    Counting in C is several times faster than a regular expression with a lookbehind,
    and this runs over every octet of every message.
    """
    pairs = data.count(CRLF)
    return data.count(b"\r") != pairs or data.count(b"\n") != pairs or 0 in data


BARE_IN_CONTENT: Final = "bare CR, LF or NUL in content"


class Stuffer:
    """Content framed for the upstream: CRLF lines, leading dots stuffed, our terminator.

    ``frame`` returns the bytes to send now. With ``reject_bare`` false, bare CR and bare
    LF become CRLF and NUL is dropped; with it true, the first such byte refuses the
    message. Once ``refused`` (by that, or by the caller through ``refuse``), nothing
    more is produced, and the caller must not let the message be delivered. A CR at the
    end of one piece is held until the next shows whether an LF follows it.
    """

    def __init__(self, reject_bare: bool = False) -> None:
        self.reject_bare = reject_bare
        self.refused: str | None = None  # why the message must not be delivered
        self._line_start = True
        self._held_cr = b""

    def refuse(self, reason: str) -> None:
        self.refused = self.refused or reason

    def frame(self, data: bytes) -> bytes:
        if self.refused or not (data := self._held_cr + data):
            return b""
        self._held_cr = b""
        if data.endswith(b"\r"):
            data, self._held_cr = data[:-1], b"\r"
        return self._frame(data)

    def finish(self) -> bytes:
        """The rest of the content and the terminator pipeproxy writes."""
        assert not self.refused
        tail = self._frame(self._held_cr)
        self._held_cr = b""
        if self.refused:
            return b""
        return tail + (b".\r\n" if self._line_start else b"\r\n.\r\n")

    def _frame(self, data: bytes) -> bytes:
        if not data:
            return b""
        if _has_bare(data):
            if self.reject_bare:
                self.refuse(BARE_IN_CONTENT)
                return b""
            # Line breaks first, NUL after: a NUL between CR and LF must not join them
            # into one CRLF, or the result would depend on where the input was cut.
            data = _LINE_BREAKS.sub(CRLF, data).replace(b"\x00", b"")
            if not data:
                return b""
        if self._line_start and data.startswith(b"."):
            data = b"." + data
        data = data.replace(b"\r\n.", b"\r\n..")
        self._line_start = data.endswith(CRLF)
        return data
