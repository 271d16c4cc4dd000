"""Transcripts of the events and rules the core's one entry point brought: a bug inside the
core, a failed write to the client, draining, held replies and a slow upstream, octets
relayed as they came, and the rules a mutation of the core once broke unnoticed.

Each test names the behaviour it checks; the ones marked "old code" failed before.
"""

from __future__ import annotations

from pipeproxy.core import session as session_module
from pipeproxy.core.config import BareLineEndings, Config
from pipeproxy.core.events import ClientData, Tick, UpstreamData
from pipeproxy.core.session import Session

from test_session import GREETING, OPENED, lockstep_group, rcpts
from transcript import (
    CLIENT_WRITE_FAILED,
    CLOSED,
    DRAIN,
    LOG,
    RECONNECTED,
    TIMEOUT,
    TO_CLIENT,
    TO_UPSTREAM,
    UPSTREAM_EOF,
    C,
    U,
    play,
    play_every_way,
    start,
)

SHUTTING_DOWN = b"421 4.3.2 Service shutting down, closing connection\r\n"


def test_a_non_utf8_ehlo_name_falls_back_to_helo_with_the_clients_octets():
    """Old code: UnicodeEncodeError in the HELO fallback, and the client saw a bare EOF."""
    play_every_way(
        GREETING
        + [
            (C, b"EHLO caf\xe9.test\r\n"),
            (TO_UPSTREAM, b"EHLO caf\xe9.test\r\n"),
            (U, b"502 5.5.2 Error: command not recognized\r\n"),
            (LOG, "upstream has no EHLO, falling back to HELO", {"code": 502}),
            (TO_UPSTREAM, b"HELO caf\xe9.test\r\n"),
            (U, b"250 legacy.test\r\n"),
            (TO_CLIENT, b"250-legacy.test\r\n250 PIPELINING\r\n"),
        ]
    )


def _buggy_step(session, pending, upstream_reply):
    raise RuntimeError("a bug in a step")


def test_an_exception_inside_the_core_is_a_logged_error_a_421_and_a_close(monkeypatch):
    """Old code: the shell saw the exception and the client a silent EOF."""
    monkeypatch.setitem(session_module._STEPS, "greeting", _buggy_step)
    run = play(
        [
            (C, b"EHLO client.test\r\n"),
            (U, b"220 legacy.test ESMTP\r\n"),
            (TO_CLIENT, b"220 legacy.test ESMTP\r\n"),
            (LOG, "internal error"),
            (TO_CLIENT, b"421 4.3.0 Error: internal error, closing connection\r\n"),
            (LOG, "session closed", {"reason": "internal error"}),
            (CLOSED,),
        ]
    )
    [error] = [log for log in run.logs if log.event == "internal error"]
    assert error.level == "error" and "RuntimeError: a bug in a step" in error.fields["exception"]
    assert run.closed is not None and not run.closed.clean
    assert run.upstream_writes == [], "nothing goes upstream after the bug"


def test_a_failed_write_to_the_client_logs_the_open_transaction_and_never_ends_the_message():
    """Old code: a failed client write never reached the core; no transaction line."""
    run = play(
        OPENED
        + lockstep_group(1)
        + [
            (C, b"half a message\r\n"),
            (TO_UPSTREAM, b"half a message"),
            (CLIENT_WRITE_FAILED,),
            (LOG, "message abandoned, upstream closed without final dot"),
            (LOG, "transaction", {"outcome": "client connection lost", "sender": "s@client.test"}),
            (LOG, "session closed", {"reason": "client connection lost"}),
            (CLOSED,),
        ]
    )
    assert run.closed is not None and not run.closed.clean
    # Later events are ignored: nothing more is written anywhere.
    run.feed(UpstreamData(b"250 2.0.0 queued\r\n"))
    run.feed(ClientData(b".\r\n"))
    assert run.new_client_bytes() == run.new_upstream_bytes() == b""


def test_the_core_writes_the_session_open_and_closed_lines():
    quit_ = [(C, b"QUIT\r\n"), (TO_UPSTREAM, b"QUIT\r\n"), (U, b"221 Bye\r\n"), (TO_CLIENT, b"221 Bye\r\n")]
    run = play(OPENED + quit_)
    assert run.logs[0].event == "session open"
    [closed] = run.events("session closed")
    assert closed == {"reason": "client quit", "duration": 0.0, "commands": 2, "messages": 0}


def test_every_command_waiting_at_a_drain_is_told_the_service_is_shutting_down():
    """Old code: only the first got 4.3.2, the others 'upstream unavailable'."""
    play_every_way(
        OPENED
        + [
            (C, b"NOOP\r\nNOOP\r\nVRFY x\r\n"),
            (TO_UPSTREAM, b"NOOP\r\n"),
            (DRAIN,),
            (U, b"250 2.0.0 Ok\r\n"),
            (TO_CLIENT, b"250 2.0.0 Ok\r\n" + SHUTTING_DOWN * 2),
            (CLOSED,),
        ]
    )


def test_held_replies_go_out_once_a_slow_upstream_passes_the_hold_time():
    """A 35-recipient group to an MTA that takes a second per RCPT must not hold 35 s of
    replies from a client with a 30 s read timeout. Old code: held until the group's end."""
    config = Config(hold_time=1.0)
    run = start(config)
    for step in OPENED:
        if step[0] == C:
            run.feed(ClientData(step[1]))
        elif step[0] == U:
            run.feed(UpstreamData(step[1]))
    run.new_client_bytes(), run.new_upstream_bytes()
    run.feed(ClientData(b"MAIL FROM:<s@client.test>\r\n" + rcpts(3) + b"DATA\r\n"))
    run.feed(UpstreamData(b"250 2.1.0 Ok\r\n"))
    assert run.new_client_bytes() == b"", "held while the group goes on"
    sent_at = run.clock.now
    run.clock.now += 0.5
    run.feed(UpstreamData(b"250 2.1.5 Ok\r\n"))
    assert run.session.deadline == sent_at + 1.0, "the hold time counts from the first held reply"
    run.clock.now = run.session.deadline
    run.feed(Tick())
    assert run.new_client_bytes() == b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
    assert run.closed is None
    assert run.session.deadline == sent_at + 0.5 + Config().timeouts.rcpt, "back to the RCPT's own timeout"
    run.feed(UpstreamData(b"250 2.1.5 Ok\r\n"))
    run.feed(UpstreamData(b"250 2.1.5 Ok\r\n"))
    run.feed(UpstreamData(b"354 go\r\n"))
    assert run.new_client_bytes() == b"250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n"
    assert run.new_upstream_bytes().count(b"\r\n") == 5


def test_a_timeout_with_held_replies_flushes_them_before_the_421():
    play(
        OPENED
        + [
            (C, b"MAIL FROM:<s@client.test>\r\nRCPT TO:<a@b>\r\n"),
            (TO_UPSTREAM, b"MAIL FROM:<s@client.test>\r\n"),
            (U, b"250 2.1.0 Ok\r\n"),
            (TO_UPSTREAM, b"RCPT TO:<a@b>\r\n"),
            (TIMEOUT,),  # the hold time
            (TO_CLIENT, b"250 2.1.0 Ok\r\n"),
            (TIMEOUT,),  # the RCPT's own
            (TO_CLIENT, b"421 4.4.2 Upstream server timed out, closing connection\r\n"),
            (CLOSED,),
        ]
    )


def test_upstream_reply_octets_reach_the_client_as_they_came():
    """Old code: '250 ' lost its space, and clients that wait for '250 ' hung."""
    play_every_way(
        GREETING
        + [
            (C, b"EHLO client.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, b"250-legacy.test says hi  \r\n250-PIPELINING\r\n250 \r\n"),
            (TO_CLIENT, b"250-legacy.test says hi  \r\n250-PIPELINING\r\n250 \r\n"),
            (C, b"NOOP\r\n"),
            (TO_UPSTREAM, b"NOOP\r\n"),
            (U, b"250 \r\n"),
            (TO_CLIENT, b"250 \r\n"),
            (C, b"RSET\r\n"),
            (TO_UPSTREAM, b"RSET\r\n"),
            (U, b"250\n"),
            (TO_CLIENT, b"250\r\n"),
        ]
    )


# -- rules a hand-made mutation of the core once broke with the suite still green ----------


def test_nothing_goes_upstream_until_the_last_line_of_a_multiline_reply():
    """The client sends ahead; the next command waits for the whole reply, not its first line."""
    play_every_way(
        OPENED
        + [
            (C, b"MAIL FROM:<s@client.test>\r\nRCPT TO:<gone@legacy.test>\r\nNOOP\r\n"),
            (TO_UPSTREAM, b"MAIL FROM:<s@client.test>\r\n"),
            (U, b"250 2.1.0 Ok\r\n"),
            (TO_UPSTREAM, b"RCPT TO:<gone@legacy.test>\r\n"),
            (U, b"550-5.1.1 no such user here,\r\n550-5.1.1 nor anywhere\r\n"),
            (TO_UPSTREAM, b""),
            (U, b"550 5.1.1 at all\r\n"),
            (TO_UPSTREAM, b"NOOP\r\n"),
            (U, b"250-2.0.0 Ok\r\n250 2.0.0 still Ok\r\n"),
            (
                TO_CLIENT,
                b"250 2.1.0 Ok\r\n550-5.1.1 no such user here,\r\n550-5.1.1 nor anywhere\r\n550 5.1.1 at all\r\n"
                b"250-2.0.0 Ok\r\n250 2.0.0 still Ok\r\n",
            ),
        ]
    )


def test_an_auth_initial_response_never_reaches_any_log_line():
    config = Config(log_level="debug")
    run = play(
        OPENED
        + [
            (C, b"AUTH PLAIN AHNlY3JldHVzZXIAc2VjcmV0cGFzcw==\r\n"),
            (TO_UPSTREAM, b"AUTH PLAIN AHNlY3JldHVzZXIAc2VjcmV0cGFzcw==\r\n"),
            (U, b"235 2.7.0 Authentication successful\r\n"),
            (TO_CLIENT, b"235 2.7.0 Authentication successful\r\n"),
        ],
        config,
    )
    assert [fields["verb"] for fields in run.events("command")] == ["EHLO", "AUTH"]
    assert "AHNlY3J" not in repr(run.logs)


def test_after_auth_the_session_is_back_to_commands_and_content_is_reframed():
    """An AUTH exchange that never ended would make DATA a SASL line: the body unframed."""
    play_every_way(
        OPENED
        + [
            (C, b"AUTH LOGIN\r\n"),
            (TO_UPSTREAM, b"AUTH LOGIN\r\n"),
            (U, b"334 VXNlcm5hbWU6\r\n"),
            (TO_CLIENT, b"334 VXNlcm5hbWU6\r\n"),
            (C, b"dXNlcg==\r\n"),
            (TO_UPSTREAM, b"dXNlcg==\r\n"),
            (U, b"334 UGFzc3dvcmQ6\r\n"),
            (TO_CLIENT, b"334 UGFzc3dvcmQ6\r\n"),
            (C, b"cGFzcw==\r\n"),
            (TO_UPSTREAM, b"cGFzcw==\r\n"),
            (U, b"235 2.7.0 Authentication successful\r\n"),
            (TO_CLIENT, b"235 2.7.0 Authentication successful\r\n"),
        ]
        + lockstep_group(1)
        + [
            (C, b"one\n.\nMAIL FROM:<evil@x>\r\n.\r\n"),
            (TO_UPSTREAM, b"one\r\n..\r\nMAIL FROM:<evil@x>\r\n.\r\n"),
            (U, b"250 2.0.0 queued\r\n"),
            (TO_CLIENT, b"250 2.0.0 queued\r\n"),
        ]
    )


def test_a_reply_nobody_asked_for_is_never_passed_on():
    """A non-421 reply out of turn means client and upstream are out of step: 421, close."""
    run = play_every_way(
        OPENED
        + [
            (U, b"250 2.0.0 surprise\r\n"),
            (TO_CLIENT, b"421 4.4.2 Upstream server broke the protocol, closing connection\r\n"),
            (CLOSED,),
        ]
    )
    assert run.closed is not None and not run.closed.clean


def test_client_input_beyond_the_pipeline_bound_leaves_no_room_to_read():
    """The shell reads only what ``client_room`` allows: at the bound, nothing."""
    run = start(Config(max_pipeline_bytes=20000))
    run.feed(UpstreamData(b"220 legacy.test\r\n"))
    run.feed(ClientData(b"NOOP\r\n"))  # goes upstream at once: no longer held
    assert run.session.client_room() == 20000
    run.feed(ClientData(b"NOOP\r\n" * 1000))
    assert run.session.client_room() == 14000
    run.feed(ClientData(b"x" * 14000))
    assert run.session.client_room() == 0
    run.feed(UpstreamData(b"250 Ok\r\n"))  # one NOOP more goes upstream
    assert run.session.client_room() == 6


def test_the_pipeline_bound_never_leaves_less_room_than_the_longest_line():
    """A 4,000-octet AUTH line under a 4,096-octet bound: with no room and no line end,
    nothing could move and the session would wait for the idle timeout."""
    run = play(OPENED, Config(max_pipeline_bytes=4096))
    run.feed(ClientData(b"AUTH PLAIN " + b"A" * 4085))
    assert run.session.client_room() > 0
    run.feed(ClientData(b"A" * 100 + b"\r\n"))
    assert run.new_upstream_bytes() == b"AUTH PLAIN " + b"A" * 4185 + b"\r\n"


# -- found in review of the core, each failing before its fix ------------------------------

REJECT_BARE = Config(bare_line_endings=BareLineEndings.REJECT)
REFUSED_550 = b"550 5.6.0 Message refused: bare CR, LF or NUL in content\r\n"
UNAVAILABLE = b"421 4.4.2 Upstream server unavailable, closing connection\r\n"


def test_a_421_greeting_on_the_silent_reconnect_is_one_reply_for_one_command():
    """The replay is not the client's business: a 421 there is a failed replay, not a reply."""
    play_every_way(
        OPENED
        + lockstep_group(0)
        + [
            (C, b"\x00\r\n.\r\nNOOP\r\n"),
            (TO_CLIENT, REFUSED_550),
            (RECONNECTED,),
            (U, b"421 4.7.0 too many connections from you\r\n"),
            (TO_CLIENT, UNAVAILABLE),  # one reply, for the NOOP
            (CLOSED,),
        ],
        REJECT_BARE,
    )


def test_a_refused_message_drops_the_upstream_at_once_not_at_the_clients_end():
    """Kept waiting mid-message until the client's last line, the upstream could time out
    and close, and the client would lose its session instead of getting 552."""
    config = Config(max_message_size=10)
    sized = [(C, b"EHLO client.test\r\n"), (TO_UPSTREAM, b"EHLO client.test\r\n"), (U, b"250 legacy.test\r\n")]
    opened = GREETING + sized + [(TO_CLIENT, b"250-legacy.test\r\n250-SIZE 10\r\n250 PIPELINING\r\n")]
    over = [(C, b"0123456789abcdef\r\n")]  # over the limit: the upstream is dropped now
    assert "drop" in [kind for kind, _ in play(opened + lockstep_group(0) + over, config).timeline]
    run = play(
        opened
        + lockstep_group(0)
        + over
        + [
            (U, b"421 4.4.2 legacy.test Error: timeout exceeded\r\n"),  # from the dropped one
            (UPSTREAM_EOF,),
            (C, b"more\r\n.\r\nNOOP\r\n"),
            (TO_CLIENT, b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"),
            (RECONNECTED,),
            (U, b"220 legacy.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, b"250 legacy.test\r\n"),
            (TO_UPSTREAM, b"NOOP\r\n"),
        ],
        config,
    )
    assert run.closed is None


def test_a_size_parameter_of_thousands_of_digits_is_552_not_an_internal_error():
    """int() refuses more than 4,300 digits: a client could turn MAIL into a traceback."""
    run = play(OPENED, Config(max_line_length=8000, max_message_size=10**6))
    run.feed(ClientData(b"MAIL FROM:<a@b> SIZE=" + b"9" * 5000 + b"\r\n"))
    assert run.new_client_bytes() == b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    assert not run.events("internal error") and run.new_upstream_bytes() == b""


def test_part_of_a_reply_nobody_asked_for_is_never_taken_for_the_next_commands():
    run = play(OPENED + [(U, b"250-stray\r\n")])
    run.feed(ClientData(b"NOOP\r\n"))
    assert run.new_upstream_bytes() == b"", "NOOP's reply would have been read from the stray bytes"
    assert run.new_client_bytes() == b"421 4.4.2 Upstream server broke the protocol, closing connection\r\n"
    assert run.closed is not None


def test_a_bug_never_lets_queued_upstream_io_happen(monkeypatch):
    """A step that had queued content (or a final dot) before failing: none of it goes out."""

    class BuggyDelivery(Session):
        def _read_content(self):
            super()._read_content()
            if self._message is None:
                raise RuntimeError("a bug after the final dot was queued")

    monkeypatch.setattr("transcript.Session", BuggyDelivery)
    run = play(OPENED + lockstep_group(0))
    run.new_upstream_bytes()
    run.feed(ClientData(b"body\r\n.\r\n"))
    assert run.new_upstream_bytes() == b"", "content and final dot dropped with the crash"
    assert run.closed is not None and run.events("internal error")


def test_a_helo_only_upstream_still_advertises_pipeproxys_own_size():
    play(
        GREETING
        + [
            (C, b"EHLO client.test\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, b"502 5.5.2 Error: command not recognized\r\n"),
            (TO_UPSTREAM, b"HELO client.test\r\n"),
            (U, b"250 legacy.test\r\n"),
            (TO_CLIENT, b"250-legacy.test\r\n250-SIZE 1000\r\n250 PIPELINING\r\n"),
        ],
        Config(max_message_size=1000),
    )
