"""One frozen Config for a pipeproxy process: every setting, written once.

Each field carries a ``Setting`` in its metadata: the flag, the ``PIPEPROXY_*`` variable,
what it means and how its text is parsed. The command line (``cli/options.py``) makes its
flags, variables, help and checks from these, and shows the field's own default, so a
new setting is one field here. Plain data only: no argparse, no trio.

Defaults cite their source: line limits from RFC 5321 §4.5.3.1, timeouts from
RFC 5321 §4.5.3.2. The protocol core reads only the fields it needs.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from . import values
from .ehlo import normalise_keywords
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
        if not (port.isascii() and port.isdecimal() and int(port) <= 65535):
            raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
        # A host that looks like an IP address must be one; other names are resolved later.
        if re.fullmatch(r"[0-9.]+|.*:.*", host):
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
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
    tls_handshake: float = 60.0  # a TLS handshake: a client's (STARTTLS or connect), or with the upstream


@dataclass(frozen=True, slots=True)
class Setting:
    """How one Config field is set from outside; the help gets the default added."""

    flag: str  # "--max-sessions"
    variable: str  # after PIPEPROXY_: "MAX_SESSIONS"
    help: str
    # One value's text to the value (choices: lower-cased and checked first); raises
    # ValueError with the reason.
    parse: Callable[[str], Any]
    metavar: str = ""  # what a value looks like, for settings without choices
    choices: tuple[str, ...] = ()
    # Repeatable: the flag may be given again and the variable is a list; this turns
    # the parsed values into the field's value.
    gather: Callable[[list[Any]], Any] | None = None
    required: bool = False  # pipeproxy cannot serve without it, whatever the default
    secret: bool = False  # a password or key: the startup log line shows it as "<redacted>"


def setting(flag: str, variable: str, parse: Callable[[str], Any], help: str, **more: Any) -> dict[str, Setting]:
    """Field metadata holding the Setting."""
    return {"setting": Setting(flag, variable, help, parse, **more)}


def settings() -> dict[str, tuple[Setting, Any]]:
    """Each Config field's name, with its Setting and its default, in field order."""
    table = {}
    for f in dataclasses.fields(Config):
        default = f.default_factory() if callable(f.default_factory) else f.default
        table[f.name] = (f.metadata["setting"], default)
    return table


TIMEOUT_NAMES = tuple(f.name for f in dataclasses.fields(Timeouts))


def _timeouts(overrides: list[tuple[str, float]]) -> Timeouts:
    return Timeouts(**dict(overrides))


@dataclass(frozen=True, slots=True)
class Config:
    listen: Address = field(default=Address("127.0.0.1", 2525), metadata=setting(
        "--listen", "LISTEN", Address.parse, metavar="HOST:PORT",
        help="where clients connect; [IPV6]:PORT for IPv6"))
    upstream: Address = field(default=Address("127.0.0.1", 25), metadata=setting(
        "--upstream", "UPSTREAM", Address.parse, metavar="HOST:PORT", required=True,
        help="the legacy MTA to relay to"))
    log_format: str = field(default="auto", metadata=setting(
        "--log-format", "LOG_FORMAT", str, choices=("auto", "json", "console"),
        help="json lines for machines, console for people; auto: console on a terminal, json otherwise"))
    log_level: str = field(default="info", metadata=setting(
        "--log-level", "LOG_LEVEL", str, choices=("debug", "info", "warning", "error"),
        help="debug adds a line per command"))
    discard_ehlo_keywords: frozenset[str] = field(default=frozenset(), metadata=setting(
        "--discard-ehlo-keyword", "DISCARD_EHLO_KEYWORDS", str, metavar="KEYWORD", gather=normalise_keywords,
        help="an EHLO keyword to hide from clients, like Postfix's smtpd_discard_ehlo_keywords; "
        "matched case-insensitively; PIPELINING cannot be discarded"))
    # RFC 5321 §4.5.3.1.4 asks for at least 512 octets; real clients send longer.
    max_line_length: int = field(default=DEFAULT_MAX_COMMAND_LINE, metadata=setting(
        "--max-line-length", "MAX_LINE_LENGTH", values.positive_int, metavar="OCTETS",
        help="longest command line accepted, CRLF included; a longer one gets 500 and never reaches the upstream"))
    max_pipeline_bytes: int = field(default=256 * 1024, metadata=setting(
        "--max-pipeline-bytes", "MAX_PIPELINE_BYTES", values.positive_int, metavar="OCTETS",
        help="pipelined client input held while the upstream answers; beyond it pipeproxy stops reading"))
    # RFC 5321 §4.5.3.1.8: a server must accept at least 100 recipients per message.
    max_recipients: int = field(default=1000, metadata=setting(
        "--max-recipients", "MAX_RECIPIENTS", values.positive_int, metavar="COUNT",
        help="RCPT commands per message; more get 452"))
    max_message_size: int = field(default=0, metadata=setting(
        "--max-message-size", "MAX_MESSAGE_SIZE", values.non_negative_int, metavar="OCTETS",
        help="pipeproxy's own message size limit: advertised in SIZE, larger messages get 552; "
        "0 leaves it to the upstream"))
    max_reply_size: int = field(default=DEFAULT_MAX_REPLY_SIZE, metadata=setting(
        "--max-reply-size", "MAX_REPLY_SIZE", values.positive_int, metavar="OCTETS",
        help="longest reply accepted from the upstream, all lines together; "
        "longer is a broken upstream and ends the session with 421"))
    max_sessions: int = field(default=1000, metadata=setting(
        "--max-sessions", "MAX_SESSIONS", values.positive_int, metavar="COUNT",
        help="concurrent client sessions; beyond it a new client gets 421 at once"))
    # Per message, not per block: a client trickling content is cut off even if each
    # byte beats data_block.
    min_data_rate: int = field(default=500, metadata=setting(
        "--min-data-rate", "MIN_DATA_RATE", values.non_negative_int, metavar="OCTETS_PER_SECOND",
        help="slowest message content accepted, averaged over the message, like Postfix's "
        "smtpd_min_data_rate; 0 turns it off"))
    proxy_protocol: bool = field(default=False, metadata=setting(
        "--proxy-protocol", "PROXY_PROTOCOL", values.on_off, choices=("off", "on"),
        help="on: every connection starts with a PROXY protocol v1 or v2 header (HAProxy, cloud load "
        "balancers) giving the real client, which the logs show; a connection without one is closed"))
    health_listen: Address | None = field(default=None, metadata=setting(
        "--health-listen", "HEALTH_LISTEN", Address.parse, metavar="HOST:PORT",
        help="serve an HTTP health endpoint there (GET /health: 200 while serving, 503 while draining); "
        "'pipeproxy health' asks it"))
    workers: int = field(default=1, metadata=setting(
        "--workers", "WORKERS", values.positive_int, metavar="COUNT",
        help="processes sharing the listening port with SO_REUSEPORT, to use more cores"))
    grace_period: float = field(default=30.0, metadata=setting(
        "--grace-period", "GRACE_PERIOD", values.seconds, metavar="SECONDS",
        help="on SIGTERM or SIGINT, how long transactions in flight get to finish before the remaining "
        "sessions get 421; a second signal ends it at once"))
    # Past it what is held goes out, so a client's read timeout never fires on replies
    # pipeproxy already has.
    hold_time: float = field(default=1.0, metadata=setting(
        "--hold-time", "HOLD_TIME", values.seconds, metavar="SECONDS",
        help="how long replies to RSET, MAIL and RCPT may be held to go out in one write while the "
        "upstream is slow"))
    xclient: str = field(default="auto", metadata=setting(
        "--xclient", "XCLIENT", str, choices=("auto", "off"),
        help="auto: when the upstream offers XCLIENT (Postfix's smtpd_authorized_xclient_hosts, Exim 4.98's "
        "hosts_xclient), tell it who each client really is before its first command, so the MTA's rules by "
        "client address judge the client, not pipeproxy; off: never"))
    xforward: str = field(default="auto", metadata=setting(
        "--xforward", "XFORWARD", str, choices=("auto", "off"),
        help="auto: when the upstream offers XFORWARD (Postfix's smtpd_authorized_xforward_hosts), pass the "
        "client's address, port, HELO name and protocol before each MAIL, for the MTA's logs; off: never"))
    upstream_proxy_protocol: str = field(default="off", metadata=setting(
        "--upstream-proxy-protocol", "UPSTREAM_PROXY_PROTOCOL", str, choices=("off", "v1", "v2"),
        help="start each upstream connection with a PROXY protocol header naming the real client (Postfix "
        "smtpd_upstream_proxy_protocol = haproxy, Exim proxy_protocol_hosts)"))
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(default=(), metadata=setting(
        "--allow", "ALLOW", values.network, metavar="CIDR", gather=tuple,
        help="only clients in these networks may connect; others get 554 "
        "at once; none given: everyone not denied"))
    deny: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(default=(), metadata=setting(
        "--deny", "DENY", values.network, metavar="CIDR", gather=tuple,
        help="clients in these networks get 554 at once and no upstream session; deny wins over allow"))
    max_sessions_per_client: int = field(default=0, metadata=setting(
        "--max-sessions-per-client", "MAX_SESSIONS_PER_CLIENT", values.non_negative_int, metavar="COUNT",
        help="concurrent sessions from one client address, like Postfix's smtpd_client_connection_count_limit "
        "(50 there); one more gets 421 at once; 0: no limit"))
    early_talkers: str = field(default="allow", metadata=setting(
        "--early-talkers", "EARLY_TALKERS", str, choices=("allow", "reject"),
        help="a client that sends before the greeting (spam software does, a real client waits): allow "
        "logs it; reject answers 554 and closes, as Exim's smtp_enforce_sync and postscreen do"))
    log_addresses: str = field(default="full", metadata=setting(
        "--log-addresses", "LOG_ADDRESSES", str, choices=("full", "domain", "hash"),
        help="mail addresses in the logs: full, as MTAs log them; domain: @example.com only; hash: a keyed "
        "hash of the address then its domain, searchable but not readable (needs --log-hash-key)"))
    log_hash_key: str = field(default="", metadata=setting(
        "--log-hash-key", "LOG_HASH_KEY", str, metavar="SECRET", secret=True,
        help="the key of --log-addresses hash; the same key gives the same hashes in every process and "
        "restart; a secret: never logged"))
    transcript: bool = field(default=False, metadata=setting(
        "--transcript", "TRANSCRIPT", values.on_off, choices=("off", "on"),
        help="on: one log line per command and per reply (never message content; AUTH data redacted); "
        "about four lines per command more"))
    tls_cert: str = field(default="", metadata=setting(
        "--tls-cert", "TLS_CERT", str, metavar="FILE",
        help="PEM certificate (chain allowed) for TLS toward clients; with --tls-key, pipeproxy offers "
        "STARTTLS (RFC 3207) and terminates TLS itself, whatever the upstream has"))
    tls_key: str = field(default="", metadata=setting(
        "--tls-key", "TLS_KEY", str, metavar="FILE", help="the PEM private key of --tls-cert"))
    tls_listen: tuple[Address, ...] = field(default=(), metadata=setting(
        "--tls-listen", "TLS_LISTEN", Address.parse, metavar="HOST:PORT", gather=tuple,
        help="also listen there for implicit TLS from the first byte (RFC 8314, port 465 style)"))
    tls_min_version: str = field(default="1.2", metadata=setting(
        "--tls-min-version", "TLS_MIN_VERSION", str, choices=("1.0", "1.1", "1.2", "1.3"),
        help="the oldest TLS version clients may use"))
    auth_without_tls: bool = field(default=False, metadata=setting(
        "--auth-without-tls", "AUTH_WITHOUT_TLS", values.on_off, choices=("off", "on"),
        help="on: offer and relay AUTH before STARTTLS too; off: with TLS configured, AUTH is hidden and "
        "refused with 538 until the session is encrypted (Postfix's smtpd_tls_auth_only)"))
    require_tls: bool = field(default=False, metadata=setting(
        "--require-tls", "REQUIRE_TLS", values.on_off, choices=("off", "on"),
        help="on: MAIL and AUTH before STARTTLS get 530 5.7.0 Must issue a STARTTLS command first"))
    upstream_tls: str = field(default="none", metadata=setting(
        "--upstream-tls", "UPSTREAM_TLS", str, choices=("none", "may", "encrypt", "verify"),
        help="TLS toward the MTA with its STARTTLS: none (a private network); may: when offered, and on a "
        "failed handshake reconnect and go on in clear, as Postfix's smtp_tls_security_level = may; encrypt: "
        "required (421 to the client without it), certificate not checked; verify: required, and the certificate "
        "checked against --upstream-tls-ca (or the system store) and the --upstream host name"))
    upstream_tls_ca: str = field(default="", metadata=setting(
        "--upstream-tls-ca", "UPSTREAM_TLS_CA", str, metavar="FILE",
        help="PEM CA certificates that --upstream-tls verify trusts instead of the system store"))
    upstream_tls_min_version: str = field(default="1.2", metadata=setting(
        "--upstream-tls-min-version", "UPSTREAM_TLS_MIN_VERSION", str, choices=("1.0", "1.1", "1.2", "1.3"),
        help="the oldest TLS version pipeproxy accepts from the MTA; 1.0 and 1.1 also lower OpenSSL's security "
        "level (legacy ciphers, SHA-1)"))
    bare_line_endings: BareLineEndings = field(default=BareLineEndings.NEUTRALISE, metadata=setting(
        "--bare-line-endings", "BARE_LINE_ENDINGS", BareLineEndings, choices=tuple(p.value for p in BareLineEndings),
        help="bare CR, bare LF or NUL in message content: neutralise turns CR and LF into CRLF and drops "
        "NUL; reject refuses the message with 550"))
    timeouts: Timeouts = field(default_factory=Timeouts, metadata=setting(
        "--timeout", "TIMEOUTS", values.timeout(TIMEOUT_NAMES), metavar="NAME=SECONDS", gather=_timeouts,
        help="override one timeout; the defaults are RFC 5321 4.5.3.2's"))

    @property
    def tls(self) -> bool:
        """Whether pipeproxy terminates TLS toward clients."""
        return bool(self.tls_cert)

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key) or (self.tls_listen and not self.tls_cert):
            raise ValueError("TLS needs both --tls-cert and --tls-key (and --tls-listen needs them too)")
        if self.require_tls and not self.tls_cert:
            raise ValueError("--require-tls needs --tls-cert and --tls-key")
        if self.upstream_tls_ca and self.upstream_tls != "verify":
            raise ValueError("--upstream-tls-ca is for --upstream-tls verify")
        if self.log_addresses == "hash" and not self.log_hash_key:
            raise ValueError("--log-addresses hash needs --log-hash-key (or PIPEPROXY_LOG_HASH_KEY)")
