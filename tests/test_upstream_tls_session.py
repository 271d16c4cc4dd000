"""Transcripts of TLS toward the upstream (--upstream-tls): pipeproxy's own STARTTLS after
the upstream's first EHLO reply, nothing of the client's upstream until TLS is up and the
EHLO repeated inside it, bytes after the upstream's 220 never taken as replies, and each
mode's answer to an upstream without TLS or with a handshake that fails.
"""

from __future__ import annotations

import pytest
from test_identity import CLIENTS_EHLO_REPLY, XCLIENT_LINE
from test_identity import EHLO_WITH_XCLIENT as XCLIENT_EHLO

from pipeproxy.core.config import BareLineEndings, Config

from test_session import GREETING
from transcript import (
    CLOSED,
    LOG,
    RECONNECTED,
    TO_CLIENT,
    TO_UPSTREAM,
    UPSTREAM_TLS_FAILED,
    UPSTREAM_TLS_UP,
    C,
    U,
    play,
    play_every_way,
)

MAY, ENCRYPT, VERIFY = (Config(upstream_tls=mode) for mode in ("may", "encrypt", "verify"))
WITH_STARTTLS = b"250-legacy.test\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
INSIDE_TLS = b"250-legacy.test\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n"
NO_STARTTLS = b"250-legacy.test\r\n250 8BITMIME\r\n"
CLIENTS_REPLY = b"250-legacy.test\r\n250-AUTH PLAIN\r\n250-8BITMIME\r\n250 PIPELINING\r\n"
CLEAR_REPLY = b"250-legacy.test\r\n250-8BITMIME\r\n250 PIPELINING\r\n"
GO_AHEAD = b"220 2.0.0 Ready to start TLS\r\n"
UNAVAILABLE = b"421 4.7.0 TLS with the upstream server not available, closing connection\r\n"
STARTTLS_UP = [
    (C, b"EHLO client.test\r\n"),
    (TO_UPSTREAM, b"EHLO client.test\r\n"),
    (U, WITH_STARTTLS),
    (TO_UPSTREAM, b"STARTTLS\r\n"),
    (U, GO_AHEAD),
]
OPENED_IN_TLS = (
    GREETING
    + STARTTLS_UP
    + [
        (UPSTREAM_TLS_UP,),
        (LOG, "upstream tls established", {"version": "TLSv1.2"}),
        (TO_UPSTREAM, b"EHLO client.test\r\n"),
        (U, INSIDE_TLS),
        (TO_CLIENT, CLIENTS_REPLY),
    ]
)


@pytest.mark.parametrize("config", [MAY, ENCRYPT, VERIFY], ids=["may", "encrypt", "verify"])
def test_starttls_upstream_then_ehlo_again_and_the_client_sees_only_the_reply_inside_tls(config):
    """The client's pipelined commands wait in pipeproxy until TLS is up and EHLO repeated."""
    run = play_every_way(
        GREETING
        + [
            (C, b"EHLO client.test\r\nMAIL FROM:<s@x>\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, WITH_STARTTLS),
            (TO_UPSTREAM, b"STARTTLS\r\n"),
            (U, GO_AHEAD),
            (UPSTREAM_TLS_UP,),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, INSIDE_TLS),
            (TO_CLIENT, CLIENTS_REPLY),
            (TO_UPSTREAM, b"MAIL FROM:<s@x>\r\n"),
            (U, b"250 2.1.0 Ok\r\n"),
            (TO_CLIENT, b"250 2.1.0 Ok\r\n"),
        ],
        config,
    )
    assert run.client_writes[1:] == [CLIENTS_REPLY, b"250 2.1.0 Ok\r\n"], "one EHLO reply, the one inside TLS"


def test_with_none_the_upstreams_starttls_is_left_alone():
    play(
        GREETING
        + [
            (C, b"EHLO client.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, WITH_STARTTLS),
            (TO_CLIENT, CLEAR_REPLY),
        ]
    )


def test_upstream_bytes_after_its_220_are_discarded_never_taken_as_replies():
    """Response injection: a 250 sent in clear with the 220 would answer the EHLO inside TLS."""
    run = play_every_way(
        GREETING
        + STARTTLS_UP[:-1]
        + [
            (U, GO_AHEAD + b"250-injected.test\r\n250 AUTH PLAIN\r\n"),
            (LOG, "upstream bytes after STARTTLS discarded"),
            (UPSTREAM_TLS_UP,),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, INSIDE_TLS),
            (TO_CLIENT, CLIENTS_REPLY),
        ],
        MAY,
    )
    assert b"injected" not in b"".join(run.client_writes)
    discarded = run.events("upstream bytes after STARTTLS discarded")
    assert sum(line["octets"] for line in discarded) == len(b"250-injected.test\r\n250 AUTH PLAIN\r\n")


def test_may_goes_on_in_clear_when_starttls_is_not_offered_or_refused():
    play(
        GREETING
        + [
            (C, b"EHLO client.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, NO_STARTTLS),
            (TO_CLIENT, CLEAR_REPLY),
        ],
        MAY,
    )
    play_every_way(
        GREETING
        + STARTTLS_UP[:-1]
        + [
            (U, b"454 4.7.0 TLS not available due to local problem\r\n"),
            (LOG, "upstream tls failed", {"action": "clear"}),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, WITH_STARTTLS),
            (TO_CLIENT, CLEAR_REPLY),
        ],
        MAY,
    )


def test_may_reconnects_in_clear_when_the_handshake_fails():
    """As Postfix's may: the failed connection is dropped, a new one goes on in clear,
    and the client, still waiting for its EHLO reply, sees nothing of it."""
    run = play(
        GREETING
        + STARTTLS_UP
        + [
            (UPSTREAM_TLS_FAILED, "wrong version number"),
            (LOG, "upstream tls failed", {"action": "clear", "reason": "TLS handshake failed: wrong version number"}),
            (RECONNECTED,),
            (U, b"220 legacy.test ESMTP\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, WITH_STARTTLS),
            (TO_CLIENT, CLEAR_REPLY),
            (C, b"MAIL FROM:<s@x>\r\n"),
            (TO_UPSTREAM, b"MAIL FROM:<s@x>\r\n"),
        ],
        MAY,
    )
    assert run.upstream_writes.count(b"STARTTLS\r\n") == 1, "no second try in this session"


@pytest.mark.parametrize("config", [ENCRYPT, VERIFY], ids=["encrypt", "verify"])
def test_encrypt_and_verify_fail_closed_without_tls(config):
    for ending in (
        [(U, NO_STARTTLS)],
        [(U, WITH_STARTTLS), (TO_UPSTREAM, b"STARTTLS\r\n"), (U, b"454 4.7.0 TLS not available\r\n")],
        [(U, WITH_STARTTLS), (TO_UPSTREAM, b"STARTTLS\r\n"), (U, GO_AHEAD), (UPSTREAM_TLS_FAILED,)],
        [(U, b"502 5.5.2 Error: command not recognized\r\n")],  # no ESMTP, so no STARTTLS
    ):
        run = play(
            GREETING
            + [(C, b"EHLO client.test\r\nMAIL FROM:<s@x>\r\n"), (TO_UPSTREAM, b"EHLO client.test\r\n")]
            + ending
            + [
                (LOG, "upstream tls failed", {"action": "closed"}),
                (TO_CLIENT, UNAVAILABLE + b"421 4.4.2 Upstream server unavailable, closing connection\r\n"),
                (CLOSED,),
            ],
            config,
        )
        assert b"MAIL" not in b"".join(run.upstream_writes)


def test_a_helo_client_is_probed_with_ehlo_so_starttls_can_be_seen():
    play_every_way(
        GREETING
        + [
            (C, b"HELO client.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, WITH_STARTTLS),
            (TO_UPSTREAM, b"STARTTLS\r\n"),
            (U, GO_AHEAD),
            (UPSTREAM_TLS_UP,),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, INSIDE_TLS),
            (TO_UPSTREAM, b"HELO client.test\r\n"),
            (U, b"250 legacy.test\r\n"),
            (TO_CLIENT, b"250 legacy.test\r\n"),
        ],
        ENCRYPT,
    )


def test_starttls_comes_first_then_xclient_inside_tls():
    run = play(
        GREETING
        + [
            (C, b"EHLO client.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, XCLIENT_EHLO.replace(b"250 8BITMIME", b"250-STARTTLS\r\n250 8BITMIME")),
            (TO_UPSTREAM, b"STARTTLS\r\n"),
            (U, GO_AHEAD),
            (UPSTREAM_TLS_UP,),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, XCLIENT_EHLO),
            (LOG, "xclient sent"),
            (TO_UPSTREAM, XCLIENT_LINE),
            (U, b"220 legacy.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, XCLIENT_EHLO),
            (TO_CLIENT, CLIENTS_EHLO_REPLY),
        ],
        ENCRYPT,
    )
    assert run.upstream_writes.index(XCLIENT_LINE) > run.upstream_writes.index(b"STARTTLS\r\n")


# A message pipeproxy refuses (a NUL under the reject policy), the upstream dropped and a
# new one greeted silently, with the client's NOOP waiting.
REFUSED_THEN_RECONNECTED = [
            (C, b"MAIL FROM:<s@x>\r\n"),
            (TO_UPSTREAM, b"MAIL FROM:<s@x>\r\n"),
            (U, b"250 Ok\r\n"),
            (TO_CLIENT, b"250 Ok\r\n"),
            (C, b"RCPT TO:<r@x>\r\n"),
            (TO_UPSTREAM, b"RCPT TO:<r@x>\r\n"),
            (U, b"250 Ok\r\n"),
            (TO_CLIENT, b"250 Ok\r\n"),
            (C, b"DATA\r\n"),
            (TO_UPSTREAM, b"DATA\r\n"),
            (U, b"354 go\r\n"),
            (TO_CLIENT, b"354 go\r\n"),
            (C, b"\x00\r\n.\r\nNOOP\r\n"),
            (TO_CLIENT, b"550 5.6.0 Message refused: bare CR, LF or NUL in content\r\n"),
            (RECONNECTED,),
            (U, b"220 legacy.test ESMTP\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
]


def test_the_silent_replay_after_a_reconnect_does_starttls_too():
    play_every_way(
        OPENED_IN_TLS
        + REFUSED_THEN_RECONNECTED
        + [
            (U, WITH_STARTTLS),
            (TO_UPSTREAM, b"STARTTLS\r\n"),
            (U, GO_AHEAD),
            (UPSTREAM_TLS_UP,),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, INSIDE_TLS),
            (LOG, "upstream reconnected"),
            (TO_UPSTREAM, b"NOOP\r\n"),
            (U, b"250 2.0.0 Ok\r\n"),
            (TO_CLIENT, b"250 2.0.0 Ok\r\n"),
        ],
        Config(upstream_tls="encrypt", bare_line_endings=BareLineEndings.REJECT),
    )


def test_the_replay_fails_closed_when_the_new_connection_has_no_tls():
    play(
        OPENED_IN_TLS
        + REFUSED_THEN_RECONNECTED
        + [
            (U, NO_STARTTLS),
            (LOG, "upstream tls failed", {"action": "closed"}),
            (TO_CLIENT, UNAVAILABLE),
            (CLOSED,),
        ],
        Config(upstream_tls="verify", bare_line_endings=BareLineEndings.REJECT),
    )


def test_the_handshake_is_bounded_by_the_tls_handshake_timeout():
    from transcript import TIMEOUT

    run = play(
        GREETING
        + STARTTLS_UP
        + [
            (TIMEOUT,),
            (TO_CLIENT, b"421 4.4.2 Upstream server timed out, closing connection\r\n"),
            (CLOSED,),
        ],
        Config(upstream_tls="may"),
    )
    assert run.clock.now == 1000.0 + Config().timeouts.tls_handshake
