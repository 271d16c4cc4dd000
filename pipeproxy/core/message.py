"""What the logs say about a message without keeping it: its Message-ID, the MTA's queue
id, and addresses shown as the operator chose.

Nothing here holds message content: ``HeaderScanner`` reads the header section as it
streams past, remembers at most one header line (bounded), and stops at the end of the
headers or after ``MAX_HEADER_SECTION`` octets, whichever comes first.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Final

# RFC 5322 §2.1.1: a line is at most 998 octets; a folded Message-ID is short. A header
# line longer than this cannot be the one we want.
MAX_HEADER_LINE: Final = 4096
# Past this many octets of headers, stop looking: the cost stays bounded per message.
MAX_HEADER_SECTION: Final = 256 * 1024
_MESSAGE_ID: Final = re.compile(rb"(?i)^message-id:\s*(<[^>\s]{1,900}>)")


class HeaderScanner:
    """Finds the Message-ID header in content fed in pieces of any size (CRLF lines)."""

    def __init__(self) -> None:
        self.message_id: str | None = None
        self._partial = b""  # the line being read
        self._header = b""  # the header being read, its folded lines joined (RFC 5322 §2.2.3)
        self._seen = 0
        self._done = False

    def feed(self, content: bytes) -> None:
        if self._done:
            return
        if self._seen + len(content) > MAX_HEADER_SECTION:
            content, self._done = content[: MAX_HEADER_SECTION - self._seen], True
        self._seen += len(content)
        data = self._partial + content
        if (end := data.find(b"\r\n\r\n")) >= 0:
            data = data[: end + 4]  # the body's lines are never split up: only the headers'
        lines = data.split(b"\r\n")
        self._partial = lines.pop()  # not ended yet
        for line in lines:
            if line[:1] in (b" ", b"\t"):
                self._header += line
                continue
            self._header_done()
            if not line:  # the blank line: the body starts, no more headers
                self._done = True
                return
            self._header = line
        if len(self._partial) + len(self._header) > MAX_HEADER_LINE:
            self._done = True
        if self._done:
            self._partial = self._header = b""

    def finish(self) -> None:
        """The content ended: a header still being read is complete."""
        if not self._done:
            if self._partial[:1] in (b" ", b"\t"):
                self._header += self._partial
            else:
                self._header_done()
                self._header = self._partial
            self._header_done()
            self._done = True

    def _header_done(self) -> None:
        if self.message_id is None and (found := _MESSAGE_ID.match(self._header)):
            self.message_id = found[1].decode("ascii", "replace")
        self._header = b""


# What MTAs say when they accept a message: Postfix "250 2.0.0 Ok: queued as 4F3A1B2C",
# Exim "250 OK id=1sXYZ-000123-AB", Sendmail "250 2.0.0 4ATK1a2b003 Message accepted for
# delivery", Exchange "250 2.6.0 <id@host> [InternalId=123] Queued mail for delivery",
# OpenSMTPD "250 2.0.0 a1b2c3d4 Message accepted for delivery", qmail "250 ok 1700000000 qp 123".
_QUEUE_ID: Final = [
    re.compile(r"queued as ([\w.\-]+)", re.IGNORECASE),
    re.compile(r"\bid=([\w.\-]+)", re.IGNORECASE),
    re.compile(r"([\w.\-]+) Message accepted for delivery", re.IGNORECASE),
    re.compile(r"InternalId=(\w+)", re.IGNORECASE),
    re.compile(r"\bqp (\d+)", re.IGNORECASE),
]


def queue_id(reply_text: str) -> str | None:
    """The queue id an MTA names in its reply to a message, if it names one."""
    for pattern in _QUEUE_ID:
        if found := pattern.search(reply_text):
            return found[1]
    return None


def show_address(address: str, mode: str, key: bytes = b"") -> str:
    """``address`` as the logs show it: ``full``; ``domain`` (``@example.com``); or
    ``hash``: a keyed hash of the whole address, then its domain (``#3f2a...@example.com``),
    so the same address is searchable without being readable."""
    if mode == "full" or not address:
        return address
    local, at, domain = address.rpartition("@")
    domain = domain if at else ""
    if mode == "domain":
        return f"@{domain}"
    digest = hmac.new(key, address.lower().encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:16]
    return f"#{digest}@{domain}"
