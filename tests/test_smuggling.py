"""SMTP smuggling (SEC Consult, 2023; CVE-2023-51764, -51765, -51766) end to end.

The upstream here is deliberately lenient, as the vulnerable old MTAs are: it ends lines
at bare LF or bare CR too, and drops NUL bytes. Each known end-of-data variant is sent
inside a message, followed by a second transaction. Pass: the upstream sees exactly one
MAIL FROM, and either the client got a clear 5xx or the stray bytes arrived neutralised
inside the first message. A control sends the same bytes straight at that upstream and
shows the smuggled message gets through there, so each case can fail.
"""

from __future__ import annotations

import pytest

from pipeproxy.core.config import Address, BareLineEndings
from pipeproxy.core.wire import Reply
from pipeproxy.demo.client import envelope_lines
from pipeproxy.demo.legacy_mta import LegacyMTA

from peers import Peer, start_legacy, start_proxy

# From the SEC Consult research and the scanners that followed it; each would end the
# message early on some MTA.
VARIANTS = [
    b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\n.\r", b"\r.\n",
    b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\n.\x00\n", b"\r\n.\r\r\n", b"\r\r\n.\r\r\n", b"\n\n.\n\n",
]
SMUGGLED = (
    b"MAIL FROM:<smuggled@evil.test>\r\nRCPT TO:<victim@legacy.test>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nforged\r\n"
)


def payload(variant: bytes) -> bytes:
    return b"Subject: first\r\n\r\nfirst body" + variant + SMUGGLED + b".\r\n"


async def send_message(address: Address, content: bytes) -> tuple[Reply, Peer]:
    """One transaction in lock-step, ``content`` as its message: the reply to it, and the client."""
    client = await Peer.connect(address)
    await client.reply()
    await client.send(b"HELO client.test\r\n")
    await client.reply()
    for line in envelope_lines("honest@client.test", ["rcpt@legacy.test"]):
        await client.send(line)
        await client.reply()
    await client.send(content)
    return await client.reply(), client


async def quit_session(client: Peer) -> None:
    """QUIT, answered with 221: the session went on normally after the message."""
    await client.send(b"QUIT\r\n")
    assert (await client.reply()).code == 221


@pytest.mark.parametrize("variant", VARIANTS, ids=repr)
async def test_control_the_lenient_upstream_is_vulnerable(nursery, variant):
    """Straight at the lenient upstream (which, like smtp-sink, also takes early input),
    the variant ends the first message early: the forged one is smuggled in, or the
    first is cut short."""
    mta = LegacyMTA(lenient=True, enforce_sync=False)
    _, client = await send_message(await start_legacy(nursery, mta), payload(variant))
    await client.send(b"QUIT\r\n")
    await client.rest()  # the upstream has answered everything, the smuggled part included
    smuggled = mta.commands.count("MAIL") > 1
    truncated = not mta.messages or b"smuggled" not in mta.messages[0].content
    assert smuggled or truncated


@pytest.mark.parametrize("variant", VARIANTS, ids=repr)
async def test_neutralised_variant_arrives_inside_the_one_message(nursery, variant):
    mta = LegacyMTA(lenient=True)
    proxy = await start_proxy(nursery, await start_legacy(nursery, mta))
    reply, client = await send_message(proxy, payload(variant))
    assert reply.code == 250
    await quit_session(client)
    assert mta.commands.count("MAIL") == 1
    [message] = mta.messages
    assert b"MAIL FROM:<smuggled@evil.test>" in message.content
    assert message.content.endswith(b"forged\r\n")


@pytest.mark.parametrize("variant", VARIANTS, ids=repr)
async def test_rejected_variant_gets_550_and_nothing_is_delivered(nursery, variant):
    mta = LegacyMTA(lenient=True)
    proxy = await start_proxy(nursery, await start_legacy(nursery, mta), bare_line_endings=BareLineEndings.REJECT)
    reply, client = await send_message(proxy, payload(variant))
    assert reply.code == 550
    # The session goes on over a new upstream connection (the old one was dropped
    # without a final dot): the next command is the upstream's to answer.
    await quit_session(client)
    assert mta.commands.count("MAIL") == 1
    assert mta.messages == []


async def test_strictly_framed_content_that_merely_looks_odd_is_delivered_as_is(nursery):
    """No false alarm: dots, blank lines and a dot-stuffed '.' line pass untouched."""
    mta = LegacyMTA(lenient=True)
    proxy = await start_proxy(nursery, await start_legacy(nursery, mta), bare_line_endings=BareLineEndings.REJECT)
    reply, client = await send_message(proxy, b"a\r\n..\r\n\r\n...x\r\n.\r\n")
    assert reply.code == 250
    await quit_session(client)
    assert mta.messages[0].content == b"a\r\n.\r\n\r\n..x\r\n"


@pytest.mark.parametrize(
    "line", [b"MAIL FROM:<a@client.test>\nRCPT TO:<x@legacy.test>\r\n", b"NOOP\rRSET\r\n", b"NOOP\x00\r\n"]
)
async def test_bare_line_endings_in_commands_never_reach_the_lenient_upstream(nursery, line):
    """The lenient upstream would read two commands in each; it sees none of these lines."""
    mta = LegacyMTA(lenient=True)
    proxy = await start_proxy(nursery, await start_legacy(nursery, mta))
    client = await Peer.connect(proxy)
    await client.reply()
    await client.send(b"HELO client.test\r\n" + line + b"QUIT\r\n")
    replies = [r.code for r in await client.replies(4 if line.startswith(b"MAIL") else 3)]
    assert replies[1] == 500
    assert "MAIL" not in mta.commands and "RSET" not in mta.commands
