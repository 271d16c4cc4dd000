"""The replies pipeproxy gives itself, each written once: what it refuses, and how it
says that the session cannot go on.

Every other reply a client gets is the upstream's. The texts follow Postfix's where
Postfix has one for the same situation, so clients and operators meet familiar words.
"""

from __future__ import annotations

from typing import Final

from .config import Config
from .wire import Reply, reply

# Never forwarded: the proxy would go blind inside TLS (RFC 3207), or could not frame
# BDAT chunks (RFC 3030). Neither is advertised, so a client sending them gets 502.
# XCLIENT and XFORWARD would let a client speak for pipeproxy to an MTA that trusts it:
# refused as Postfix refuses an unauthorised client.
NOT_AUTHORISED: Final = reply(550, "5.7.0 Error: insufficient authorization")
REFUSED: Final = {
    "STARTTLS": reply(502, "5.5.1 Error: STARTTLS is not available through this proxy"),
    "BDAT": reply(502, "5.5.1 Error: BDAT is not available through this proxy"),
    "XCLIENT": NOT_AUTHORISED,
    "XFORWARD": NOT_AUTHORISED,
}
# An EHLO keyword the operator discards also turns off the command it names, as in
# Postfix: hidden but still relayed would be a hole, not a policy.
DISABLED_WITH_KEYWORD: Final = {
    "AUTH": reply(503, "5.5.1 Error: authentication not enabled"),
    "ETRN": reply(502, "5.5.1 Error: command not implemented"),
    "VRFY": reply(502, "5.5.1 Error: command not implemented"),
    "EXPN": reply(502, "5.5.1 Error: command not implemented"),
    "ATRN": reply(502, "5.5.1 Error: command not implemented"),
}
# Before the client's EHLO or HELO has let pipeproxy tell the upstream who the client is,
# only these may pass (RFC 5321 §4.1.4 lets a server insist on EHLO/HELO first).
BEFORE_HELLO: Final = frozenset({"EHLO", "HELO", "NOOP", "RSET", "QUIT", "HELP"})
SEND_HELLO_FIRST: Final = reply(503, "5.5.1 Error: send HELO/EHLO first")
READY_FOR_TLS: Final = reply(220, "2.0.0 Ready to start TLS")
TLS_ACTIVE: Final = reply(554, "5.5.1 Error: TLS already active")
TRANSACTION_IN_PROGRESS: Final = reply(503, "5.5.1 Error: MAIL transaction in progress")
MUST_STARTTLS: Final = reply(530, "5.7.0 Must issue a STARTTLS command first")
ENCRYPTION_REQUIRED: Final = reply(538, "5.7.11 Encryption required for requested authentication mechanism")
EARLY_TALKER: Final = reply(554, "5.5.1 Error: talking before the greeting, closing connection")
UNAVAILABLE: Final = reply(421, "4.4.2 Upstream server unavailable, closing connection")
SHUTTING_DOWN: Final = reply(421, "4.3.2 Service shutting down, closing connection")
INTERNAL_ERROR: Final = reply(421, "4.3.0 Error: internal error, closing connection")
NOT_COMPLETED: Final = reply(421, "4.4.2 Error: message not completed, closing connection")
UPSTREAM_TLS_UNAVAILABLE: Final = reply(421, "4.7.0 TLS with the upstream server not available, closing connection")
UPSTREAM_TIMED_OUT: Final = reply(421, "4.4.2 Upstream server timed out, closing connection")
TOO_MANY_RECIPIENTS: Final = reply(452, "4.5.3 Error: too many recipients")
TOO_BIG: Final = reply(552, "5.3.4 Message size exceeds fixed maximum message size")
TOO_BIG_REASON: Final = "message too big"
BARE_LINE_ENDING: Final = reply(550, "5.6.0 Message refused: bare CR, LF or NUL in content")

def needs_tls(verb: str, config: Config) -> Reply | None:
    """The refusal of ``verb`` in a session not yet encrypted, if it has one (RFC 3207 §4,
    RFC 4954 §6's 538, Postfix's smtpd_tls_auth_only and smtpd_tls_security_level=encrypt)."""
    if config.require_tls and verb in ("MAIL", "AUTH"):
        return MUST_STARTTLS
    if verb == "AUTH" and not config.auth_without_tls:
        return ENCRYPTION_REQUIRED
    return None
