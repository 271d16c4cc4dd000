"""Through real sockets: pipeproxy in front of the strict legacy MTA, which fails the
test (by recording a violation) if any byte arrives before it has finished a reply."""

from __future__ import annotations

import smtplib
from email.message import EmailMessage

import pytest
import trio

from pipeproxy.demo.client import envelope_lines
from pipeproxy.demo.legacy_mta import LegacyMTA

from peers import Peer, open_session, start_legacy, start_proxy, start_upstream

RECIPIENTS = [f"rcpt{i}@legacy.test" for i in range(10)]


@pytest.fixture
def mta() -> LegacyMTA:
    # A short pause before each reply gives an early byte from the proxy time to land.
    return LegacyMTA(reply_delay=0.002)


async def test_the_strict_upstream_catches_a_pipelining_client(nursery, mta):
    """The control: straight at the legacy MTA, the same group is an error, so the check works."""
    address = await start_legacy(nursery, mta)
    peer = await Peer.connect(address)
    await peer.reply()
    await peer.send(b"EHLO client.test\r\n")
    await peer.reply()
    await peer.send(b"".join(envelope_lines("s@client.test", RECIPIENTS)))
    assert (await peer.reply()).code == 554
    assert mta.violations == ["input before the reply to MAIL"]


async def test_pipelined_group_goes_upstream_in_lock_step_and_returns_in_one_write(nursery, mta):
    """MAIL, 10 RCPT, DATA in one write: no violation upstream, 12 replies in one read."""
    proxy = await start_proxy(nursery, await start_legacy(nursery, mta))
    peer = await open_session(proxy)
    reads_before = peer.reads
    await peer.send(b"".join(envelope_lines("s@client.test", RECIPIENTS)))
    replies = await peer.replies(12)
    assert [r.code for r in replies] == [250] * 11 + [354]
    assert peer.reads - reads_before == 1, "the group's replies came in one write"
    await peer.send(b"Subject: test\r\n\r\n..dot line\r\nbody\r\n.\r\nQUIT\r\n")
    assert [r.code for r in await peer.replies(2)] == [250, 221]
    assert mta.violations == []
    [message] = mta.messages
    assert message.recipients == RECIPIENTS
    assert message.content == b"Subject: test\r\n\r\n.dot line\r\nbody\r\n"


async def test_message_and_next_transaction_in_one_write(nursery, mta):
    """RFC 2920 §3.1: body, then MAIL/RCPT/DATA, then a second body, with no early byte upstream."""
    proxy = await start_proxy(nursery, await start_legacy(nursery, mta))
    peer = await open_session(proxy)
    await peer.send(b"".join(envelope_lines("a@client.test", ["x@legacy.test"])))
    assert [r.code for r in await peer.replies(3)] == [250, 250, 354]
    await peer.send(b"first\r\n.\r\n" + b"".join(envelope_lines("b@client.test", ["y@legacy.test"])))
    assert [r.code for r in await peer.replies(4)] == [250, 250, 250, 354]
    await peer.send(b"second\r\n.\r\n")
    assert (await peer.reply()).code == 250
    assert mta.violations == []
    assert [(m.sender, m.content) for m in mta.messages] == [
        ("a@client.test", b"first\r\n"),
        ("b@client.test", b"second\r\n"),
    ]


async def test_rejected_recipients_and_refused_data_keep_the_replies_honest(nursery, mta):
    """Each reply is the upstream's: 550 for refused recipients, 554 when none is left."""
    proxy = await start_proxy(nursery, await start_legacy(nursery, mta))
    peer = await open_session(proxy)
    await peer.send(b"".join(envelope_lines("s@client.test", ["reject1@legacy.test", "reject2@legacy.test"])))
    assert [r.code for r in await peer.replies(4)] == [250, 550, 550, 554]
    # After the refused DATA, what the client sends is commands again.
    await peer.send(b"RSET\r\nNOOP\r\n")
    assert [r.code for r in await peer.replies(2)] == [250, 250]
    assert mta.messages == [] and mta.violations == []


async def test_multiline_greeting_is_relayed_whole(nursery):
    """A 220- continuation greeting reaches the client as one multi-line reply."""
    mta = LegacyMTA(greeting=("legacy.test ESMTP", "second line", "third line"))
    proxy = await start_proxy(nursery, await start_legacy(nursery, mta))
    peer = await Peer.connect(proxy)
    greeting = await peer.reply()
    assert (greeting.code, greeting.lines) == (220, ("legacy.test ESMTP", "second line", "third line"))


async def test_ehlo_refused_upstream_falls_back_to_helo(nursery):
    """An upstream without ESMTP: the client still gets EHLO with PIPELINING, and mail flows."""
    mta = LegacyMTA(esmtp=False, reply_delay=0.002)
    proxy = await start_proxy(nursery, await start_legacy(nursery, mta))
    peer = await open_session(proxy)
    await peer.send(b"".join(envelope_lines("s@client.test", RECIPIENTS[:3])))
    assert [r.code for r in await peer.replies(5)] == [250, 250, 250, 250, 354]
    await peer.send(b"hi\r\n.\r\n")
    assert (await peer.reply()).code == 250
    assert mta.commands[:2] == ["EHLO", "HELO"]
    assert mta.violations == [] and len(mta.messages) == 1


async def test_large_message_streams_through_whole_and_unchanged(nursery, mta):
    """A 5 MB message, sent while replies are read, arrives whole and unchanged.

    (That memory stays bounded meanwhile is test_memory's job.)
    """
    proxy = await start_proxy(nursery, await start_legacy(nursery, mta))
    peer = await open_session(proxy)
    await peer.send(b"".join(envelope_lines("s@client.test", ["big@legacy.test"])))
    await peer.replies(3)
    line = b"x" * 998 + b"\r\n"
    content = line * 5000

    async def send_body():
        await peer.send(content + b".\r\n")

    async with trio.open_nursery() as senders:
        senders.start_soon(send_body)
        assert (await peer.reply()).code == 250
    assert mta.messages[0].content == content


def _smtplib_send(port: int, messages: list[tuple[str, list[str], str]]) -> list[dict]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test") as smtp:
        smtp.ehlo()
        assert smtp.has_extn("pipelining")
        refused = []
        for sender, recipients, subject in messages:
            message = EmailMessage()
            message["From"], message["To"], message["Subject"] = sender, ", ".join(recipients), subject
            message.set_content(f"{subject}\n.leading dot line\n")
            refused.append(smtp.send_message(message, sender, recipients))
        return refused


async def test_smtplib_sends_to_ten_recipients(nursery, mta):
    """Python's smtplib as the client: one message, ten recipients, all delivered."""
    proxy = await start_proxy(nursery, await start_legacy(nursery, mta))
    refused = await trio.to_thread.run_sync(_smtplib_send, proxy.port, [("s@client.test", RECIPIENTS, "ten")])
    assert refused == [{}]
    [message] = mta.messages
    assert message.recipients == RECIPIENTS
    assert b"\r\n.leading dot line\r\n" in message.content
    assert mta.violations == []


async def test_smtplib_sends_two_messages_in_one_session(nursery, mta):
    """Two transactions on one connection arrive as two messages with their own envelopes."""
    proxy = await start_proxy(nursery, await start_legacy(nursery, mta))
    batch = [
        ("a@client.test", ["one@legacy.test"], "first"),
        ("b@client.test", ["two@legacy.test", "reject@legacy.test"], "second"),
    ]
    refused = await trio.to_thread.run_sync(_smtplib_send, proxy.port, batch)
    assert refused[0] == {} and list(refused[1]) == ["reject@legacy.test"]
    assert [(m.sender, m.recipients) for m in mta.messages] == [
        ("a@client.test", ["one@legacy.test"]),
        ("b@client.test", ["two@legacy.test"]),
    ]
    assert b"Subject: second" in mta.messages[1].content
    assert mta.violations == []


async def test_backpressure_keeps_order_when_the_client_sends_more_than_the_proxy_holds(nursery):
    """600 pipelined NOOPs (5 KB) against a 1 KiB input limit: all answered, in order, no early byte.

    The upstream numbers each reply after its NOOP, so an answer out of order shows, and
    checks that nothing had arrived behind a command before it answered.
    """
    count = 600
    early: list[bytes] = []

    async def numbering_upstream(peer: Peer) -> None:
        await peer.send(b"220 legacy.test\r\n")
        assert await peer.line() == b"EHLO client.test\r\n"
        await peer.send(b"250 legacy.test\r\n")
        for _ in range(count):
            line = await peer.line()
            if peer.buffer:
                early.append(bytes(peer.buffer))
            await peer.send(b"250 " + line.removeprefix(b"NOOP "))

    proxy = await start_proxy(nursery, await start_upstream(nursery, numbering_upstream), max_pipeline_bytes=1024)
    peer = await open_session(proxy)

    async def send_all_noops():
        await peer.send(b"".join(b"NOOP %d\r\n" % i for i in range(count)))

    async with trio.open_nursery() as senders:
        senders.start_soon(send_all_noops)
        replies = await peer.replies(count)
    assert [(r.code, r.text) for r in replies] == [(250, str(i)) for i in range(count)]
    assert early == []
