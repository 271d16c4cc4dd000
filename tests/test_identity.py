"""Transcripts of the front door: the MTA learns who the client really is (XCLIENT,
XFORWARD), clients can never speak for pipeproxy, and what an operator turns off is off.

The session's client is 127.0.0.1 port 40000, connected to 127.0.0.1:2525 (transcript.py).
"""

from __future__ import annotations

import pytest

from pipeproxy.core.config import Address, BareLineEndings, Config
from pipeproxy.core.events import ClientData, UpstreamData
from pipeproxy.core.identity import ClientIdentity, command_line, xtext

from test_session import GREETING, OPENED, lockstep_group
from transcript import CLOSED, LOG, RECONNECTED, TO_CLIENT, TO_UPSTREAM, C, U, play, play_every_way

POSTFIX_XCLIENT = b"250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n"
EHLO_WITH_XCLIENT = b"250-legacy.test\r\n" + POSTFIX_XCLIENT + b"250 8BITMIME\r\n"
XCLIENT_LINE = (
    b"XCLIENT NAME=[UNAVAILABLE] ADDR=127.0.0.1 PORT=40000 PROTO=ESMTP HELO=client.test"
    b" DESTADDR=127.0.0.1 DESTPORT=2525\r\n"
)
CLIENTS_EHLO_REPLY = b"250-legacy.test\r\n250-8BITMIME\r\n250 PIPELINING\r\n"
UNAVAILABLE = b"421 4.4.2 Upstream server unavailable, closing connection\r\n"


def test_xclient_is_sent_before_the_clients_first_command_and_the_session_restarts():
    """Postfix's XCLIENT_README: after XCLIENT a new 220, and EHLO again; the client sees
    the reply to that EHLO, rewritten, and nothing it pipelined goes up early."""
    play_every_way(
        GREETING
        + [
            (C, b"EHLO client.test\r\nMAIL FROM:<s@client.test>\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, EHLO_WITH_XCLIENT),
            (LOG, "xclient sent"),
            (TO_UPSTREAM, XCLIENT_LINE),
            (U, b"220 legacy.test ESMTP\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, b"250-legacy.test\r\n" + POSTFIX_XCLIENT + b"250 8BITMIME\r\n"),
            (TO_CLIENT, CLIENTS_EHLO_REPLY),
            (TO_UPSTREAM, b"MAIL FROM:<s@client.test>\r\n"),
            (U, b"250 2.1.0 Ok\r\n"),
            (TO_CLIENT, b"250 2.1.0 Ok\r\n"),
        ]
    )


def test_without_xclient_on_offer_the_ehlo_reply_is_relayed_at_once():
    play_every_way(OPENED + [(C, b"MAIL FROM:<s@x>\r\n"), (TO_UPSTREAM, b"MAIL FROM:<s@x>\r\n")])


def test_a_refused_xclient_fails_closed_never_going_on_as_pipeproxy():
    run = play_every_way(
        GREETING
        + [
            (C, b"EHLO client.test\r\nMAIL FROM:<s@client.test>\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, EHLO_WITH_XCLIENT),
            (TO_UPSTREAM, XCLIENT_LINE),
            (U, b"550 5.7.0 Error: insufficient authorization\r\n"),
            (LOG, "xclient refused", {"code": 550}),
            (TO_CLIENT, UNAVAILABLE * 2),  # the EHLO, then the MAIL waiting behind it
            (CLOSED,),
        ]
    )
    assert run.closed is not None and not run.closed.clean


def test_with_xclient_off_nothing_is_sent_and_the_keyword_is_still_hidden():
    play_every_way(
        GREETING
        + [
            (C, b"EHLO client.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, EHLO_WITH_XCLIENT),
            (TO_CLIENT, CLIENTS_EHLO_REPLY),
        ],
        Config(xclient="off"),
    )


def test_a_helo_client_is_probed_with_ehlo_then_told_as_smtp():
    play_every_way(
        GREETING
        + [
            (C, b"HELO client.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, EHLO_WITH_XCLIENT),
            (TO_UPSTREAM, XCLIENT_LINE.replace(b"PROTO=ESMTP", b"PROTO=SMTP")),
            (U, b"220 legacy.test ESMTP\r\n"),
            (TO_UPSTREAM, b"HELO client.test\r\n"),
            (U, b"250 legacy.test\r\n"),
            (TO_CLIENT, b"250 legacy.test\r\n"),
        ]
    )


def test_a_helo_client_of_an_upstream_without_esmtp_gets_its_helo_through():
    play_every_way(
        GREETING
        + [
            (C, b"HELO client.test\r\nMAIL FROM:<s@x>\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, b"502 5.5.2 Error: command not recognized\r\n"),
            (TO_UPSTREAM, b"HELO client.test\r\n"),
            (U, b"250 legacy.test\r\n"),
            (TO_CLIENT, b"250 legacy.test\r\n"),
            (TO_UPSTREAM, b"MAIL FROM:<s@x>\r\n"),
        ]
    )


def test_commands_before_any_hello_are_refused_while_the_upstream_may_want_xclient():
    """Forwarded, MAIL would reach the MTA as from pipeproxy's own (trusted) address."""
    play_every_way(
        GREETING
        + [
            (C, b"MAIL FROM:<s@x>\r\nNOOP\r\n"),
            (TO_UPSTREAM, b"NOOP\r\n"),
            (U, b"250 2.0.0 Ok\r\n"),
            (TO_CLIENT, b"503 5.5.1 Error: send HELO/EHLO first\r\n250 2.0.0 Ok\r\n"),
        ]
    )
    play(GREETING + [(C, b"MAIL FROM:<s@x>\r\n"), (TO_UPSTREAM, b"MAIL FROM:<s@x>\r\n")], Config(xclient="off"))


@pytest.mark.parametrize("verb", [b"XCLIENT ADDR=10.1.2.3", b"XFORWARD ADDR=10.1.2.3", b"xclient NAME=spoof"])
def test_a_client_can_never_speak_for_pipeproxy(verb):
    """Whatever the configuration: refused here, never forwarded, and never advertised."""
    for config in (Config(), Config(xclient="off", xforward="off")):
        play_every_way(
            OPENED
            + [
                (C, verb + b"\r\n"),
                (TO_CLIENT, b"550 5.7.0 Error: insufficient authorization\r\n"),
                (C, b"NOOP\r\n"),
                (TO_UPSTREAM, b"NOOP\r\n"),
            ],
            config,
        )


def test_a_discarded_extension_is_disabled_not_just_hidden():
    """Postfix's answer for AUTH when it is not enabled; a 502 for the other commands."""
    config = Config(discard_ehlo_keywords=frozenset({"AUTH", "ETRN", "VRFY"}))
    play_every_way(
        GREETING
        + [
            (C, b"EHLO client.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, b"250-legacy.test\r\n250-AUTH PLAIN LOGIN\r\n250-ETRN\r\n250 VRFY\r\n"),
            (TO_CLIENT, b"250-legacy.test\r\n250 PIPELINING\r\n"),
            (C, b"AUTH PLAIN AGEAYg==\r\n"),
            (TO_CLIENT, b"503 5.5.1 Error: authentication not enabled\r\n"),
            (C, b"ETRN example.com\r\n"),
            (TO_CLIENT, b"502 5.5.1 Error: command not implemented\r\n"),
            (C, b"vrfy root\r\n"),
            (TO_CLIENT, b"502 5.5.1 Error: command not implemented\r\n"),
        ],
        config,
    )


XFORWARD_EHLO = b"250-legacy.test\r\n250-XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT\r\n250 8BITMIME\r\n"
XFORWARD_LINE = (
    b"XFORWARD NAME=[UNAVAILABLE] ADDR=127.0.0.1 PORT=40000 PROTO=ESMTP HELO=client.test IDENT=5e55104"
    b" SOURCE=REMOTE\r\n"
)


def test_xforward_goes_before_each_mail_and_its_refusal_stops_nothing():
    play_every_way(
        GREETING
        + [
            (C, b"EHLO client.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, XFORWARD_EHLO),
            (TO_CLIENT, CLIENTS_EHLO_REPLY),
            (C, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRSET\r\nMAIL FROM:<c@x>\r\n"),
            (TO_UPSTREAM, XFORWARD_LINE),
            (U, b"250 2.0.0 Ok\r\n"),
            (TO_UPSTREAM, b"MAIL FROM:<a@x>\r\n"),
            (U, b"250 2.1.0 Ok\r\n"),
            (TO_UPSTREAM, b"RCPT TO:<b@y>\r\n"),
            (U, b"250 2.1.5 Ok\r\n"),
            (TO_UPSTREAM, b"RSET\r\n"),
            (U, b"250 2.0.0 Ok\r\n"),
            (TO_UPSTREAM, XFORWARD_LINE),
            (U, b"550 5.5.4 Bad XFORWARD attribute\r\n"),
            (LOG, "xforward refused", {"code": 550}),
            (TO_UPSTREAM, b"MAIL FROM:<c@x>\r\n"),
            (U, b"250 2.1.0 Ok\r\n"),
            (TO_CLIENT, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n"),
        ]
    )


def test_with_xforward_off_the_mail_goes_alone():
    play(
        GREETING
        + [
            (C, b"EHLO client.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, XFORWARD_EHLO),
            (TO_CLIENT, CLIENTS_EHLO_REPLY),
            (C, b"MAIL FROM:<a@x>\r\n"),
            (TO_UPSTREAM, b"MAIL FROM:<a@x>\r\n"),
        ],
        Config(xforward="off"),
    )


def test_the_silent_reconnect_tells_the_new_connection_who_the_client_is_too():
    opened = GREETING + [
        (C, b"EHLO client.test\r\n"),
        (TO_UPSTREAM, b"EHLO client.test\r\n"),
        (U, EHLO_WITH_XCLIENT),
        (TO_UPSTREAM, XCLIENT_LINE),
        (U, b"220 legacy.test\r\n"),
        (TO_UPSTREAM, b"EHLO client.test\r\n"),
        (U, EHLO_WITH_XCLIENT),
        (TO_CLIENT, CLIENTS_EHLO_REPLY),
    ]
    play_every_way(
        opened
        + lockstep_group(0)
        + [
            (C, b"\x00\r\n.\r\nNOOP\r\n"),
            (TO_CLIENT, b"550 5.6.0 Message refused: bare CR, LF or NUL in content\r\n"),
            (RECONNECTED,),
            (U, b"220 legacy.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, EHLO_WITH_XCLIENT),
            (TO_UPSTREAM, XCLIENT_LINE),
            (U, b"220 legacy.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, EHLO_WITH_XCLIENT),
            (TO_UPSTREAM, b"NOOP\r\n"),
            (U, b"250 2.0.0 Ok\r\n"),
            (TO_CLIENT, b"250 2.0.0 Ok\r\n"),
        ],
        Config(bare_line_endings=BareLineEndings.REJECT),
    )


def test_an_early_talker_is_logged_and_with_reject_refused_before_the_upstream_hears_a_word():
    run = play(
        [
            (C, b"EHLO spam.test\r\n"),
            (U, b"220 legacy.test\r\n"),
            (TO_CLIENT, b"220 legacy.test\r\n"),
            (TO_UPSTREAM, b"EHLO spam.test\r\n"),
        ]
    )
    assert run.events("client talked before the greeting") == [{"action": "allow"}]
    play(
        [
            (C, b"EHLO spam.test\r\n"),
            (LOG, "client talked before the greeting", {"action": "reject"}),
            (TO_CLIENT, b"554 5.5.1 Error: talking before the greeting, closing connection\r\n"),
            (CLOSED,),
        ],
        Config(early_talkers="reject"),
    )


def test_only_the_attributes_the_server_lists_are_sent_in_their_own_words():
    ipv6 = ClientIdentity(Address("2001:db8::1", 5000), None, b"caf\xe9 +=x", False, "s")
    assert command_line(b"XCLIENT", ipv6, frozenset({"ADDR", "HELO", "LOGIN"})) == (
        b"XCLIENT ADDR=IPV6:2001:db8::1 HELO=caf+E9+20+2B+3Dx"
    )
    long_name = ClientIdentity(Address("192.0.2.1", 25), None, b"h" * 600, True, "s")
    line = command_line(b"XCLIENT", long_name, frozenset({"ADDR", "HELO", "PROTO"}))
    assert line == b"XCLIENT ADDR=192.0.2.1 PROTO=ESMTP", "a HELO name too long for one line is left out"
    assert xtext(b"a b+c=d\x00") == b"a+20b+2Bc+3Dd+00"


def test_the_xclient_line_carries_the_octets_of_a_non_utf8_helo_name():
    run = play(GREETING + [(C, b"EHLO caf\xe9.test\r\n"), (TO_UPSTREAM, b"EHLO caf\xe9.test\r\n")])
    run.feed(UpstreamData(EHLO_WITH_XCLIENT))
    assert b"HELO=caf+E9.test" in run.new_upstream_bytes()
    run.feed(ClientData(b"QUIT\r\n"))
    assert run.new_upstream_bytes() == b"", "nothing more until XCLIENT is answered"


def test_an_xclient_accepted_with_250_as_older_postfix_and_smtp_sink_answer_goes_on():
    play(
        GREETING
        + [
            (C, b"EHLO client.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, EHLO_WITH_XCLIENT),
            (TO_UPSTREAM, XCLIENT_LINE),
            (U, b"250 2.0.0 Ok\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, EHLO_WITH_XCLIENT),
            (TO_CLIENT, CLIENTS_EHLO_REPLY),
        ]
    )
