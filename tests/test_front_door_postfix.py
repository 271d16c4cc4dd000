"""The front door against a real Postfix that judges clients by their address.

``postfix_front_door`` (tests/conftest.py, tests/postfix.py) lets only 127.0.0.1 relay to
other domains (``mynetworks = 127.0.0.1/32``), lets only 127.0.0.1 send XCLIENT, and has
a second listener that reads a PROXY header first. Clients bind 127.0.0.1 or 127.0.0.2 as
their source and all reach pipeproxy on 127.0.0.1; pipeproxy itself always connects to
Postfix from 127.0.0.1. So unless pipeproxy tells Postfix who the client is, a client on
127.0.0.2 may relay through it: the open relay these features close.

Each dialogue is MAIL, a RCPT to another domain (only ``mynetworks`` may relay there), a
RCPT to legacy.test (anyone may send there, so the message still goes through) and DATA:
pipelined through pipeproxy, lock-step straight at Postfix (which refuses pipelining).
What the client is told through pipeproxy must be what Postfix tells it straight.
"""

from __future__ import annotations

import re
import shutil
import time
import uuid
from dataclasses import dataclass

import pytest
import trio

from pipeproxy.core.config import Address
from pipeproxy.core.wire import Reply
from pipeproxy.demo.client import envelope_lines

from peers import Peer, start_proxy

pytestmark = pytest.mark.peers

INSIDE_MYNETWORKS = "127.0.0.1"
OUTSIDE_MYNETWORKS = "127.0.0.2"
OUTSIDE = "x@elsewhere.test"  # another domain: only a client in mynetworks may relay there
INSIDE = "user1@legacy.test"  # Postfix's own domain: anyone may send there
SENDER = "sender@client.test"
# smtpd_relay_restrictions' default ends in defer_unauth_destination: a temporary refusal.
RELAY_DENIED = "454 4.7.1"


@dataclass
class Dialogue:
    """What one client was told, and where it came from."""

    source: Address  # the client's own end of its connection
    ehlo: Reply
    answers: list[str]  # per command after EHLO: the code and the first word of the text
    queue_id: str  # from Postfix's reply to the end of the message: its maillog lines have it


def short(reply: Reply) -> str:
    """``454 4.7.1``: the code and the enhanced status, without queue ids or host names."""
    return f"{reply.code} {reply.text.split()[0]}"


async def converse(
    address: Address, source: str, subject: str, *, pipelined: bool, header: bytes = b"", claim: str = "",
    hello: str = "EHLO",
) -> Dialogue:
    """A client bound to ``source``: ``hello`` (EHLO or HELO), then the relay dialogue;
    with ``header`` first (a PROXY header of its own); with ``claim``, its own
    ``XCLIENT ADDR=<claim>`` after the hello."""
    stream = await trio.open_tcp_stream(address.host, address.port, local_address=source)
    own = Address(*stream.socket.getsockname()[:2])
    peer = Peer(stream)
    async with stream:
        await peer.send(header)
        assert (await peer.reply()).code == 220
        await peer.send(f"{hello} client.test\r\n".encode())
        ehlo = await peer.reply()
        assert ehlo.code == 250, ehlo
        answers = []
        if claim:
            await peer.send(f"XCLIENT ADDR={claim}\r\n".encode())
            answers.append(short(await peer.reply()))
        commands = envelope_lines(SENDER, [OUTSIDE, INSIDE])
        if pipelined:
            await peer.send(b"".join(commands))
            answers += [short(reply) for reply in await peer.replies(len(commands))]
        else:
            for command in commands:
                await peer.send(command)
                answers.append(short(await peer.reply()))
        queue_id = ""
        if answers[-1].startswith("354"):
            await peer.send(f"Subject: {subject}\r\n\r\nWho am I?\r\n.\r\n".encode())
            end = await peer.reply()
            answers.append(short(end))
            queue_id = end.text.rpartition(" ")[2] if "queued as" in end.text else ""
        await peer.send(b"QUIT\r\n")
        await peer.reply()
    return Dialogue(own, ehlo, answers, queue_id)


def offers_xclient(ehlo: Reply) -> bool:
    return any(line.upper().startswith("XCLIENT") for line in ehlo.lines)


def v1_header(client: Address, server_port: int) -> bytes:
    """A PROXY v1 header written by hand, as a load balancer would for ``client``."""
    return f"PROXY TCP4 {client.host} 127.0.0.1 {client.port} {server_port}\r\n".encode()


def wait_logged(postfix, pattern: str, limit: float = 30.0) -> str:
    """The first maillog line matching ``pattern`` (postlogd writes it a moment later); "" if none."""
    deadline = time.monotonic() + limit
    while True:
        found = re.search(f"^.*{pattern}.*$", postfix.maillog, re.MULTILINE)
        if found or time.monotonic() > deadline:
            return found[0] if found else ""
        time.sleep(0.1)


async def logged(postfix, pattern: str) -> str:
    return await trio.to_thread.run_sync(wait_logged, postfix, pattern)


async def delivered_from(postfix, subject: str) -> str:
    """The Received header Postfix wrote into the message with ``subject``."""
    [message] = await trio.to_thread.run_sync(postfix.wait_delivered, subject, 1)
    return " ".join(message["Received"].split())


def expected_for(source: str) -> list[str]:
    """What Postfix tells a client from ``source`` (checked against Postfix itself below)."""
    outside = "250 2.1.5" if source == INSIDE_MYNETWORKS else RELAY_DENIED
    return ["250 2.1.0", outside, "250 2.1.5", "354 End", "250 2.0.0"]


def subject(label: str) -> str:
    return f"front door {label} {uuid.uuid4().hex}"


@pytest.mark.parametrize("source", [INSIDE_MYNETWORKS, OUTSIDE_MYNETWORKS])
async def test_xclient_postfix_judges_the_real_client_through_pipeproxy(nursery, postfix_front_door, source):
    """Through pipeproxy (XCLIENT on its own, since Postfix offers it to 127.0.0.1) the
    pipelined dialogue gets exactly the answers the lock-step one gets straight at
    Postfix; Postfix logs the client's own address and port, not pipeproxy's, and writes
    them into the Received header.

    Fails if pipeproxy sent no XCLIENT or the wrong ADDR (the 127.0.0.2 client's RCPT to
    another domain would be accepted), a wrong PORT (the maillog line), if Postfix refused
    its XCLIENT line (421 for everything), or if it showed the client XCLIENT in EHLO.
    """
    postfix = postfix_front_door
    straight = await converse(Address("127.0.0.1", postfix.port), source, subject("straight"), pipelined=False)
    assert straight.answers == expected_for(source)  # the set-up judges by address at all

    proxy = await start_proxy(nursery, Address("127.0.0.1", postfix.port))
    label = subject(f"xclient {source}")
    through = await converse(proxy, source, label, pipelined=True)
    assert through.answers == straight.answers
    # Postfix offers XCLIENT to 127.0.0.1 only; pipeproxy never shows it to a client.
    assert offers_xclient(straight.ehlo) == (source == INSIDE_MYNETWORKS), straight.ehlo
    assert not offers_xclient(through.ehlo), through.ehlo

    port = through.source.port
    assert await logged(postfix, rf"{through.queue_id}: client=unknown\[{re.escape(source)}\]:{port}$")
    if source == OUTSIDE_MYNETWORKS:
        refused = rf"reject: RCPT from unknown\[{re.escape(source)}\]:{port}: {RELAY_DENIED} <{OUTSIDE}>"
        assert await logged(postfix, refused)
    assert f"(unknown [{source}])" in await delivered_from(postfix, label)


async def test_xclient_for_a_helo_client(nursery, postfix_front_door):
    """A client that says HELO: pipeproxy asks with EHLO whether XCLIENT is on offer, sends
    it, then the client's HELO; Postfix logs the session as SMTP from 127.0.0.2.

    Fails if pipeproxy only looked for XCLIENT after an EHLO (the client could relay),
    or sent PROTO=ESMTP for it.
    """
    postfix = postfix_front_door
    proxy = await start_proxy(nursery, Address("127.0.0.1", postfix.port))
    through = await converse(proxy, OUTSIDE_MYNETWORKS, subject("helo"), pipelined=False, hello="HELO")
    assert through.answers == expected_for(OUTSIDE_MYNETWORKS)
    refused = rf"reject: RCPT from unknown\[127\.0\.0\.2\]:{through.source.port}: {RELAY_DENIED} .* proto=SMTP "
    assert await logged(postfix, refused)


async def test_xclient_again_when_pipeproxy_reconnects_after_refusing_a_message(nursery, postfix_front_door):
    """pipeproxy refuses a message over its own size limit by dropping the upstream
    connection mid-DATA, then goes on for the client over a new one: that one is told
    who the client is too, so the next transaction is judged as the first was.

    Fails if the replayed greeting skipped XCLIENT: the 127.0.0.2 client could then relay.
    """
    postfix = postfix_front_door
    proxy = await start_proxy(nursery, Address("127.0.0.1", postfix.port), max_message_size=200)
    stream = await trio.open_tcp_stream(proxy.host, proxy.port, local_address=OUTSIDE_MYNETWORKS)
    peer = Peer(stream)
    port = stream.socket.getsockname()[1]
    async with stream:
        assert (await peer.reply()).code == 220
        await peer.send(b"EHLO client.test\r\n")
        assert (await peer.reply()).code == 250
        await peer.send(b"".join(envelope_lines(SENDER, [INSIDE])))
        assert [short(reply) for reply in await peer.replies(3)] == ["250 2.1.0", "250 2.1.5", "354 End"]
        await peer.send(b"Subject: too big\r\n\r\n" + b"x" * 400 + b"\r\n.\r\n")
        assert short(await peer.reply()) == "552 5.3.4"
        await peer.send(b"".join(envelope_lines(SENDER, [OUTSIDE, INSIDE])))
        answers = [short(reply) for reply in await peer.replies(4)]
        assert answers == expected_for(OUTSIDE_MYNETWORKS)[:4]
        await peer.send(b".\r\nQUIT\r\n")
        end = await peer.reply()
        assert short(end) == "250 2.0.0"
    queue_id = end.text.rpartition(" ")[2]
    assert await logged(postfix, rf"{queue_id}: client=unknown\[127\.0\.0\.2\]:{port}$")
    # Both upstream connections: the one dropped mid-DATA and the new one.
    assert len(re.findall(rf": client=unknown\[127\.0\.0\.2\]:{port}$", postfix.maillog, re.MULTILINE)) == 2


async def test_without_xclient_pipeproxy_is_an_open_relay(nursery, postfix_front_door):
    """The control: with ``xclient="off"`` Postfix sees pipeproxy's 127.0.0.1 and lets the
    127.0.0.2 client relay to another domain, which it refuses straight. This is what the
    test above would see if XCLIENT did nothing.

    Fails if Postfix judged 127.0.0.2 by something pipeproxy cannot hide (the set-up
    would then prove nothing) or if pipeproxy sent XCLIENT although told not to.
    """
    postfix = postfix_front_door
    proxy = await start_proxy(nursery, Address("127.0.0.1", postfix.port), xclient="off")
    through = await converse(proxy, OUTSIDE_MYNETWORKS, subject("xclient off"), pipelined=True)
    assert through.answers == expected_for(INSIDE_MYNETWORKS)
    assert through.answers != expected_for(OUTSIDE_MYNETWORKS)
    line = await logged(postfix, rf"{through.queue_id}: client=unknown\[127\.0\.0\.1\]:\d+$")
    assert line and not line.endswith(f":{through.source.port}")  # pipeproxy's own port, not the client's


@pytest.mark.parametrize("source", [INSIDE_MYNETWORKS, OUTSIDE_MYNETWORKS])
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_proxy_protocol_postfix_judges_the_client_in_pipeproxys_header(
    nursery, postfix_front_door, version, source
):
    """Postfix's ``smtpd_upstream_proxy_protocol = haproxy`` listener judges the client
    named in the header pipeproxy writes first, as it judges one a load balancer names.

    Fails if pipeproxy wrote its own address (the 127.0.0.2 client could relay), no
    header or a malformed one (Postfix drops the connection: EOFError), or the wrong port.
    """
    postfix = postfix_front_door
    upstream = Address("127.0.0.1", postfix.proxy_port)
    proxy = await start_proxy(nursery, upstream, upstream_proxy_protocol=version)
    label = subject(f"proxy {version} {source}")
    through = await converse(proxy, source, label, pipelined=True)
    assert through.answers == expected_for(source)

    port = through.source.port
    assert await logged(postfix, rf"{through.queue_id}: client=unknown\[{re.escape(source)}\]:{port}$")
    assert f"(unknown [{source}])" in await delivered_from(postfix, label)


@pytest.mark.parametrize("claimed", [INSIDE_MYNETWORKS, OUTSIDE_MYNETWORKS])
async def test_postfix_judges_the_header_not_the_socket(postfix_front_door, claimed):
    """The control for the PROXY tests: straight at that listener from 127.0.0.2, a
    hand-written v1 header decides. Were pipeproxy to name itself (127.0.0.1), the
    outside client would relay; the answers are the ones ``expected_for`` predicts.

    Fails if Postfix judged the socket's address instead of the header's.
    """
    postfix = postfix_front_door
    header = v1_header(Address(claimed, 40000), postfix.proxy_port)
    straight = await converse(
        Address("127.0.0.1", postfix.proxy_port), OUTSIDE_MYNETWORKS, subject("header"), pipelined=False,
        header=header,
    )
    assert straight.answers == expected_for(claimed)


@pytest.mark.parametrize(
    ("source", "claimed", "xclient"),
    [
        (OUTSIDE_MYNETWORKS, INSIDE_MYNETWORKS, "auto"),
        (INSIDE_MYNETWORKS, OUTSIDE_MYNETWORKS, "auto"),
        (OUTSIDE_MYNETWORKS, INSIDE_MYNETWORKS, "off"),
    ],
)
async def test_a_clients_own_xclient_is_refused_and_changes_nothing(
    nursery, postfix_front_door, source, claimed, xclient
):
    """A client that says ``XCLIENT ADDR=<claimed>`` through pipeproxy gets 550 5.7.0 and
    stays who it was: what it may relay, and the address and port Postfix logs, are those
    of ``source`` (or of pipeproxy, with ``xclient="off"``).

    Straight at Postfix the 127.0.0.1 client is allowed XCLIENT (220) and becomes
    127.0.0.2, which may not relay: that is what a relayed command would do. Fails if
    pipeproxy relayed the command in the second or third case. In the first it cannot
    fail that way: after pipeproxy's own XCLIENT Postfix judges any further XCLIENT by
    the address it was given, 127.0.0.2, and refuses it itself.
    """
    postfix = postfix_front_door
    straight = await converse(
        Address("127.0.0.1", postfix.port), source, subject("own xclient straight"), pipelined=False,
        claim=claimed,
    )
    if source == INSIDE_MYNETWORKS:
        assert straight.answers == ["220 legacy.test", *expected_for(claimed)]
    else:
        assert straight.answers == ["550 5.7.0", *expected_for(source)]

    proxy = await start_proxy(nursery, Address("127.0.0.1", postfix.port), xclient=xclient)
    through = await converse(proxy, source, subject("own xclient"), pipelined=True, claim=claimed)
    seen_as = source if xclient == "auto" else INSIDE_MYNETWORKS
    assert through.answers == ["550 5.7.0", *expected_for(seen_as)]
    if xclient == "auto":
        pattern = rf"{through.queue_id}: client=unknown\[{re.escape(source)}\]:{through.source.port}$"
        assert await logged(postfix, pattern)


async def test_swaks_from_outside_mynetworks_cannot_relay_through_pipeproxy(pipeproxy_process, postfix_front_door):
    """swaks, pipelining from 127.0.0.2 through a pipeproxy process: the RCPT to another
    domain is refused, the one to legacy.test delivered, and pipeproxy logs the XCLIENT
    attributes it sent: those Postfix offers, less REVERSE_NAME and LOGIN.

    Fails as the XCLIENT test above does, or if swaks did not pipeline.
    """
    if shutil.which("swaks") is None:
        pytest.fail("swaks is not installed: run .ci/setup")
    postfix = postfix_front_door
    proxy = await pipeproxy_process(Address("127.0.0.1", postfix.port))
    label = subject("swaks")
    result = await trio.run_process(
        ["swaks", "--server", "127.0.0.1", "--port", str(proxy.address.port), "--local-interface",
         OUTSIDE_MYNETWORKS, "--pipeline", "--helo", "client.test", "--from", SENDER, "--to", f"{OUTSIDE},{INSIDE}",
         "--header", f"Subject: {label}"],
        stdin=b"", capture_stdout=True, capture_stderr=True, check=False,
    )
    transcript = result.stdout.decode() + result.stderr.decode()
    lines = transcript.splitlines()
    assert any(line.startswith(f"<** {RELAY_DENIED}") and "Relay access denied" in line for line in lines), transcript
    assert lines.index(" -> DATA") < next(i for i, line in enumerate(lines) if "250 2.1.0" in line), transcript
    assert f"(unknown [{OUTSIDE_MYNETWORKS}])" in await delivered_from(postfix, label)
    sent = await proxy.log.until("xclient sent")
    assert sent["attributes"] == ["NAME", "ADDR", "PORT", "PROTO", "HELO", "DESTADDR", "DESTPORT"]
