"""What the shell tells a Session: one typed event for every I/O outcome.

The shell turns each thing that happens on a connection into one of these and hands it
to ``Session.handle``; nothing reaches the core any other way (h11's ``receive_data`` and
``send_failed``, mitmproxy's ``DataReceived`` / ``ConnectionClosed``). Deadlines are
the core's own: the shell only says, with ``Tick``, that the time the core asked for
(``Session.deadline``) has come.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Address


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """An established TLS session with the client."""

    version: str  # "TLSv1.3"
    cipher: str
    sni: str | None  # the server name the client asked for


@dataclass(frozen=True, slots=True)
class ClientConnected:
    """A client is here; ``client`` is who it really is (from a PROXY header or its socket)."""

    client: Address
    server: Address | None = None  # the address it connected to
    session: str = ""  # the shell's id for the session, as its log lines carry it
    tls: TlsInfo | None = None  # implicit TLS: the handshake is done already


@dataclass(frozen=True, slots=True)
class TlsEstablished:
    """The handshake a ``StartTls`` asked for succeeded."""

    info: TlsInfo


@dataclass(frozen=True, slots=True)
class TlsFailed:
    """The handshake a ``StartTls`` asked for failed: the connection is unusable."""

    reason: str


@dataclass(frozen=True, slots=True)
class UpstreamTlsEstablished:
    """The handshake an ``UpstreamStartTls`` asked for succeeded."""

    info: TlsInfo


@dataclass(frozen=True, slots=True)
class UpstreamTlsFailed:
    """The handshake an ``UpstreamStartTls`` asked for failed (or the certificate did not
    verify): that upstream connection is unusable."""

    reason: str


@dataclass(frozen=True, slots=True, init=False)
class ClientData:
    data: bytes | bytearray  # as trio's receive_some gives it

    def __init__(self, data: bytes | bytearray) -> None:  # compiled: see wire.Reply
        object.__setattr__(self, "data", data)


@dataclass(frozen=True, slots=True)
class ClientClosed:
    """The client sent EOF, or reset the connection: what it sent before still counts."""


@dataclass(frozen=True, slots=True)
class ClientWriteFailed:
    """A write to the client failed or timed out: nobody is left to answer."""

    reason: str


@dataclass(frozen=True, slots=True)
class UpstreamConnected:
    """The connection a ``ConnectUpstream`` asked for is open."""


@dataclass(frozen=True, slots=True, init=False)
class UpstreamData:
    data: bytes | bytearray

    def __init__(self, data: bytes | bytearray) -> None:  # compiled: see wire.Reply
        object.__setattr__(self, "data", data)


@dataclass(frozen=True, slots=True)
class UpstreamClosed:
    """The upstream sent EOF."""


@dataclass(frozen=True, slots=True)
class UpstreamFailed:
    """The upstream could not be reached, or its connection broke (reset, write failed)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Tick:
    """``Session.deadline`` has passed on the session's clock."""


@dataclass(frozen=True, slots=True)
class Drain:
    """pipeproxy is stopping: the transaction in progress may finish, then 421."""


@dataclass(frozen=True, slots=True)
class ShutDown:
    """The grace period is over: 421 now, whatever is in progress (no final dot)."""


Event = (
    ClientConnected
    | ClientData
    | ClientClosed
    | ClientWriteFailed
    | UpstreamConnected
    | UpstreamData
    | UpstreamClosed
    | UpstreamFailed
    | TlsEstablished
    | TlsFailed
    | UpstreamTlsEstablished
    | UpstreamTlsFailed
    | Tick
    | Drain
    | ShutDown
)
