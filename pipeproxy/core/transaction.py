"""One mail transaction, MAIL to its final reply, as the canonical log line tells it.

The session fills it in as replies come (each recipient's answer, the size, the
Message-ID, the MTA's queue id, the time waited on the MTA, the client writes its
replies went in) and writes it once, when the transaction ends, however it ends.
"""

from __future__ import annotations

from typing import Any

from .events import TlsInfo
from .wire import Reply


class Transaction:
    """One mail transaction, MAIL to its final reply, for the canonical log line."""

    __slots__ = (
        "sender", "helo", "rcpt_sent", "accepted", "rejected", "recipients", "size", "message_id", "queue_id",
        "upstream_wait", "groups",
    )  # fmt: skip

    # Not a dataclass: a dataclass's generated __init__ stays interpreted (wire.Reply).
    def __init__(self, sender: str, helo: str | None) -> None:
        self.sender = sender
        self.helo = helo  # the client's EHLO/HELO name
        self.rcpt_sent = 0  # RCPT commands sent upstream
        self.accepted = 0
        self.rejected = 0
        # Each recipient's answer: {"address", "code"} and, when refused, the "reply" text.
        self.recipients: list[dict[str, Any]] = []
        self.size = 0
        self.message_id: str | None = None
        self.queue_id: str | None = None
        self.upstream_wait = 0.0
        self.groups: list[int] = []

    def answered(self, address: str, answer: Reply) -> None:
        if answer.code < 400:
            self.recipients.append({"address": address, "code": answer.code})
            self.accepted += 1
        else:
            self.recipients.append({"address": address, "code": answer.code, "reply": answer.text})
            self.rejected += 1

    def log_fields(self, final: Reply | None, outcome: str, held: int, tls: TlsInfo | None) -> dict[str, Any]:
        """The fields of the ``transaction`` line; ``held``: replies gathered for a write
        not yet made, counted as a group of their own."""
        return {
            "helo": self.helo,
            "sender": self.sender,
            "recipients": self.recipients,
            "recipients_accepted": self.accepted,
            "recipients_rejected": self.rejected,
            "size": self.size,
            "message_id": self.message_id,
            "queue_id": self.queue_id,
            "reply_code": final.code if final else None,
            "reply": final.text if final else None,
            "outcome": outcome,
            "upstream_wait": round(self.upstream_wait, 6),
            "tls": {"version": tls.version, "cipher": tls.cipher} if tls else None,
            # replies per client write
            "groups": self.groups + ([held] if held else []),
        }
