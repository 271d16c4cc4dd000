"""One frozen Config for a pipeproxy process, and the parsing of its addresses.

Defaults cite their source: line limits from RFC 5321 §4.5.3.1, timeouts from
RFC 5321 §4.5.3.2. The command line (cli.py) builds a Config from flags and
``PIPEPROXY_*`` environment variables; the protocol core reads only the fields it needs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

from .wire import DEFAULT_MAX_COMMAND_LINE, DEFAULT_MAX_REPLY_SIZE


class Address(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Address:
        """``HOST:PORT`` or ``[IPV6]:PORT``; ValueError with a readable reason otherwise."""
        text = text.strip()
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
            if not sep or not host:
                raise ValueError(f"{text!r} is not [IPV6]:PORT")
        else:
            host, sep, port = text.rpartition(":")
            if not sep or not host:
                raise ValueError(f"{text!r} is not HOST:PORT")
            if ":" in host:
                raise ValueError(f"{text!r}: write an IPv6 address in brackets, as [{host}]:{port}")
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
        return cls(host, int(port))


class BareLineEndings(enum.Enum):
    """What to do with bare CR, bare LF and NUL inside message content."""

    NEUTRALISE = "neutralise"  # bare CR/LF become CRLF, NUL is dropped; then dot-stuffed
    REJECT = "reject"  # the message is refused with 550 and never completed upstream


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; RFC 5321 §4.5.3.2 gives each default."""

    greeting: float = 300.0  # §4.5.3.2.1 initial 220 message
    mail: float = 300.0  # §4.5.3.2.2
    rcpt: float = 300.0  # §4.5.3.2.3
    data_init: float = 120.0  # §4.5.3.2.4 DATA to 354
    data_block: float = 180.0  # §4.5.3.2.5 each block of message content
    data_end: float = 600.0  # §4.5.3.2.6 final dot to reply; shorter risks duplicates
    command: float = 300.0  # any other command: 5 minutes, as for MAIL
    client_idle: float = 300.0  # §4.5.3.2.7 server waiting for the next command


@dataclass(frozen=True, slots=True)
class Config:
    listen: Address = Address("127.0.0.1", 2525)
    upstream: Address = Address("127.0.0.1", 25)
    log_format: str = "json"
    log_level: str = "info"
    discard_ehlo_keywords: frozenset[str] = frozenset()
    max_line_length: int = DEFAULT_MAX_COMMAND_LINE
    # Pipelined client input held while the upstream answers; past it, stop reading.
    max_pipeline_bytes: int = 256 * 1024
    # RFC 5321 §4.5.3.1.8: a server must accept at least 100 recipients per message.
    max_recipients: int = 1000
    # Octets of message content; 0 leaves size to the upstream's own SIZE limit.
    max_message_size: int = 0
    max_reply_size: int = DEFAULT_MAX_REPLY_SIZE
    max_sessions: int = 1000
    # Octets per second over a whole message, like Postfix's smtpd_min_data_rate: a
    # client trickling content is cut off even if each byte beats data_block; 0: off.
    min_data_rate: int = 500
    # Each connection starts with a PROXY protocol header (v1 or v2) from a balancer.
    proxy_protocol: bool = False
    # Where the health endpoint listens (health.py); None: no endpoint.
    health_listen: Address | None = None
    # Processes sharing the listening port (SO_REUSEPORT); 1 serves in this process.
    workers: int = 1
    # Seconds that transactions in flight get to finish after SIGTERM or SIGINT.
    grace_period: float = 30.0
    # Seconds replies to RSET/MAIL/RCPT may be held for one write while the upstream is
    # slow; past it what is held goes out, so a client's read timeout never fires on
    # replies pipeproxy already has.
    hold_time: float = 1.0
    bare_line_endings: BareLineEndings = BareLineEndings.NEUTRALISE
    timeouts: Timeouts = field(default_factory=Timeouts)
