"""Faults over real sockets: scripted upstreams that vanish, stall or talk nonsense, and
clients that vanish. Each test checks the exact replies the client sees and that no
message is completed upstream that the client did not finish."""

from __future__ import annotations

import contextlib
import socket
import struct

import pytest
import trio

from pipeproxy.demo.client import envelope_lines
from pipeproxy.demo.legacy_mta import LegacyMTA

from peers import Peer, closed_port, open_session, start_legacy, start_proxy, start_upstream

CLOSED = b"421 4.4.2 Upstream server closed the connection\r\n"
UNAVAILABLE = b"421 4.4.2 Upstream server unavailable, closing connection\r\n"
BROKE = b"421 4.4.2 Upstream server broke the protocol, closing connection\r\n"
EHLO_REPLY = b"250-legacy.test\r\n250 8BITMIME\r\n"


async def greet_and_ehlo(peer: Peer) -> None:
    await peer.send(b"220 legacy.test ESMTP\r\n")
    assert await peer.line() == b"EHLO client.test\r\n"
    await peer.send(EHLO_REPLY)


async def greet_and_accept_envelope(peer: Peer) -> None:
    """Greet, answer EHLO, then MAIL, RCPT and DATA (with 354): ready for content."""
    await greet_and_ehlo(peer)
    for _ in range(3):
        line = await peer.line()
        await peer.send(b"354 go\r\n" if line == b"DATA\r\n" else b"250 Ok\r\n")


def recording_upstream(saw: list[bytes], received: trio.Event):
    """An upstream that takes a message's envelope, then records all it gets until EOF."""

    async def record_body(peer: Peer) -> None:
        await greet_and_accept_envelope(peer)
        saw.append(await peer.rest())
        received.set()

    return record_body


def reset(peer: Peer) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP reset, not a clean EOF."""
    peer.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def test_upstream_refusing_connections_gives_421_at_once(nursery):
    """Nothing listens upstream: the client's greeting is a 421, then EOF."""
    proxy = await start_proxy(nursery, closed_port())
    client = await Peer.connect(proxy)
    assert await client.rest() == UNAVAILABLE


async def test_upstream_that_never_greets_times_out_with_421(nursery, autojump_clock):
    """No 220 within the greeting timeout (5 minutes, on a jumping clock): 421."""

    async def silent(peer: Peer) -> None:
        await trio.sleep_forever()

    proxy = await start_proxy(nursery, await start_upstream(nursery, silent))
    client = await Peer.connect(proxy)
    started = trio.current_time()
    assert await client.rest() == b"421 4.4.2 Upstream server timed out, closing connection\r\n"
    assert trio.current_time() - started >= 300


async def test_upstream_closing_before_the_greeting_gives_421(nursery):
    async def hang_up(peer: Peer) -> None:
        pass

    proxy = await start_proxy(nursery, await start_upstream(nursery, hang_up))
    assert await (await Peer.connect(proxy)).rest() == CLOSED


async def test_upstream_closing_during_a_multiline_greeting_gives_421_only(nursery):
    """Half a greeting is no greeting: the client never sees the partial 220- line."""

    async def half(peer: Peer) -> None:
        await peer.send(b"220-legacy.test first line\r\n")

    proxy = await start_proxy(nursery, await start_upstream(nursery, half))
    assert await (await Peer.connect(proxy)).rest() == CLOSED


async def test_upstream_closing_after_the_greeting_gives_421(nursery):
    async def greet_then_go(peer: Peer) -> None:
        await peer.send(b"220 legacy.test\r\n")

    proxy = await start_proxy(nursery, await start_upstream(nursery, greet_then_go))
    client = await Peer.connect(proxy)
    assert await client.rest() == b"220 legacy.test\r\n" + CLOSED


async def test_upstream_closing_mid_batch_answers_each_queued_command(nursery):
    """Upstream leaves after the second RCPT: the commands still owed get 421 each, in order."""

    async def leave_after_two_rcpts(peer: Peer) -> None:
        await greet_and_ehlo(peer)
        for expected in (b"MAIL", b"RCPT", b"RCPT"):
            assert (await peer.line()).startswith(expected)
            await peer.send(b"250 Ok\r\n")
        assert (await peer.line()).startswith(b"RCPT")

    proxy = await start_proxy(nursery, await start_upstream(nursery, leave_after_two_rcpts))
    client = await open_session(proxy)
    await client.send(b"".join(envelope_lines("s@client.test", ["a@x", "b@x", "c@x", "d@x"])))
    assert await client.rest() == b"250 Ok\r\n" * 3 + CLOSED + UNAVAILABLE * 2


async def test_upstream_reset_mid_batch_answers_each_queued_command(nursery):
    """A TCP reset instead of a clean close: the same honest 421s."""

    async def reset_after_mail(peer: Peer) -> None:
        await greet_and_ehlo(peer)
        await peer.line()
        await peer.send(b"250 Ok\r\n")
        await peer.line()
        reset(peer)

    proxy = await start_proxy(nursery, await start_upstream(nursery, reset_after_mail))
    client = await open_session(proxy)
    await client.send(b"".join(envelope_lines("s@client.test", ["a@x", "b@x"])))
    replies = await client.rest()
    assert replies.startswith(b"250 Ok\r\n421 4.4.2 ")
    assert replies.count(b"\r\n") == 4 and replies.count(b"421 4.4.2") == 3


async def test_upstream_dying_after_354_never_lets_a_message_through(nursery):
    """354 then gone: the body has nowhere to go, and the client gets 421."""

    async def die_after_354(peer: Peer) -> None:
        await greet_and_accept_envelope(peer)

    proxy = await start_proxy(nursery, await start_upstream(nursery, die_after_354))
    client = await open_session(proxy)
    await client.send(b"".join(envelope_lines("s@client.test", ["a@x"])))
    assert [r.code for r in await client.replies(3)] == [250, 250, 354]
    await client.send(b"Subject: hello\r\n\r\nbody\r\n.\r\n")
    # Closed or failed, by whichever the proxy saw first: its EOF or a failed write.
    assert await client.rest() in (CLOSED, UNAVAILABLE)


async def test_upstream_dying_mid_body_gives_421_never_250(nursery):
    """The upstream takes part of a long body and drops: 421 while the client still sends."""

    async def die_mid_body(peer: Peer) -> None:
        await greet_and_accept_envelope(peer)
        for _ in range(10):
            await peer.line()
        reset(peer)

    proxy = await start_proxy(nursery, await start_upstream(nursery, die_mid_body))
    client = await open_session(proxy)
    await client.send(b"".join(envelope_lines("s@client.test", ["a@x"])))
    await client.replies(3)

    async def send_body():
        # The proxy closing on us is expected once it gave up.
        with contextlib.suppress(trio.BrokenResourceError):
            await client.send(b"line of a long body\r\n" * 100_000 + b".\r\n")

    async with trio.open_nursery() as senders:
        senders.start_soon(send_body)
        replies = await client.rest()
    assert replies.startswith(b"421 4.4.2 ") and b"250" not in replies


async def test_upstream_dying_after_the_final_dot_gives_421_never_250(nursery):
    """The message's fate is unknown when the upstream vanishes before its reply: 421."""
    seen = []

    async def die_after_dot(peer: Peer) -> None:
        await greet_and_accept_envelope(peer)
        seen.append(await peer.until(b"\r\n.\r\n"))

    proxy = await start_proxy(nursery, await start_upstream(nursery, die_after_dot))
    client = await open_session(proxy)
    await client.send(b"".join(envelope_lines("s@client.test", ["a@x"])))
    await client.replies(3)
    await client.send(b"body\r\n.\r\n")
    assert await client.rest() == CLOSED
    assert seen == [b"body\r\n.\r\n"]


async def test_client_vanishing_mid_body_never_sends_the_final_dot(nursery):
    """The client drops halfway: the upstream gets EOF, never the terminator."""
    received, upstream_saw = trio.Event(), list[bytes]()
    proxy = await start_proxy(nursery, await start_upstream(nursery, recording_upstream(upstream_saw, received)))
    client = await open_session(proxy)
    await client.send(b"".join(envelope_lines("s@client.test", ["a@x"])))
    await client.replies(3)
    await client.send(b"Subject: half\r\n\r\nfirst half\r\n")
    await client.aclose()
    await received.wait()
    assert upstream_saw == [b"Subject: half\r\n\r\nfirst half"]  # the last CRLF was held back


async def test_client_reset_mid_body_never_sends_the_final_dot(nursery):
    """Same with a TCP reset from the client, ending on a line that looks like an end."""
    received, upstream_saw = trio.Event(), list[bytes]()
    proxy = await start_proxy(nursery, await start_upstream(nursery, recording_upstream(upstream_saw, received)))
    client = await open_session(proxy)
    await client.send(b"".join(envelope_lines("s@client.test", ["a@x"])))
    await client.replies(3)
    await client.send(b"almost\r\n.")
    reset(client)
    await client.aclose()
    await received.wait()
    assert b"\r\n.\r\n" not in upstream_saw[0]


async def test_upstream_garbage_gives_421(nursery):
    async def garbage(peer: Peer) -> None:
        await greet_and_ehlo(peer)
        await peer.line()
        await peer.send(b"HTTP/1.1 400 Bad Request\r\n")
        await trio.sleep_forever()

    proxy = await start_proxy(nursery, await start_upstream(nursery, garbage))
    client = await open_session(proxy)
    await client.send(b"NOOP\r\n")
    assert await client.rest() == BROKE


async def test_upstream_endless_reply_line_is_cut_off_at_the_reply_size_limit(nursery, autojump_clock):
    """A reply line that never ends gets 421 "broke the protocol" once past --max-reply-size.

    The upstream sends 1 MiB without a line end and then waits: a proxy that ignored the
    limit would keep buffering and, on the jumping clock, answer "timed out" instead.
    """

    async def endless(peer: Peer) -> None:
        await greet_and_ehlo(peer)
        await peer.line()
        await peer.send(b"250" + b"x" * (1 << 20))
        await trio.sleep_forever()

    proxy = await start_proxy(nursery, await start_upstream(nursery, endless))
    client = await open_session(proxy)
    await client.send(b"NOOP\r\n")
    assert await client.rest() == BROKE


async def test_upstream_malformed_multiline_reply_gives_421(nursery):
    """A multi-line reply whose code changes midway is not a reply."""

    async def malformed(peer: Peer) -> None:
        await greet_and_ehlo(peer)
        await peer.line()
        await peer.send(b"250-first\r\n550 second\r\n")
        await trio.sleep_forever()

    proxy = await start_proxy(nursery, await start_upstream(nursery, malformed))
    client = await open_session(proxy)
    await client.send(b"NOOP\r\n")
    assert await client.rest() == BROKE


async def test_bad_client_lines_get_clear_errors_and_the_session_goes_on(nursery):
    """Overlong line, bare LF, garbage bytes: 500 each, in order; then mail still flows."""
    mta = LegacyMTA(reply_delay=0.002)
    proxy = await start_proxy(nursery, await start_legacy(nursery, mta))
    client = await open_session(proxy)
    await client.send(b"NOOP " + b"x" * 5000 + b"\r\nNOOP\nRSET\r\n\xff\xfe\x00\x01\r\nFOO bar\r\n")
    replies = await client.replies(5)
    assert [(r.code, r.text) for r in replies] == [
        (500, "5.5.2 Error: line too long"),
        (500, "5.5.2 Error: bare <LF> received"),
        (250, "2.0.0 Ok"),
        (500, "5.5.2 Error: bare <CR> or NUL in command line"),
        (502, "5.5.2 Error: command not recognized"),
    ]
    await client.send(b"".join(envelope_lines("s@client.test", ["a@legacy.test"])) )
    assert [r.code for r in await client.replies(3)] == [250, 250, 354]
    await client.send(b"ok\r\n.\r\n")
    assert (await client.reply()).code == 250
    assert mta.violations == [] and len(mta.messages) == 1


PIPELINED_UP_TO_DATA = b"EHLO client.test\r\nMAIL FROM:<s@client.test>\r\nRCPT TO:<a@legacy.test>\r\nDATA\r\n"
VANISHING_STAGES = {
    "before the greeting": b"",
    "after EHLO": b"EHLO client.test\r\n",
    "mid-batch": b"EHLO client.test\r\nMAIL FROM:<s@client.test>\r\nRCPT TO:<a@legacy.test>\r\n",
    "after DATA": PIPELINED_UP_TO_DATA,
    "mid-body": PIPELINED_UP_TO_DATA + b"Subject: half\r\n\r\nhalf a body\r\n",
    "on what looks like the end": PIPELINED_UP_TO_DATA + b"body\r\n.",
    "one byte short": PIPELINED_UP_TO_DATA + b"body\r\n.\r",
}


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("stage", VANISHING_STAGES)
async def test_a_client_vanishing_at_any_stage_never_gets_a_message_delivered(nursery, stage, how):
    """Whatever it sent, a client gone before its terminator has no message delivered."""
    mta = LegacyMTA()
    proxy = await start_proxy(nursery, await start_legacy(nursery, mta))
    client = await Peer.connect(proxy)
    await client.send(VANISHING_STAGES[stage])
    if how == "reset":
        reset(client)
    await client.aclose()
    # The proxy opens its upstream side at once, and closes it once it has dealt with
    # the vanished client: only then is the outcome final.
    with trio.fail_after(10):
        while mta.connections == 0 or mta.open_conversations:
            await trio.sleep(0.01)
    assert mta.messages == [] and mta.violations == []


async def test_a_client_that_half_closes_after_its_last_command_still_gets_everything(nursery):
    """Everything pipelined, then EOF: every command still runs and the message is delivered."""
    mta = LegacyMTA(reply_delay=0.002)
    proxy = await start_proxy(nursery, await start_legacy(nursery, mta))
    client = await Peer.connect(proxy)
    await client.send(PIPELINED_UP_TO_DATA + b"body\r\n.\r\nQUIT\r\n")
    await client.stream.send_eof()
    replies = await client.rest()
    codes = [line[:3] for line in replies.splitlines() if line[3:4] == b" "]
    assert codes == [b"220", b"250", b"250", b"250", b"354", b"250", b"221"]
    assert len(mta.messages) == 1 and mta.violations == []


async def test_upstream_reset_while_the_proxy_is_blocked_writing_to_it_gives_421_and_closes(nursery):
    """The upstream stops reading mid-message, so pipeproxy's write to it blocks, then resets.

    The write fails; the client must still get a 421 and the connection must close (a
    failed write that skipped the rest of the session's work would leave it hanging).
    The reset comes once the client's own sending has stalled: every buffer on the way
    is full, so pipeproxy is blocked in that write.
    """
    stalled = trio.Event()

    async def stop_reading_then_reset(peer: Peer) -> None:
        await greet_and_accept_envelope(peer)
        await stalled.wait()
        reset(peer)

    proxy = await start_proxy(nursery, await start_upstream(nursery, stop_reading_then_reset))
    client = await open_session(proxy)
    await client.send(b"".join(envelope_lines("s@client.test", ["a@x"])))
    assert [r.code for r in await client.replies(3)] == [250, 250, 354]

    async def send_body() -> None:
        chunk = b"line of a long body\r\n" * 3000
        try:
            while True:
                with trio.move_on_after(0.5) as waiting:
                    await client.send(chunk)
                if waiting.cancelled_caught:
                    stalled.set()
                    await client.send(chunk)  # the rest of it, if the proxy ever reads again
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the proxy closed on us: expected once it gave up

    async with trio.open_nursery() as senders:
        senders.start_soon(send_body)
        with trio.fail_after(60):  # a hang guard: a skipped Close never answers at all
            replies = await client.rest()
        senders.cancel_scope.cancel()
    assert stalled.is_set()
    assert replies.startswith(b"421 4.4.2 ") and b"250" not in replies
