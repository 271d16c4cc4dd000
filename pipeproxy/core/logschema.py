"""Every log event pipeproxy writes, with its fields, named once.

Operators read these lines (and ``pipeproxy inspect`` will parse them), so an event's
name and fields are an interface: code refers to the constants here, never to a string
of its own, and the tests check that every line the core writes matches its entry.
Context fields bound by the shell (``session``, ``client``, ``upstream``, ``worker``)
come on every line of a session and are not repeated here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final


@dataclass(frozen=True, slots=True)
class LogEvent:
    name: str
    level: str  # the usual level; a caller may raise it (a session that closed badly)
    fields: frozenset[str]
    doc: str

    def check(self, fields: dict[str, Any]) -> None:
        """Raise ValueError if ``fields`` has one this event does not declare."""
        if extra := set(fields) - self.fields:
            raise ValueError(f"log event {self.name!r} has undeclared fields {sorted(extra)}")


def _event(name: str, level: str, fields: str, doc: str) -> LogEvent:
    return LogEvent(name, level, frozenset(fields.split()), doc)


# -- one session (the core) ------------------------------------------------------------
SESSION_OPEN: Final = _event("session open", "info", "server", "a client connected (to server, pipeproxy's address)")
SESSION_CLOSED: Final = _event(
    "session closed",
    "info",
    "reason duration commands messages",
    "the session ended; warning when it did not end cleanly (reason says why)",
)
UPSTREAM_GREETING: Final = _event("upstream greeting", "info", "code", "the upstream's greeting arrived")
UPSTREAM_UNREACHABLE: Final = _event("upstream unreachable", "warning", "error", "connecting to the upstream failed")
HELO_FALLBACK: Final = _event(
    "upstream has no EHLO, falling back to HELO", "info", "code", "the upstream refused EHLO; pipeproxy sent HELO"
)
EHLO_REWRITTEN: Final = _event("ehlo rewritten", "info", "removed", "keywords removed from the EHLO reply clients see")
COMMAND_REFUSED: Final = _event(
    "command refused", "info", "verb reason", "pipeproxy answered a command itself; it never reached the upstream"
)
COMMAND: Final = _event(
    "command",
    "debug",
    "verb code upstream_wait group",
    "one command and its reply (never its argument); group counts the client writes so far",
)
TRANSACTION: Final = _event(
    "transaction",
    "info",
    "helo sender recipients recipients_accepted recipients_rejected size message_id queue_id reply_code reply "
    "outcome upstream_wait tls groups",
    "one mail transaction, MAIL to its final reply: the canonical line per message; recipients lists "
    "each one's address, code and (when refused) the reply text; queue_id is the MTA's, from its final reply",
)
MESSAGE_ABANDONED: Final = _event(
    "message abandoned, upstream closed without final dot",
    "warning",
    "reason",
    "the message was not completed, so the upstream cannot deliver it",
)
UPSTREAM_RECONNECTING: Final = _event(
    "reconnecting upstream",
    "info",
    "reason",
    "pipeproxy dropped the upstream connection mid-message and opens a new one for the session",
)
UPSTREAM_RECONNECTED: Final = _event(
    "upstream reconnected", "info", "", "greeting and EHLO replayed; the session goes on"
)
TRANSCRIPT: Final = _event(
    "transcript",
    "info",
    "direction line code text",
    "with --transcript: a command (line) from the client or pipeproxy's own to the upstream, or a "
    "reply (code, text) from the upstream or pipeproxy's own to the client; never content or AUTH data",
)
XCLIENT_SENT: Final = _event(
    "xclient sent", "info", "attributes", "the upstream was told who the client is (attribute names only)"
)
XCLIENT_REFUSED: Final = _event(
    "xclient refused", "error", "code reply", "the upstream refused XCLIENT; the session failed closed with 421"
)
XFORWARD_REFUSED: Final = _event(
    "xforward refused", "warning", "code reply", "the upstream refused XFORWARD; the mail went on without it"
)
EARLY_TALKER: Final = _event(
    "client talked before the greeting", "info", "action", "allow: logged only; reject: 554 and closed"
)
TLS_ESTABLISHED: Final = _event("tls established", "info", "version cipher sni", "the client's TLS session is up")
TLS_FAILED: Final = _event("tls handshake failed", "warning", "reason", "the client's TLS handshake failed; closed")
PLAINTEXT_AFTER_STARTTLS: Final = _event(
    "plaintext after STARTTLS discarded",
    "warning",
    "octets",
    "bytes the client sent after STARTTLS, before TLS: never answered inside TLS (CVE-2011-0411)",
)
UPSTREAM_TLS_ESTABLISHED: Final = _event(
    "upstream tls established", "info", "version cipher", "TLS with the upstream is up (--upstream-tls)"
)
UPSTREAM_TLS_FAILED: Final = _event(
    "upstream tls failed",
    "warning",
    "reason action",
    "no TLS with the upstream: handshake failed, certificate not verified, STARTTLS not offered or refused; "
    "action: clear (may: went on in clear) or closed (the client got 421)",
)
UPSTREAM_BYTES_AFTER_STARTTLS: Final = _event(
    "upstream bytes after STARTTLS discarded",
    "warning",
    "octets",
    "bytes the upstream sent after its 220 to STARTTLS, before TLS: never taken as replies (response injection)",
)
INTERNAL_ERROR: Final = _event(
    "internal error", "error", "exception", "a bug in pipeproxy: the client got 421 and the session ended"
)

# -- the server and the process (the shell) -------------------------------------------
LISTENING: Final = _event("listening", "info", "addresses upstream", "pipeproxy accepts connections")
DRAINING: Final = _event("draining", "info", "sessions grace_period", "stopping: no new sessions, open ones finish")
GRACE_OVER: Final = _event(
    "grace period over, closing sessions", "warning", "sessions", "sessions still open got 421 and were closed"
)
STOPPED: Final = _event("stopped", "info", "sessions_left", "every session has ended")
TOO_MANY_SESSIONS: Final = _event(
    "session refused: too many sessions", "warning", "max_sessions", "a client got 421 at once"
)
BAD_PROXY_HEADER: Final = _event(
    "bad PROXY header, closing", "warning", "peer error", "a connection without a valid PROXY header was closed"
)
CLIENT_REFUSED: Final = _event(
    "client refused", "info", "client reason", "a client was refused at the door (access list, per-client limit)"
)
SESSION_FAILED: Final = _event("session failed", "error", "", "a session's shell failed; its traceback follows")
STOPPING: Final = _event("stopping", "info", "signal", "a signal asked pipeproxy to stop: the drain begins")
STOPPING_NOW: Final = _event("stopping now", "info", "signal", "a second signal ended the grace period")
WORKERS_STARTED: Final = _event("workers started", "info", "workers port", "worker processes share the port")
STARTING: Final = _event(
    "starting", "info", "version pid core settings", "pipeproxy starts: its version, its core compiled or pure "
    "python, and every setting in effect, secrets redacted"
)
RELOAD: Final = _event(
    "reload", "info", "signal reloaded", "SIGHUP: what could be reloaded was (reloaded names it; empty: nothing)"
)
RELOAD_FAILED: Final = _event("reload failed", "error", "", "a reload hook failed; what it guards is unchanged")
WORKER_STARTED: Final = _event("worker started", "info", "worker pid", "a worker process was started (or restarted)")
WORKER_RESTARTING: Final = _event(
    "worker died, restarting",
    "error",
    "worker pid exitcode delay",
    "a worker ended without being asked to; another takes its place after delay seconds",
)

def write(logger: Any, event: LogEvent, **fields: Any) -> None:
    """Write ``event`` at its level to a structlog-style ``logger`` (the shell's lines)."""
    event.check(fields)
    getattr(logger, event.level)(event.name, **fields)


EVENTS: Final[dict[str, LogEvent]] = {
    event.name: event for event in list(globals().values()) if isinstance(event, LogEvent)
}
