"""A pipeproxy log written by hand, in the documented format, for ``pipeproxy inspect``'s tests.

Three sessions, lines interleaved as a busy proxy writes them:

* 3f2a9c1b7d0e from 127.0.0.2 (EHLO mail.client.test): a message to two recipients,
  one refused by the MTA with its own text, then a second message refused at DATA, slow.
* 0a1b2c3d4e5f from [::1] (HELO v6.client.test), with a transcript and TLS details:
  a message accepted with a queue id, then the client's connection lost.
* 99aa00bb11cc from 10.1.2.3: the upstream refused MAIL; still open at the end.

Plus lines of the process (listening, client refused) and none of the new fields'
absence: ``old_transaction`` is a line as pipeproxy wrote it before they existed.
"""

from __future__ import annotations

import json
from typing import Any

A = {"session": "3f2a9c1b7d0e", "client": "127.0.0.2:40000", "upstream": "127.0.0.1:25"}
B = {"session": "0a1b2c3d4e5f", "client": "[::1]:40001", "upstream": "127.0.0.1:25"}
C = {"session": "99aa00bb11cc", "client": "10.1.2.3:5555", "upstream": "127.0.0.1:25"}

REFUSAL = "5.1.1 <nobody@dest.test>: Recipient address rejected: User unknown in virtual mailbox table"


def _line(second: float, event: str, level: str = "info", **fields: Any) -> dict[str, Any]:
    minutes, seconds = divmod(second, 60)
    stamp = f"2026-11-28T09:{int(minutes):02d}:{seconds:09.6f}Z"
    return {**fields, "event": event, "level": level, "timestamp": stamp}


def transaction(second: float, context: dict[str, Any], **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "helo": None, "sender": "", "recipients": [], "recipients_accepted": 0, "recipients_rejected": 0,
        "size": None, "message_id": None, "queue_id": None, "reply_code": None, "reply": None,
        "outcome": "message accepted", "upstream_wait": 0.01, "groups": [],
    }
    return _line(second, "transaction", **context, **{**base, **fields})


LINES: list[dict[str, Any]] = [
    _line(0.0, "listening", addresses=["127.0.0.1:2525"], upstream="127.0.0.1:25"),
    _line(1.0, "session open", **A, server="127.0.0.1:2525"),
    _line(1.1, "session open", **B, server="127.0.0.1:2525"),
    _line(1.2, "transcript", **B, direction="client", line="EHLO v6.client.test"),
    _line(1.3, "transcript", **B, direction="to client", code=250, text="legacy.test"),
    _line(1.4, "command refused", **B, verb="STARTTLS", reason="not available through this proxy"),
    transaction(
        2.0, A, helo="mail.client.test", sender="alice@client.test",
        recipients=[{"address": "bob@dest.test", "code": 250},
                    {"address": "nobody@dest.test", "code": 550, "reply": REFUSAL}],
        recipients_accepted=1, recipients_rejected=1, size=1234, message_id="<m1@client.test>",
        queue_id="4XyZ12", reply_code=250, reply="2.0.0 Ok: queued as 4XyZ12", outcome="message accepted",
        upstream_wait=0.012, groups=[4, 1],
    ),
    _line(2.1, "transcript", **B, direction="client", line="MAIL FROM:<carol@v6.client.test>"),
    _line(2.2, "transcript", **B, direction="upstream", code=250, text="2.1.0 Ok"),
    transaction(
        2.5, B, helo="v6.client.test", sender="carol@v6.client.test",
        recipients=[{"address": "dave@dest.test", "code": 250}], recipients_accepted=1, size=99,
        queue_id="Q77", reply_code=250, reply="2.0.0 Ok: queued as Q77", upstream_wait=0.02, groups=[3, 1],
        tls={"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"},
    ),
    _line(2.6, "client refused", client="192.0.2.9:1234", reason="denied by --deny"),
    _line(3.0, "session open", **C, server="127.0.0.1:2525"),
    transaction(
        3.5, A, helo="mail.client.test", sender="alice@client.test",
        recipients=[{"address": "erin@other.test", "code": 250}], recipients_accepted=1,
        reply_code=554, reply="5.7.1 Message rejected as spam", outcome="DATA refused", upstream_wait=2.5,
        groups=[3],
    ),
    transaction(
        3.6, C, sender="mallory@spam.test", reply_code=451, reply="4.3.0 Try again later",
        outcome="MAIL refused", upstream_wait=0.5, groups=[1],
    ),
    _line(4.0, "session closed", **A, reason="client quit", duration=3.0, commands=12, messages=1),
    transaction(
        4.1, B, helo="v6.client.test", sender="carol@v6.client.test",
        recipients=[{"address": "frank@dest.test", "code": 250}], recipients_accepted=1,
        outcome="client connection lost", upstream_wait=0.001, groups=[2],
    ),
    _line(4.2, "session closed", "warning", **B, reason="client connection lost", duration=3.1, commands=6,
          messages=1),
]

# A transaction line as pipeproxy wrote it before the new fields: no helo, recipients, ids.
OLD_TRANSACTION = _line(
    5.0, "transaction", session="abcdefabcdef", client="127.0.0.1:1", upstream="127.0.0.1:25",
    sender="old@client.test", recipients_accepted=2, recipients_rejected=1, size=10, reply_code=250,
    reply="2.0.0 Ok: queued", outcome="message accepted", upstream_wait=0.03, groups=[5, 1],
)


def text(lines: list[dict[str, Any]] | None = None) -> str:
    return "".join(json.dumps(line) + "\n" for line in (LINES if lines is None else lines))
