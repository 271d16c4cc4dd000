"""Limits and timeouts: every bound holds, and what is refused gets a clear reply."""

from __future__ import annotations

from pathlib import Path

import trio

from pipeproxy.core.config import Config, Timeouts
from pipeproxy.core.events import ClientData, Tick
from pipeproxy.demo.legacy_mta import LegacyMTA

from peers import Peer, open_session, start_legacy, start_proxy, start_upstream
from test_session import GREETING, OPENED, lockstep_group
from transcript import CLOSED, RECONNECTED, TO_CLIENT, TO_UPSTREAM, C, U, play, play_every_way

SMALL = Config(max_recipients=2, max_message_size=100)
# The session opened as in test_session, with pipeproxy's own SIZE 100 advertised.
OPENED_SMALL = GREETING + [
    (C, b"EHLO client.test\r\n"),
    (TO_UPSTREAM, b"EHLO client.test\r\n"),
    (U, b"250-legacy.test\r\n250 SIZE 1000000\r\n"),
    (TO_CLIENT, b"250-legacy.test\r\n250-SIZE 100\r\n250 PIPELINING\r\n"),
]


def test_recipients_beyond_the_limit_get_452_and_stay_here():
    """RFC 5321 §4.5.3.1.10: 452 for too many recipients; the upstream sees only the first two."""
    play_every_way(
        OPENED_SMALL
        + [
            (C, b"MAIL FROM:<s@c>\r\nRCPT TO:<a@l>\r\nRCPT TO:<b@l>\r\nRCPT TO:<c@l>\r\nDATA\r\n"),
            (TO_UPSTREAM, b"MAIL FROM:<s@c>\r\n"),
            (U, b"250 Ok\r\n"),
            (TO_UPSTREAM, b"RCPT TO:<a@l>\r\n"),
            (U, b"250 Ok\r\n"),
            (TO_UPSTREAM, b"RCPT TO:<b@l>\r\n"),
            (U, b"250 Ok\r\n"),
            (TO_UPSTREAM, b"DATA\r\n"),
            (U, b"354 go\r\n"),
            (TO_CLIENT, b"250 Ok\r\n250 Ok\r\n250 Ok\r\n452 4.5.3 Error: too many recipients\r\n354 go\r\n"),
        ],
        SMALL,
    )


def test_declared_size_over_the_limit_gets_552_at_mail():
    """RFC 1870 §6.1: a MAIL FROM whose SIZE is too big is refused before any content."""
    play_every_way(
        OPENED_SMALL
        + [
            (C, b"MAIL FROM:<s@c> SIZE=101\r\nMAIL FROM:<s@c> SIZE=100\r\n"),
            (TO_UPSTREAM, b"MAIL FROM:<s@c> SIZE=100\r\n"),
            (U, b"250 Ok\r\n"),
            (TO_CLIENT, b"552 5.3.4 Message size exceeds fixed maximum message size\r\n250 Ok\r\n"),
        ],
        SMALL,
    )


def test_content_over_the_limit_gets_552_and_is_never_completed_upstream():
    """Part went upstream already: the connection is dropped without a final dot, and the
    session goes on over a new one (greeted again, silently)."""
    run = play(
        OPENED_SMALL
        + lockstep_group(1)
        + [
            (C, b"x" * 60 + b"\r\n"),
            (TO_UPSTREAM, b"x" * 60),
            (C, b"y" * 60 + b"\r\n.\r\nRSET\r\n"),
            (TO_CLIENT, b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"),
            (RECONNECTED,),
            (U, b"220 l\r\n"),
            (TO_UPSTREAM, b"EHLO client.test\r\n"),
            (U, b"250 l\r\n"),
            (TO_UPSTREAM, b"RSET\r\n"),
            (U, b"250 2.0.0 Ok\r\n"),
            (TO_CLIENT, b"250 2.0.0 Ok\r\n"),
        ],
        SMALL,
    )
    assert run.events("transaction")[0]["reply_code"] == 552
    assert run.closed is None


def test_own_size_limit_is_advertised_as_the_smaller_size():
    """The upstream's SIZE 1000000 becomes pipeproxy's 100; a missing SIZE is added."""
    play(
        GREETING
        + [
            (C, b"EHLO c\r\n"),
            (TO_UPSTREAM, b"EHLO c\r\n"),
            (U, b"250-l\r\n250-SIZE 1000000\r\n250 8BITMIME\r\n"),
            (TO_CLIENT, b"250-l\r\n250-SIZE 100\r\n250-8BITMIME\r\n250 PIPELINING\r\n"),
            (C, b"EHLO c\r\n"),
            (TO_UPSTREAM, b"EHLO c\r\n"),
            (U, b"250 l\r\n"),
            (TO_CLIENT, b"250-l\r\n250-SIZE 100\r\n250 PIPELINING\r\n"),
        ],
        SMALL,
    )


def test_oversized_reply_from_upstream_ends_the_session_with_421():
    play(
        OPENED
        + [
            (C, b"NOOP\r\n"),
            (TO_UPSTREAM, b"NOOP\r\n"),
            (U, b"250-" + b"x" * 100 + b"\r\n250 end\r\n"),
            (TO_CLIENT, b"421 4.4.2 Upstream server broke the protocol, closing connection\r\n"),
            (CLOSED,),
        ],
        Config(max_reply_size=64),
    )


def trickle(run, data: bytes, every: float) -> None:
    """Feed one byte every ``every`` seconds until the session gives up or data runs out."""
    for byte in data:
        run.clock.now += every
        if run.clock.now >= run.session.deadline:
            run.feed(Tick())
            return
        run.feed(ClientData(bytes([byte])))


def test_a_command_trickled_a_byte_a_minute_is_cut_off_by_the_idle_timeout():
    """Partial bytes do not restart the wait for a command (a deadline per command, as Postfix)."""
    run = play(OPENED)
    started = run.clock.now
    trickle(run, b"NOOP this is a slow command\r\n", every=60)
    assert run.new_client_bytes() == b"421 4.4.2 Error: timeout exceeded, closing connection\r\n"
    assert run.closed is not None and run.clock.now - started <= Timeouts().client_idle + 60


def test_content_trickled_a_byte_a_minute_is_cut_off_by_the_minimum_rate():
    """Each byte beats the 3-minute block timeout, but 1/60 octet a second is far below 500."""
    run = play(OPENED + lockstep_group(1))
    started = run.clock.now
    trickle(run, b"\r\n" * 100, every=60)
    assert run.new_client_bytes() == b"421 4.4.2 Error: message not completed, closing connection\r\n"
    assert run.closed is not None and run.clock.now - started < 2 * Timeouts().data_block
    assert b"\r\n.\r\n" not in b"".join(run.upstream_writes), "the cut-off message was completed upstream"


def test_a_silent_client_mid_message_is_cut_off_by_the_block_timeout():
    steps = OPENED + lockstep_group(1) + [(C, b"x" * 100_000), (TO_UPSTREAM, b"x" * 100_000)]
    run = play(steps)
    last_data = run.clock.now
    run.clock.now = run.session.deadline
    run.feed(Tick())
    assert run.clock.now - last_data == Timeouts().data_block
    assert run.new_client_bytes() == b"421 4.4.2 Error: message not completed, closing connection\r\n"
    assert run.closed is not None


async def test_sessions_beyond_the_limit_get_421_at_once(nursery):
    """With two sessions open, a third client gets 421 straight away; a freed place is reused."""
    mta = LegacyMTA()
    proxy = await start_proxy(nursery, await start_legacy(nursery, mta), max_sessions=2)
    first, second = await Peer.connect(proxy), await Peer.connect(proxy)
    assert (await first.reply()).code == 220 and (await second.reply()).code == 220
    third = await Peer.connect(proxy)
    assert await third.rest() == b"421 4.7.0 Error: too many sessions, try again later\r\n"
    await first.send(b"QUIT\r\n")
    assert (await first.reply()).code == 221
    assert await first.rest() == b""
    await first.aclose()
    for _ in range(100):  # the place is freed once the first session has wound down
        fourth = await Peer.connect(proxy)
        if (await fourth.reply()).code == 220:
            break
        await trio.sleep(0.01)
    else:
        raise AssertionError("the freed place was never given to a new client")


async def test_slowloris_in_data_over_sockets_gets_421_and_nothing_is_delivered(nursery, autojump_clock):
    """A real client sending a byte a minute after 354 is cut off; the upstream gets no dot."""
    mta = LegacyMTA()
    proxy = await start_proxy(nursery, await start_legacy(nursery, mta))
    client = await Peer.connect(proxy)
    await client.reply()
    await client.send(b"HELO c\r\nMAIL FROM:<s@c>\r\nRCPT TO:<r@legacy.test>\r\nDATA\r\n")
    assert [r.code for r in await client.replies(4)] == [250, 250, 250, 354]

    async def drip():
        try:
            while True:
                await client.send(b"\r\n")
                await trio.sleep(60)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    nursery.start_soon(drip)
    assert await client.rest() == b"421 4.4.2 Error: message not completed, closing connection\r\n"
    assert mta.messages == []


# More than pipeproxy reads at once (64 KiB today), whatever the shell's read size becomes.
ONE_READ = 1 << 20


def kernel_buffers_max() -> int:
    """The most one direction of a loopback connection can hold in the kernel: the
    sender's buffer and the receiver's, at their autotuning maxima (tcp_wmem, tcp_rmem)."""
    rmem = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    wmem = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    return rmem + wmem


async def test_pipelined_input_stops_being_read_at_max_pipeline_bytes_while_the_upstream_is_slow(nursery):
    """A client floods NOOPs while the upstream sits on the first: pipeproxy stops reading.

    All the client can get rid of is what pipeproxy holds (the bound, and less than
    ONE_READ in the read under way) plus what the kernel buffers between them take. A proxy that kept reading
    would take the whole flood, which is larger than that by a margin, without an answer.
    The wait for the flood to finish is only how long it gets to show that.
    """
    limit = 64 * 1024
    most = limit + ONE_READ + kernel_buffers_max()
    flood = b"NOOP\r\n" * ((most + (8 << 20)) // 6)
    stalled = trio.Event()

    async def stalled_upstream(peer: Peer) -> None:
        await peer.send(b"220 legacy.test\r\n")
        assert await peer.line() == b"EHLO client.test\r\n"
        await peer.send(b"250 legacy.test\r\n")
        assert await peer.line() == b"NOOP\r\n"
        stalled.set()
        await trio.sleep_forever()

    proxy = await start_proxy(nursery, await start_upstream(nursery, stalled_upstream), max_pipeline_bytes=limit)
    client = await open_session(proxy)
    sent = 0
    flooded = trio.Event()

    async def send_flood() -> None:
        nonlocal sent
        for start in range(0, len(flood), 65536):
            await client.send(flood[start : start + 65536])
            sent = min(start + 65536, len(flood))
        flooded.set()

    async with trio.open_nursery() as flooding:
        flooding.start_soon(send_flood)
        await stalled.wait()
        with trio.move_on_after(5):
            await flooded.wait()
        flooding.cancel_scope.cancel()
    assert not flooded.is_set() and sent <= most, f"{sent} octets got away; holding {limit} allows {most}"
