"""Transcripts of TLS toward clients: STARTTLS offered and terminated by pipeproxy, nothing
sent in clear after it ever answered inside TLS, the session started over, and AUTH kept
for encrypted sessions.
"""

from __future__ import annotations

from pipeproxy.core.config import Config

from test_session import GREETING
from transcript import CLOSED, LOG, TLS_UP, TO_CLIENT, TO_UPSTREAM, C, U, play, play_every_way

TLS = Config(tls_cert="cert.pem", tls_key="key.pem")  # the core only asks whether TLS is on
UPSTREAM_EHLO = b"250-legacy.test\r\n250-AUTH PLAIN LOGIN\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
BEFORE_TLS = b"250-legacy.test\r\n250-8BITMIME\r\n250-STARTTLS\r\n250 PIPELINING\r\n"
AFTER_TLS = b"250-legacy.test\r\n250-AUTH PLAIN LOGIN\r\n250-8BITMIME\r\n250 PIPELINING\r\n"
OPENED = GREETING + [
    (C, b"EHLO client.test\r\n"),
    (TO_UPSTREAM, b"EHLO client.test\r\n"),
    (U, UPSTREAM_EHLO),
    (TO_CLIENT, BEFORE_TLS),
]
READY = b"220 2.0.0 Ready to start TLS\r\n"


def test_starttls_is_offered_and_the_session_starts_over_inside_tls():
    """The upstream's own STARTTLS is never relayed; pipeproxy's is offered, and AUTH only
    once encrypted. After TLS the client greets again, and its EHLO goes upstream again."""
    run = play_every_way(
        OPENED
        + [
            (C, b"STARTTLS\r\n"),
            (TO_CLIENT, READY),
            (TLS_UP,),
            (LOG, "tls established", {"version": "TLSv1.3"}),
            (C, b"MAIL FROM:<s@client.test>\r\n"),
            (TO_CLIENT, b"503 5.5.1 Error: send HELO/EHLO first\r\n"),
            (C, b"EHLO client.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, UPSTREAM_EHLO),
            (TO_CLIENT, AFTER_TLS),
            (C, b"AUTH PLAIN AHUAcA==\r\n"),
            (TO_UPSTREAM, b"AUTH PLAIN AHUAcA==\r\n"),
        ],
        TLS,
    )
    assert run.upstream_writes.count(b"STARTTLS\r\n") == 0


def test_commands_sent_in_clear_after_starttls_are_never_answered_inside_tls():
    """CVE-2011-0411: 'STARTTLS' and more in one write; what came after it is discarded."""
    run = play(
        OPENED
        + [
            (C, b"STARTTLS\r\nRSET\r\nMAIL FROM:<injected@evil.test>\r\n"),
            (LOG, "plaintext after STARTTLS discarded", {"octets": 38}),
            (TO_CLIENT, READY),
            (TLS_UP,),
            (C, b"EHLO client.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, UPSTREAM_EHLO),
            (TO_CLIENT, AFTER_TLS),
        ],
        TLS,
    )
    assert b"injected" not in b"".join(run.upstream_writes)


def test_auth_before_tls_is_refused_with_538_unless_allowed_and_require_tls_refuses_mail():
    play_every_way(
        OPENED
        + [
            (C, b"AUTH PLAIN AHUAcA==\r\n"),
            (TO_CLIENT, b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"),
            (C, b"MAIL FROM:<s@x>\r\n"),
            (TO_UPSTREAM, b"MAIL FROM:<s@x>\r\n"),
        ],
        TLS,
    )
    allowed = Config(tls_cert="c", tls_key="k", auth_without_tls=True)
    play(
        GREETING
        + [
            (C, b"EHLO client.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, UPSTREAM_EHLO),
            (TO_CLIENT, AFTER_TLS.replace(b"250 PIPELINING", b"250-STARTTLS\r\n250 PIPELINING")),
            (C, b"AUTH PLAIN AHUAcA==\r\n"),
            (TO_UPSTREAM, b"AUTH PLAIN AHUAcA==\r\n"),
        ],
        allowed,
    )
    required = Config(tls_cert="c", tls_key="k", require_tls=True)
    must = b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    play(OPENED + [(C, b"MAIL FROM:<s@x>\r\n"), (TO_CLIENT, must), (C, b"AUTH LOGIN\r\n"), (TO_CLIENT, must)], required)


def test_starttls_twice_or_inside_a_transaction_is_refused_and_without_a_certificate_502():
    play(
        OPENED
        + [
            (C, b"STARTTLS\r\n"),
            (TO_CLIENT, READY),
            (TLS_UP,),
            (C, b"STARTTLS\r\n"),
            (TO_CLIENT, b"554 5.5.1 Error: TLS already active\r\n"),
        ],
        TLS,
    )
    play(
        OPENED
        + [
            (C, b"MAIL FROM:<s@x>\r\n"),
            (TO_UPSTREAM, b"MAIL FROM:<s@x>\r\n"),
            (U, b"250 Ok\r\n"),
            (TO_CLIENT, b"250 Ok\r\n"),
            (C, b"STARTTLS\r\n"),
            (TO_CLIENT, b"503 5.5.1 Error: MAIL transaction in progress\r\n"),
        ],
        TLS,
    )
    no_tls = GREETING + [
        (C, b"EHLO client.test\r\n"),
        (TO_UPSTREAM, b"EHLO client.test\r\n"),
        (U, UPSTREAM_EHLO),
        (TO_CLIENT, b"250-legacy.test\r\n250-AUTH PLAIN LOGIN\r\n250-8BITMIME\r\n250 PIPELINING\r\n"),
        (C, b"STARTTLS\r\n"),
        (TO_CLIENT, b"502 5.5.1 Error: STARTTLS is not available through this proxy\r\n"),
    ]
    play(no_tls)


def test_a_failed_handshake_closes_without_another_word_and_logs_why():
    from pipeproxy.core.events import TlsFailed

    run = play(OPENED + [(C, b"STARTTLS\r\n"), (TO_CLIENT, READY)], TLS)
    run.feed(TlsFailed("wrong version number"))
    assert run.closed is not None and not run.closed.clean
    assert run.new_client_bytes() == b"", "nothing more in clear"
    assert run.events("tls handshake failed") == [{"reason": "wrong version number"}]


def test_the_transaction_line_says_the_message_came_over_tls():
    run = play(
        OPENED
        + [
            (C, b"STARTTLS\r\n"),
            (TO_CLIENT, READY),
            (TLS_UP,),
            (C, b"EHLO client.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, UPSTREAM_EHLO),
            (TO_CLIENT, AFTER_TLS),
            (C, b"MAIL FROM:<s@x>\r\nRSET\r\n"),
            (TO_UPSTREAM, b"MAIL FROM:<s@x>\r\n"),
            (U, b"250 Ok\r\n"),
            (TO_UPSTREAM, b"RSET\r\n"),
            (U, b"250 Ok\r\n"),
            (TO_CLIENT, b"250 Ok\r\n250 Ok\r\n"),
            (C, b"QUIT\r\n"),
            (TO_UPSTREAM, b"QUIT\r\n"),
            (U, b"221 Bye\r\n"),
            (TO_CLIENT, b"221 Bye\r\n"),
            (CLOSED,),
        ],
        TLS,
    )
    [line] = run.events("transaction")
    assert line["tls"] == {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"}
