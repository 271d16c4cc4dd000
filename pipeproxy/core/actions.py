"""What a Session asks the shell to do, in order: one typed action per kind of I/O.

The shell carries out each list ``Session.handle`` returns, in order, before the list
of any later event (mitmproxy's commands: ``SendData``, ``OpenConnection``,
``CloseConnection``, ``Log``). Replies stay ``Reply`` values until the shell writes them,
so tests and logs can see what was said, not only its bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .wire import Reply


@dataclass(frozen=True, slots=True, init=False)
class ToClient:
    """Write these replies to the client in one write: one group (RFC 2920 §3.2)."""

    replies: tuple[Reply, ...]

    def __init__(self, replies: tuple[Reply, ...]) -> None:  # compiled: see wire.Reply
        object.__setattr__(self, "replies", replies)

    @property
    def data(self) -> bytes:
        if len(self.replies) == 1:  # a lock-step client's every reply
            return self.replies[0].serialise()
        return b"".join(reply.serialise() for reply in self.replies)


@dataclass(frozen=True, slots=True, init=False)
class ToUpstream:
    data: bytes

    def __init__(self, data: bytes) -> None:  # compiled: see wire.Reply
        object.__setattr__(self, "data", data)


@dataclass(frozen=True, slots=True)
class ConnectUpstream:
    """Open a connection to the upstream; answer with UpstreamConnected or UpstreamFailed."""


@dataclass(frozen=True, slots=True)
class DropUpstream:
    """Close the upstream connection now, with no final dot; the client session goes on."""


@dataclass(frozen=True, slots=True)
class StartTls:
    """Stop reading the client in clear, then write ``ready`` (the 220) in clear, then
    start TLS as the server on the client's connection; answer with TlsEstablished or
    TlsFailed. Reading stops before the 220 goes out, so nothing the client sends after it
    (its ClientHello) can be read in clear."""

    ready: Reply


@dataclass(frozen=True, slots=True)
class UpstreamStartTls:
    """The upstream said 220 to pipeproxy's STARTTLS: start TLS as the client on the
    upstream connection (reading nothing more from it in clear); answer with
    UpstreamTlsEstablished or UpstreamTlsFailed."""


@dataclass(frozen=True, slots=True, init=False)
class Log:
    """One log line; ``event`` and its fields are named in ``logschema``."""

    level: str
    event: str
    fields: dict[str, Any]

    def __init__(self, level: str, event: str, fields: dict[str, Any]) -> None:  # compiled: see wire.Reply
        object.__setattr__(self, "level", level)
        object.__setattr__(self, "event", event)
        object.__setattr__(self, "fields", fields)


@dataclass(frozen=True, slots=True)
class Close:
    """End the session: close both connections. The upstream never sees a final dot."""

    reason: str
    clean: bool  # the client quit or hung up between commands; nothing went wrong


Action = ToClient | ToUpstream | ConnectUpstream | DropUpstream | StartTls | UpstreamStartTls | Log | Close
