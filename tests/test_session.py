"""Transcript tests of the protocol core: bytes in, exact bytes out, no sockets.

Each transcript is played whole, one byte at a time and cut at every offset, unless a test
is about write boundaries, which only a whole feed fixes.
"""

from __future__ import annotations

from pipeproxy.core.config import BareLineEndings, Config, Timeouts
from pipeproxy.core.events import ClientData, Drain, ShutDown, UpstreamData

from transcript import (
    CLIENT_EOF,
    CLOSED,
    LOG,
    RECONNECTED,
    TIMEOUT,
    TO_CLIENT,
    TO_UPSTREAM,
    UPSTREAM_EOF,
    C,
    U,
    bytewise,
    play,
    play_every_way,
    whole,
)

GREETING = [(U, b"220 legacy.test ESMTP\r\n"), (TO_CLIENT, b"220 legacy.test ESMTP\r\n")]
EHLO = [
    (C, b"EHLO client.test\r\n"),
    (TO_UPSTREAM, b"EHLO client.test\r\n"),
    (U, b"250-legacy.test\r\n250-SIZE 1000000\r\n250 8BITMIME\r\n"),
    (TO_CLIENT, b"250-legacy.test\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n250 PIPELINING\r\n"),
]
OPENED = GREETING + EHLO


def rcpts(n: int) -> bytes:
    return b"".join(b"RCPT TO:<r%d@legacy.test>\r\n" % i for i in range(n))


def lockstep_group(n: int) -> list:
    """MAIL, n RCPT and DATA pipelined in one write, answered one at a time upstream."""
    steps: list = [(C, b"MAIL FROM:<s@client.test>\r\n" + rcpts(n) + b"DATA\r\n")]
    steps += [(TO_UPSTREAM, b"MAIL FROM:<s@client.test>\r\n"), (U, b"250 2.1.0 Ok\r\n")]
    for i in range(n):
        steps += [(TO_UPSTREAM, b"RCPT TO:<r%d@legacy.test>\r\n" % i), (U, b"250 2.1.5 Ok\r\n")]
    steps += [(TO_UPSTREAM, b"DATA\r\n"), (U, b"354 End data with <CR><LF>.<CR><LF>\r\n")]
    steps += [(TO_CLIENT, b"250 2.1.0 Ok\r\n" + b"250 2.1.5 Ok\r\n" * n + b"354 End data with <CR><LF>.<CR><LF>\r\n")]
    return steps


def test_greeting_is_relayed_multiline_and_nothing_goes_upstream_before_it():
    """A multi-line 220 reaches the client whole; client bytes wait until it is complete."""
    play_every_way(
        [
            (C, b"EHLO early.test\r\n"),
            (TO_UPSTREAM, b""),
            (U, b"220-legacy.test ESMTP\r\n"),
            (TO_UPSTREAM, b""),
            (U, b"220 no pipelining here\r\n"),
            (TO_CLIENT, b"220-legacy.test ESMTP\r\n220 no pipelining here\r\n"),
            (TO_UPSTREAM, b"EHLO early.test\r\n"),
        ]
    )


def test_ehlo_gains_pipelining_and_loses_what_cannot_be_relayed():
    """PIPELINING is added; CHUNKING, BINARYMIME, STARTTLS, PIPE_CONNECT go; order kept."""
    run = play_every_way(
        GREETING
        + [
            (C, b"EHLO client.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (
                U,
                b"250-legacy.test hello\r\n250-SIZE 10240000\r\n250-starttls\r\n250-CHUNKING\r\n"
                b"250-BINARYMIME\r\n250-8BITMIME\r\n250-PIPE_CONNECT\r\n250-X_PIPE_CONNECT\r\n250 DSN\r\n",
            ),
            (TO_CLIENT, b"250-legacy.test hello\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250-DSN\r\n250 PIPELINING\r\n"),
        ]
    )
    assert run.client_writes[-1].count(b"\r\n") == 5, "the EHLO reply goes out in one write"


def test_ehlo_keeps_upstream_pipelining_and_applies_the_operator_discard_list():
    """An upstream PIPELINING is not doubled; operator keywords are dropped case-insensitively."""
    config = Config(discard_ehlo_keywords=frozenset({"DSN", "ETRN"}))
    play_every_way(
        GREETING
        + [
            (C, b"EHLO client.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, b"250-legacy.test\r\n250-pipelining\r\n250-etrn\r\n250 dsn\r\n"),
            (TO_CLIENT, b"250-legacy.test\r\n250 pipelining\r\n"),
        ],
        config,
    )


def test_ehlo_refused_falls_back_to_helo_and_client_still_gets_ehlo_reply():
    """Upstream without ESMTP: 502 to EHLO, pipeproxy says HELO, client gets a valid EHLO reply."""
    play_every_way(
        GREETING
        + [
            (C, b"EHLO client.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, b"502 5.5.2 Error: command not recognized\r\n"),
            (TO_CLIENT, b""),
            (TO_UPSTREAM, b"HELO client.test\r\n"),
            (U, b"250 legacy.test\r\n"),
            (TO_CLIENT, b"250-legacy.test\r\n250 PIPELINING\r\n"),
        ]
    )


def test_ehlo_fallback_relays_a_helo_refusal():
    """If HELO is refused too, the client sees that refusal, not an invented success."""
    play_every_way(
        GREETING
        + [
            (C, b"EHLO client.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, b"500 5.5.1 unknown\r\n"),
            (TO_UPSTREAM, b"HELO client.test\r\n"),
            (U, b"501 5.5.4 bad hostname\r\n"),
            (TO_CLIENT, b"501 5.5.4 bad hostname\r\n"),
        ]
    )


def test_helo_is_forwarded_as_it_is():
    """HELO reaches the upstream unchanged and its reply comes back unchanged (with XCLIENT
    off; otherwise an EHLO asks first whether XCLIENT is offered: see test_identity)."""
    play_every_way(
        GREETING
        + [
            (C, b"HELO client.test\r\n"),
            (TO_UPSTREAM, b"HELO client.test\r\n"),
            (U, b"250 legacy.test\r\n"),
            (TO_CLIENT, b"250 legacy.test\r\n"),
        ],
        Config(xclient="off"),
    )


def test_pipelined_group_goes_upstream_one_command_per_reply():
    """MAIL, 10 RCPT and DATA in one write: lock-step upstream, one write of 12 replies back."""
    run = play_every_way(OPENED + lockstep_group(10))
    whole_run = play(OPENED + lockstep_group(10))
    assert len(whole_run.client_writes) == 3, "greeting, EHLO, then the whole group in one write"
    assert whole_run.client_writes[-1].count(b"\r\n") == 12
    assert run.closed is None


def test_group_replies_flush_when_input_runs_dry():
    """A group without a last-in-group command is answered once no command is waiting."""
    run = play(
        OPENED
        + [
            (C, b"MAIL FROM:<s@client.test>\r\nRCPT TO:<a@legacy.test>\r\n"),
            (TO_UPSTREAM, b"MAIL FROM:<s@client.test>\r\n"),
            (U, b"250 2.1.0 Ok\r\n"),
            (TO_CLIENT, b""),
            (TO_UPSTREAM, b"RCPT TO:<a@legacy.test>\r\n"),
            (U, b"250 2.1.5 Ok\r\n"),
            (TO_CLIENT, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"),
        ]
    )
    assert run.client_writes[-1] == b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"


def test_message_body_is_streamed_after_354_and_terminated_by_the_proxy():
    """Content goes upstream only after 354; the client's terminator ends it exactly once."""
    run = play_every_way(
        OPENED
        + lockstep_group(1)
        + [
            (C, b"Subject: hi\r\n\r\n..leading dot\r\nbody\r\n.\r\n"),
            (TO_UPSTREAM, b"Subject: hi\r\n\r\n..leading dot\r\nbody\r\n.\r\n"),
            (U, b"250 2.0.0 Ok: queued as 1234\r\n"),
            (TO_CLIENT, b"250 2.0.0 Ok: queued as 1234\r\n"),
            (C, b"QUIT\r\n"),
            (TO_UPSTREAM, b"QUIT\r\n"),
            (U, b"221 2.0.0 Bye\r\n"),
            (TO_CLIENT, b"221 2.0.0 Bye\r\n"),
            (CLOSED,),
        ]
    )
    [transaction] = run.events("transaction")
    assert transaction["sender"] == "s@client.test"
    assert transaction["recipients_accepted"] == 1
    assert transaction["reply_code"] == 250
    assert transaction["size"] == len(b"Subject: hi\r\n\r\n.leading dot\r\nbody\r\n")
    assert run.session.messages == 1


def test_content_and_the_next_transaction_in_one_write():
    """RFC 2920 §3.1: the body may start a group; what follows its end is commands again."""
    play_every_way(
        OPENED
        + lockstep_group(1)
        + [
            (C, b"one\r\n.\r\nMAIL FROM:<s2@client.test>\r\nRCPT TO:<b@legacy.test>\r\nDATA\r\n"),
            (TO_UPSTREAM, b"one\r\n.\r\n"),
            (U, b"250 2.0.0 queued\r\n"),
            (TO_CLIENT, b"250 2.0.0 queued\r\n"),  # the end of a message is the end of a group
            (TO_UPSTREAM, b"MAIL FROM:<s2@client.test>\r\n"),
            (U, b"250 2.1.0 Ok\r\n"),
            (TO_UPSTREAM, b"RCPT TO:<b@legacy.test>\r\n"),
            (U, b"250 2.1.5 Ok\r\n"),
            (TO_UPSTREAM, b"DATA\r\n"),
            (U, b"354 go\r\n"),
            (TO_CLIENT, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n"),
        ]
    )


def test_refused_data_leaves_what_follows_parsed_as_commands():
    """Every RCPT refused, so DATA gets 554: the 'body' lines are commands, answered in order."""
    play_every_way(
        OPENED
        + [
            (C, b"MAIL FROM:<s@client.test>\r\nRCPT TO:<nobody@legacy.test>\r\nDATA\r\n"),
            (TO_UPSTREAM, b"MAIL FROM:<s@client.test>\r\n"),
            (U, b"250 Ok\r\n"),
            (TO_UPSTREAM, b"RCPT TO:<nobody@legacy.test>\r\n"),
            (U, b"550 5.1.1 unknown user\r\n"),
            (TO_UPSTREAM, b"DATA\r\n"),
            (U, b"554 5.5.1 Error: no valid recipients\r\n"),
            (TO_CLIENT, b"250 Ok\r\n550 5.1.1 unknown user\r\n554 5.5.1 Error: no valid recipients\r\n"),
            (C, b"RSET\r\nQUIT\r\n"),
            (TO_UPSTREAM, b"RSET\r\n"),
            (U, b"250 Ok\r\n"),
            (TO_UPSTREAM, b"QUIT\r\n"),
            (U, b"221 Bye\r\n"),
            (TO_CLIENT, b"250 Ok\r\n221 Bye\r\n"),
            (CLOSED,),
        ]
    )


def test_auth_exchange_is_relayed_line_by_line_and_never_logged():
    """After 334 the client's line is SASL data, relayed as it is and kept out of the logs."""
    config = Config(log_level="debug")
    run = play_every_way(
        OPENED
        + [
            (C, b"AUTH LOGIN\r\n"),
            (TO_UPSTREAM, b"AUTH LOGIN\r\n"),
            (U, b"334 VXNlcm5hbWU6\r\n"),
            (TO_CLIENT, b"334 VXNlcm5hbWU6\r\n"),
            (C, b"c2VjcmV0dXNlcg==\r\n"),
            (TO_UPSTREAM, b"c2VjcmV0dXNlcg==\r\n"),
            (U, b"334 UGFzc3dvcmQ6\r\n"),
            (TO_CLIENT, b"334 UGFzc3dvcmQ6\r\n"),
            (C, b"c2VjcmV0cGFzcw==\r\n"),
            (TO_UPSTREAM, b"c2VjcmV0cGFzcw==\r\n"),
            (U, b"235 2.7.0 Authentication successful\r\n"),
            (TO_CLIENT, b"235 2.7.0 Authentication successful\r\n"),
            (C, b"MAIL FROM:<s@client.test>\r\n"),
            (TO_UPSTREAM, b"MAIL FROM:<s@client.test>\r\n"),
        ],
        config,
    )
    logged = repr([log.fields for log in run.logs])
    assert "c2VjcmV0" not in logged
    assert [fields["verb"] for fields in run.events("command")] == ["EHLO", "AUTH", "SASL response", "SASL response"]


def test_starttls_and_bdat_are_answered_by_the_proxy():
    """Neither is advertised nor forwarded: the client gets 502, the upstream sees nothing."""
    play_every_way(
        OPENED
        + [
            (C, b"STARTTLS\r\n"),
            (TO_CLIENT, b"502 5.5.1 Error: STARTTLS is not available through this proxy\r\n"),
            (C, b"BDAT 10 LAST\r\n"),
            (TO_CLIENT, b"502 5.5.1 Error: BDAT is not available through this proxy\r\n"),
            (TO_UPSTREAM, b""),
        ]
    )


def test_unknown_verbs_are_forwarded_for_the_upstream_to_decide():
    """The proxy does not second-guess verbs it does not know."""
    play_every_way(
        OPENED
        + [
            (C, b"XYZZY plugh\r\n"),
            (TO_UPSTREAM, b"XYZZY plugh\r\n"),
            (U, b"502 5.5.2 Error: command not recognized\r\n"),
            (TO_CLIENT, b"502 5.5.2 Error: command not recognized\r\n"),
        ]
    )


def test_a_long_legal_rcpt_with_orcpt_is_relayed_and_2049_octets_are_not():
    """RFC 5321 §4.5.3.1.4 lets extensions raise 512; an RFC 3461 ORCPT runs to ~1,000 octets.

    The default limit is Postfix's 2048: such a RCPT goes upstream, a longer line gets 500.
    """
    orcpt = b"RCPT TO:<r@legacy.test> NOTIFY=FAILURE ORCPT=rfc822;" + b"a" * 900 + b"@client.test\r\n"
    too_long = b"NOOP " + b"x" * (2049 - 7) + b"\r\n"
    assert len(too_long) == 2049
    for cut in (whole, bytewise):
        play(
            OPENED
            + [
                (C, b"MAIL FROM:<s@client.test>\r\n" + orcpt),
                (TO_UPSTREAM, b"MAIL FROM:<s@client.test>\r\n"),
                (U, b"250 Ok\r\n"),
                (TO_UPSTREAM, orcpt),
                (U, b"250 Ok\r\n"),
                (TO_CLIENT, b"250 Ok\r\n250 Ok\r\n"),
                (C, too_long),
                (TO_CLIENT, b"500 5.5.2 Error: line too long\r\n"),
            ],
            cut=cut,
        )


def test_overlong_command_line_gets_500_and_the_session_goes_on():
    """Over the limit (here 512): 500 in its place in the reply order, nothing upstream, then on."""
    long_line = b"RCPT TO:<" + b"x" * 600 + b"@legacy.test>\r\n"
    play_every_way(
        OPENED
        + [
            (C, b"MAIL FROM:<s@client.test>\r\n" + long_line + b"RCPT TO:<ok@legacy.test>\r\n"),
            (TO_UPSTREAM, b"MAIL FROM:<s@client.test>\r\n"),
            (U, b"250 Ok\r\n"),
            (TO_CLIENT, b"250 Ok\r\n500 5.5.2 Error: line too long\r\n"),  # 500 is not held
            (TO_UPSTREAM, b"RCPT TO:<ok@legacy.test>\r\n"),
            (U, b"250 Ok\r\n"),
            (TO_CLIENT, b"250 Ok\r\n"),
        ],
        Config(max_line_length=512),
    )


def test_command_line_limit_is_configurable_and_counts_the_crlf():
    """With a 20-octet limit, 20 octets with CRLF pass and 21 do not."""
    config = Config(max_line_length=20)
    play_every_way(
        OPENED
        + [
            (C, b"NOOP 6789012345678\r\n"),
            (TO_UPSTREAM, b"NOOP 6789012345678\r\n"),
            (U, b"250 Ok\r\n"),
            (TO_CLIENT, b"250 Ok\r\n"),
            (C, b"NOOP 67890123456789\r\n"),
            (TO_CLIENT, b"500 5.5.2 Error: line too long\r\n"),
        ],
        config,
    )


def test_bare_lf_cr_and_nul_in_command_lines_are_refused_not_forwarded():
    """A line ended by bare LF, or holding bare CR or NUL, gets 500 and never goes upstream."""
    play_every_way(
        OPENED
        + [
            (C, b"MAIL FROM:<a@client.test>\nNOOP\rRSET\r\nNOOP\x00x\r\nRCPT TO:<b@legacy.test>\r\n"),
            (
                TO_CLIENT,
                b"500 5.5.2 Error: bare <LF> received\r\n"
                b"500 5.5.2 Error: bare <CR> or NUL in command line\r\n"
                b"500 5.5.2 Error: bare <CR> or NUL in command line\r\n",
            ),
            (TO_UPSTREAM, b"RCPT TO:<b@legacy.test>\r\n"),
            (U, b"503 5.5.1 Error: need MAIL command\r\n"),
            (TO_CLIENT, b"503 5.5.1 Error: need MAIL command\r\n"),
        ]
    )


def test_upstream_closing_mid_batch_answers_every_queued_command_in_order():
    """Upstream gone after MAIL: the RCPT in flight and each waiting command get 421."""
    run = play_every_way(
        OPENED
        + [
            (C, b"MAIL FROM:<s@client.test>\r\nRCPT TO:<a@legacy.test>\r\nRCPT TO:<b@legacy.test>\r\nDATA\r\n"),
            (TO_UPSTREAM, b"MAIL FROM:<s@client.test>\r\n"),
            (U, b"250 Ok\r\n"),
            (TO_UPSTREAM, b"RCPT TO:<a@legacy.test>\r\n"),
            (UPSTREAM_EOF,),
            (
                TO_CLIENT,
                b"250 Ok\r\n421 4.4.2 Upstream server closed the connection\r\n"
                + b"421 4.4.2 Upstream server unavailable, closing connection\r\n" * 2,
            ),
            (CLOSED,),
        ]
    )
    assert run.events("transaction")[0]["reply_code"] is None


def test_upstream_closing_after_the_final_dot_never_yields_250():
    """The message's fate is unknown: the client gets 421, not success."""
    run = play_every_way(
        OPENED
        + lockstep_group(1)
        + [
            (C, b"hello\r\n.\r\n"),
            (TO_UPSTREAM, b"hello\r\n.\r\n"),
            (UPSTREAM_EOF,),
            (TO_CLIENT, b"421 4.4.2 Upstream server closed the connection\r\n"),
            (CLOSED,),
        ]
    )
    assert run.session.messages == 0


def test_upstream_closing_mid_body_tells_the_client_at_once():
    """Upstream gone while content streams: 421 now, not after megabytes more."""
    play(
        OPENED
        + lockstep_group(1)
        + [
            (C, b"part one\r\n"),
            (TO_UPSTREAM, b"part one"),  # the CRLF waits: it may start the terminator
            (UPSTREAM_EOF,),
            (TO_CLIENT, b"421 4.4.2 Upstream server closed the connection\r\n"),
            (CLOSED,),
        ]
    )


def test_client_vanishing_mid_body_never_completes_the_message():
    """No final dot goes upstream: the session closes and the upstream drops the message."""
    run = play_every_way(
        OPENED
        + lockstep_group(1)
        + [
            (C, b"half a message\r\n"),
            (TO_UPSTREAM, b"half a message"),  # the CRLF waits: it may start the terminator
            (CLIENT_EOF,),
            (TO_CLIENT, b"421 4.4.2 Error: message not completed, closing connection\r\n"),
            (CLOSED,),
        ]
    )
    assert run.session.messages == 0


def test_client_vanishing_before_354_never_sends_content():
    """The client leaves with DATA outstanding: on 354 the session closes, sending nothing."""
    play(
        OPENED
        + [
            (C, b"MAIL FROM:<s@client.test>\r\n"),
            (TO_UPSTREAM, b"MAIL FROM:<s@client.test>\r\n"),
            (U, b"250 Ok\r\n"),
            (TO_CLIENT, b"250 Ok\r\n"),
            (C, b"DATA\r\n"),
            (CLIENT_EOF,),
            (TO_UPSTREAM, b"DATA\r\n"),
            (U, b"354 go\r\n"),
            (TO_CLIENT, b"354 go\r\n421 4.4.2 Error: message not completed, closing connection\r\n"),
            (CLOSED,),
        ]
    )


def test_client_half_close_still_runs_the_commands_it_sent():
    """No input is dropped: QUIT then EOF in one burst still reaches the upstream."""
    play(
        OPENED
        + [
            (C, b"NOOP\r\nQUIT\r\n"),
            (CLIENT_EOF,),
            (TO_UPSTREAM, b"NOOP\r\n"),
            (U, b"250 Ok\r\n"),
            (TO_CLIENT, b"250 Ok\r\n"),
            (TO_UPSTREAM, b"QUIT\r\n"),
            (U, b"221 Bye\r\n"),
            (TO_CLIENT, b"221 Bye\r\n"),
            (CLOSED,),
        ]
    )


def test_greeting_timeout_gives_421():
    """No greeting in time: 421 to the client, and the session ends."""
    play([(TIMEOUT,), (TO_CLIENT, b"421 4.4.2 Upstream server timed out, closing connection\r\n"), (CLOSED,)])


def test_upstream_refusing_connection_gives_421():
    """Upstream unreachable: the client's first line is a 421."""
    play(
        [
            (LOG, "upstream unreachable", {"error": "connection refused"}),
            (TO_CLIENT, b"421 4.4.2 Upstream server unavailable, closing connection\r\n"),
            (LOG, "session closed", {"reason": "connection refused"}),
            (CLOSED,),
        ],
        connect_fails=True,
    )


def test_every_step_the_transitions_name_exists():
    """A step is looked up by its name when a reply comes: a misspelt one would crash the
    session (a 421) at the first such reply, not at start-up."""
    from pipeproxy.core import session

    named = {then for rows in session.TRANSITIONS.values() for _, _, then in rows if then is not None}
    assert named | {"upstream_closing"} <= set(session._STEPS)


def test_each_wait_uses_its_rfc_timeout():
    """RCPT waits 5 minutes, DATA 2, the final dot 10; an idle client 5."""
    timeouts = Timeouts()
    run = play(
        OPENED
        + [
            (C, b"MAIL FROM:<s@client.test>\r\n"),
            (TO_UPSTREAM, b"MAIL FROM:<s@client.test>\r\n"),
            (U, b"250 Ok\r\n"),
            (TO_CLIENT, b"250 Ok\r\n"),
            (C, b"RCPT TO:<a@b>\r\n"),
            (TO_UPSTREAM, b"RCPT TO:<a@b>\r\n"),
        ]
    )
    assert run.session.deadline == run.clock.now + timeouts.rcpt
    run.feed(UpstreamData(b"250 Ok\r\n"))
    assert run.session.deadline == run.clock.now + timeouts.client_idle
    run.feed(ClientData(b"DATA\r\n"))
    assert run.session.deadline == run.clock.now + timeouts.data_init
    run.feed(UpstreamData(b"354 go\r\n"))
    assert run.session.deadline == run.clock.now + timeouts.data_block
    run.feed(ClientData(b".\r\n"))
    assert run.session.deadline == run.clock.now + timeouts.data_end


def test_idle_client_timeout_gives_421_and_closes():
    """RFC 5321 §4.5.3.2.7: the server may give up on a silent client."""
    play(OPENED + [(C, b"NOOP"), (TIMEOUT,), (TO_CLIENT, b"421 4.4.2 Error: timeout exceeded, closing connection\r\n")])


def test_unprompted_421_from_upstream_is_relayed_and_closes():
    """An upstream shutting down says 421 out of turn: the client hears it, then EOF."""
    notice = b"421 4.3.2 Shutting down\r\n"
    play_every_way(OPENED + [(U, notice), (TO_CLIENT, notice), (CLOSED,)])


def test_upstream_421_reply_is_relayed_and_queued_commands_get_421():
    """A 421 ends the upstream's side (RFC 5321 §3.8): relayed, the rest answered, closed."""
    play_every_way(
        OPENED
        + [
            (C, b"MAIL FROM:<s@client.test>\r\nRCPT TO:<a@legacy.test>\r\n"),
            (TO_UPSTREAM, b"MAIL FROM:<s@client.test>\r\n"),
            (U, b"421 4.7.0 Too many connections\r\n"),
            (
                TO_CLIENT,
                b"421 4.7.0 Too many connections\r\n421 4.4.2 Upstream server unavailable, closing connection\r\n",
            ),
            (CLOSED,),
        ]
    )


def test_upstream_421_greeting_is_relayed_and_closes():
    """A busy upstream's 421 banner is the client's banner too, and nothing more."""
    play_every_way([(U, b"421 4.3.2 busy\r\n"), (TO_CLIENT, b"421 4.3.2 busy\r\n"), (CLOSED,)])


def test_garbage_from_upstream_closes_with_421():
    """A reply that is not SMTP means the upstream cannot be trusted any more."""
    play(
        OPENED
        + [
            (C, b"NOOP\r\n"),
            (TO_UPSTREAM, b"NOOP\r\n"),
            (U, b"HTTP/1.1 400 Bad Request\r\n"),
            (TO_CLIENT, b"421 4.4.2 Upstream server broke the protocol, closing connection\r\n"),
            (CLOSED,),
        ]
    )


def test_bare_line_endings_in_content_are_neutralised_by_default():
    """A smuggled '\\n.\\n' arrives as a stuffed content line; one message upstream."""
    play_every_way(
        OPENED
        + lockstep_group(1)
        + [
            (C, b"a\n.\nMAIL FROM:<evil@x>\r\nb\r.\rc\x00\r\n.\r\n"),
            (TO_UPSTREAM, b"a\r\n..\r\nMAIL FROM:<evil@x>\r\nb\r\n..\r\nc\r\n.\r\n"),
        ]
    )


REJECT_BARE = Config(bare_line_endings=BareLineEndings.REJECT)
REFUSED_550 = b"550 5.6.0 Message refused: bare CR, LF or NUL in content\r\n"


def test_bare_line_endings_in_content_can_be_rejected_with_550_and_the_session_goes_on():
    """The message is never completed upstream: the connection is dropped without a final dot,
    a new one is greeted as the old one was, without a word to the client, and the
    client's next command is answered by the upstream."""
    run = play_every_way(
        OPENED
        + lockstep_group(1)
        + [
            (C, b"fine line\r\n"),
            (TO_UPSTREAM, b"fine line"),
            (C, b"\nbad line\r\n.\r\nNOOP\r\n"),
            (LOG, "transaction", {"outcome": "refused: bare CR, LF or NUL in content", "reply_code": 550}),
            (TO_CLIENT, REFUSED_550),
            (LOG, "reconnecting upstream"),
            (RECONNECTED,),
            (U, b"220 legacy.test ESMTP again\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, b"250-legacy.test\r\n250 8BITMIME\r\n"),
            (LOG, "upstream reconnected"),
            (TO_UPSTREAM, b"NOOP\r\n"),
            (U, b"250 2.0.0 Ok\r\n"),
            (TO_CLIENT, b"250 2.0.0 Ok\r\n"),
        ],
        REJECT_BARE,
    )
    assert run.session.messages == 0 and run.closed is None


def test_the_replay_after_a_refused_message_falls_back_to_helo_like_the_first_time():
    helo_opened = GREETING + [
        (C, b"EHLO client.test\r\n"),
        (TO_UPSTREAM, b"EHLO client.test\r\n"),
        (U, b"502 5.5.2 Error: command not recognized\r\n"),
        (TO_UPSTREAM, b"HELO client.test\r\n"),
        (U, b"250 legacy.test\r\n"),
        (TO_CLIENT, b"250-legacy.test\r\n250 PIPELINING\r\n"),
    ]
    play_every_way(
        helo_opened
        + lockstep_group(0)
        + [
            (C, b"\rbad line\r\n.\r\nRSET\r\n"),
            (TO_CLIENT, REFUSED_550),
            (RECONNECTED,),
            (U, b"220 legacy.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, b"502 5.5.2 Error: command not recognized\r\n"),
            (TO_UPSTREAM, b"HELO client.test\r\n"),
            (U, b"250 legacy.test\r\n"),
            (TO_UPSTREAM, b"RSET\r\n"),
            (U, b"250 Ok\r\n"),
            (TO_CLIENT, b"250 Ok\r\n"),
        ],
        REJECT_BARE,
    )


def test_a_refused_replay_ends_the_session_with_421_for_what_waits():
    play_every_way(
        OPENED
        + lockstep_group(0)
        + [
            (C, b"\x00\r\n.\r\nNOOP\r\n"),
            (TO_CLIENT, REFUSED_550),
            (RECONNECTED,),
            (U, b"554 5.7.1 go away\r\n"),
            (TO_CLIENT, b"421 4.4.2 Upstream server unavailable, closing connection\r\n"),
            (CLOSED,),
        ],
        REJECT_BARE,
    )


def test_an_authenticated_session_is_not_replayed_after_a_refused_message():
    """pipeproxy keeps no credentials, so it cannot log in again: the session ends."""
    play(
        OPENED
        + [
            (C, b"AUTH PLAIN AHVzZXIAcGFzcw==\r\n"),
            (TO_UPSTREAM, b"AUTH PLAIN AHVzZXIAcGFzcw==\r\n"),
            (U, b"235 2.7.0 Authentication successful\r\n"),
            (TO_CLIENT, b"235 2.7.0 Authentication successful\r\n"),
        ]
        + lockstep_group(0)
        + [
            (C, b"\n\r\n.\r\nNOOP\r\n"),
            (
                TO_CLIENT,
                REFUSED_550 + b"421 4.4.2 Upstream server unavailable, closing connection\r\n",
            ),
            (CLOSED,),
        ],
        REJECT_BARE,
    )


def test_drain_closes_an_idle_session_with_421_at_once():
    """Stopping: a session between transactions hears 421 4.3.2 and is closed."""
    run = play(OPENED)
    run.feed(Drain())
    assert run.new_client_bytes() == b"421 4.3.2 Service shutting down, closing connection\r\n"
    assert run.closed is not None and run.closed.clean


def test_drain_lets_the_transaction_in_progress_finish_first():
    """Mid-DATA when stopping starts: the message completes, its 250 arrives, then 421."""
    run = play(OPENED + lockstep_group(1) + [(C, b"first half\r\n"), (TO_UPSTREAM, b"first half")])
    run.feed(Drain())
    assert run.closed is None
    run.feed(ClientData(b"second half\r\n.\r\nMAIL FROM:<next@client.test>\r\n"))
    assert run.new_upstream_bytes() == b"\r\nsecond half\r\n.\r\n"
    run.feed(UpstreamData(b"250 2.0.0 queued\r\n"))
    assert run.new_client_bytes() == b"250 2.0.0 queued\r\n421 4.3.2 Service shutting down, closing connection\r\n"
    assert run.new_upstream_bytes() == b"", "the next MAIL never goes upstream"
    assert run.closed is not None and run.session.messages == 1


def test_shut_down_after_the_grace_period_abandons_a_message_without_its_final_dot():
    run = play(OPENED + lockstep_group(1) + [(C, b"slow message\r\n"), (TO_UPSTREAM, b"slow message")])
    run.feed(Drain())
    run.feed(ShutDown())
    assert run.new_client_bytes() == b"421 4.3.2 Service shutting down, closing connection\r\n"
    assert run.new_upstream_bytes() == b"" and run.closed is not None
