"""Bytes to SMTP lines and replies, and message bodies re-framed for the upstream.

Theory of operation: nothing here does I/O. Each reader keeps a bounded buffer, is fed
with ``feed(bytes)`` and asked for the next complete item, which is either returned,
``None`` ("need more data"), or a ``ProtocolError`` carrying the reply to send.

* ``CommandReader`` cuts client input into command lines. Only CRLF ends a line; a line
  carrying a bare CR, a bare LF or a NUL is refused whole, because a lenient upstream
  would read such a line as two commands (RFC 5321 §2.3.8). An overlong line is
  discarded up to its end and reported once, so the session can go on (§4.5.3.1.4).
* ``ReplyReader`` cuts upstream output into complete, possibly multi-line, replies
  (§4.2.1). It tolerates bare LF line ends, since the replies are re-serialised with CRLF.
* ``BodyReframer`` turns what the client sends after ``354`` into what the upstream
  receives: the client's framing is undone (its line ``.`` is the only end, §4.5.2), and
  pipeproxy frames the content again itself, so the upstream sees canonical CRLF lines,
  every leading dot stuffed, and exactly one terminator that pipeproxy wrote. No bare
  CR/LF/NUL sequence the client sends can end the message early (SMTP smuggling,
  CVE-2023-51764..51766).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CRLF = b"\r\n"

# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets, CRLF included, "unless an
# extension raises it"; a legal RCPT with an RFC 3461 ORCPT runs to about 1,000. 2048 is
# Postfix's line_length_limit.
DEFAULT_MAX_COMMAND_LINE = 2048
# RFC 4954 §4: SASL exchanges may send lines of up to 12288 octets.
MAX_AUTH_LINE = 12288
# RFC 5321 §4.5.3.1.5 says 512 for a reply line; real MTAs exceed it, and EHLO replies
# run to many lines, so pipeproxy bounds a whole reply instead, generously.
DEFAULT_MAX_REPLY_SIZE = 16 * 1024


class ProtocolError(Exception):
    """A peer broke the protocol; ``reply`` is what the client should be told."""

    def __init__(self, reply: bytes, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Reply:
    """One complete SMTP reply: its code and the text of each of its lines."""

    code: int
    lines: tuple[str, ...]

    def serialise(self) -> bytes:
        last = len(self.lines) - 1
        return b"".join(
            f"{self.code}{' ' if i == last else '-'}{text}".rstrip(" ").encode("utf-8", "surrogateescape") + CRLF
            for i, text in enumerate(self.lines)
        )

    @property
    def text(self) -> str:
        return " ".join(self.lines)


def reply(code: int, *lines: str) -> bytes:
    """Serialise a reply that pipeproxy itself gives."""
    return Reply(code, lines or ("",)).serialise()


def mailbox(argument: str) -> str:
    """The path of a MAIL or RCPT argument, ``FROM:<addr> PARAMS``, without brackets."""
    _, _, rest = argument.partition(":")
    rest = rest.strip()
    if rest.startswith("<") and ">" in rest:
        return rest[1 : rest.find(">")]
    return rest.split(" ", 1)[0]


class CommandReader:
    """Client input cut into command lines, bounded, with a clear error for bad lines."""

    def __init__(self, max_line: int = DEFAULT_MAX_COMMAND_LINE) -> None:
        self.max_line = max_line
        self._buffer = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def __len__(self) -> int:
        return len(self._buffer)

    def take_rest(self) -> bytes:
        """Everything buffered and not yet read; the reader is left empty."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest

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
        return b"\n" in self._buffer or len(self._buffer) >= self._limit(sasl=False)

    def next_line(self, sasl: bool = False) -> bytes | None:
        """The next line without its CRLF, None if incomplete; ProtocolError if bad.

        ``sasl``: the line answers an AUTH challenge, so the longer SASL limit applies.
        """
        limit = self._limit(sasl)
        end = self._buffer.find(b"\n")
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
            raise ProtocolError(reply(500, "5.5.2 Error: line too long"), "command line too long")
        if not line.endswith(b"\r"):
            raise ProtocolError(reply(500, "5.5.2 Error: bare <LF> received"), "bare LF in command line")
        line = line[:-1]
        if b"\r" in line or b"\x00" in line:
            raise ProtocolError(
                reply(500, "5.5.2 Error: bare <CR> or NUL in command line"), "bare CR or NUL in command line"
            )
        return line


class ReplyReader:
    """Upstream output cut into complete replies, each bounded in size."""

    def __init__(self, max_size: int = DEFAULT_MAX_REPLY_SIZE) -> None:
        self.max_size = max_size
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._code: int | None = None
        self._size = 0  # octets of the reply being read, lines already taken included

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def pending(self) -> bool:
        """Whether any part of a reply has arrived and not been returned yet."""
        return bool(self._buffer) or bool(self._lines)

    def next_reply(self) -> Reply | None:
        while True:
            end = self._buffer.find(b"\n")
            if self._size + (len(self._buffer) if end < 0 else end + 1) > self.max_size:
                raise _bad_upstream("reply too long")
            if end < 0:
                return None
            raw = bytes(self._buffer[:end]).removesuffix(b"\r")
            del self._buffer[: end + 1]
            self._size += end + 1
            code, last, text = _parse_reply_line(raw)
            if self._code is not None and code != self._code:
                raise _bad_upstream("multi-line reply changes its code")
            self._code = code
            self._lines.append(text)
            if last:
                complete = Reply(code, tuple(self._lines))
                self._lines, self._code, self._size = [], None, 0
                return complete


def _parse_reply_line(raw: bytes) -> tuple[int, bool, str]:
    """(code, is last line, text) of one reply line; RFC 5321 §4.2."""
    if len(raw) < 3 or not raw[:3].isdigit() or raw[:1] not in b"2345":
        raise _bad_upstream("malformed reply line")
    separator = raw[3:4]
    if separator not in (b"", b" ", b"-"):
        raise _bad_upstream("malformed reply line")
    if b"\r" in raw or b"\x00" in raw:
        raise _bad_upstream("control character in reply")
    return int(raw[:3]), separator != b"-", raw[4:].decode("utf-8", "surrogateescape")


def _bad_upstream(reason: str) -> ProtocolError:
    return ProtocolError(reply(421, "4.4.2 Upstream server broke the protocol, closing connection"), reason)


# Every line break a lenient MTA might honour: CRLF, bare CR, bare LF.
_LINE_BREAKS = re.compile(rb"\r\n|\r|\n")


_END_OF_DATA = b"\r\n.\r\n"


def _undecided_tail(text: bytes) -> int:
    """How many final octets of ``text`` could be the start of CRLF "." CRLF."""
    for keep in (4, 3, 2, 1):
        if text.endswith(_END_OF_DATA[:keep]):
            return keep
    return 0


def _has_bare(data: bytes) -> bool:
    """Whether ``data`` holds a CR or LF outside a CRLF, or a NUL.

    Counting in C is several times faster than a regular expression with a lookbehind,
    and this runs over every octet of every message.
    """
    pairs = data.count(CRLF)
    return data.count(b"\r") != pairs or data.count(b"\n") != pairs or b"\x00" in data


class BodyReframer:
    """Message content from the client, re-framed for the upstream; bounded state.

    ``feed`` returns the bytes to send upstream now. Once the client's terminator
    (``CRLF . CRLF``) is seen, ``done`` is true, ``finish()`` gives the last bytes
    (pipeproxy's own terminator) and ``leftover`` holds what the client sent after it:
    pipelined commands (RFC 2920 §3.1).

    With ``reject_bare`` false, bare CR and bare LF become CRLF and NUL is dropped; then
    every line that starts with a dot is stuffed. With it true, the first such byte
    refuses the message. Once ``refused`` (by that, or by the caller through
    ``refuse``), nothing more is produced; the end is still found, and the caller must
    not let the message be delivered.
    """

    def __init__(self, reject_bare: bool = False) -> None:
        self.reject_bare = reject_bare
        self.done = False
        self.refused: str | None = None  # why the message must not be delivered
        self.leftover = b""
        self.size = 0  # octets of content received from the client
        # Undecided client bytes: a tail that may yet become CRLF "." CRLF. It starts as
        # the CRLF that ended the DATA command, so the first line is no special case.
        self._tail = CRLF
        self._leading_crlf = True  # that first CRLF is not content
        self._out_line_start = True  # pipeproxy's framing: output at a line start

    def feed(self, data: bytes) -> bytes:
        if self.done:
            raise RuntimeError("body already complete")
        content = self._unframe(self._tail + data)
        self.size += len(content)
        return self._frame(content)

    def refuse(self, reason: str) -> None:
        self.refused = self.refused or reason

    def finish(self) -> bytes:
        """The terminator pipeproxy writes, once the client's was seen."""
        assert self.done and not self.refused
        return b".\r\n" if self._out_line_start else b"\r\n.\r\n"

    def _unframe(self, text: bytes) -> bytes:
        """Undo the client's framing: content out, the end detected (RFC 5321 §4.5.2).

        Every line start in ``text`` follows a CRLF (the first one is the DATA command's),
        so the end is the first CRLF "." CRLF, and the client's stuffed dots are the "."
        after each CRLF: both are found with bytes methods, not a loop per line.
        """
        end = text.find(_END_OF_DATA)
        if end >= 0:
            self.done = True
            self.leftover = text[end + 5 :]
            body, self._tail = text[: end + 2], b""
        else:
            keep = _undecided_tail(text)
            body, self._tail = text[: len(text) - keep], text[len(text) - keep :]
        content = body.replace(b"\r\n.", CRLF)
        if self._leading_crlf and content:
            self._leading_crlf = False
            content = content[2:]
        return content

    def _frame(self, data: bytes) -> bytes:
        """Frame content for the upstream: CRLF lines, leading dots stuffed.

        ``_unframe`` never returns content ending in CR (a trailing CR could start the
        terminator, so it is held back), so a CRLF is never split between calls and a
        line break at the start of ``data`` is truly bare.
        """
        if self.refused or not data:
            return b""
        if _has_bare(data):
            if self.reject_bare:
                self.refuse("bare CR, LF or NUL in content")
                return b""
            # Line breaks first, NUL after: a NUL between CR and LF must not join them
            # into one CRLF, or the result would depend on where the input was cut.
            data = _LINE_BREAKS.sub(CRLF, data).replace(b"\x00", b"")
            if not data:
                return b""
        if self._out_line_start and data.startswith(b"."):
            data = b"." + data
        data = data.replace(b"\r\n.", b"\r\n..")
        self._out_line_start = data.endswith(CRLF)
        return data
