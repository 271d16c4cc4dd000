"""The door over real sockets: allow and deny lists, sessions per client, and the PROXY
header pipeproxy writes for an upstream that wants to know who the client is.

Clients bind their source address to 127.0.0.2 (any 127.0.0.0/8 address reaches a server
on 127.0.0.1) to be a second client; IPv6 runs on ::1.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest
import trio

from pipeproxy.core import proxy_protocol
from pipeproxy.core.config import Address, Config
from pipeproxy.shell.server import serve

from peers import Peer, start_proxy, start_upstream

ACCESS_DENIED = b"554 5.7.1 Error: access denied\r\n"


def networks(*texts: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(text) for text in texts)


class CountingUpstream:
    """An upstream that greets, answers 250 to everything, and counts its sessions."""

    def __init__(self) -> None:
        self.sessions = 0

    async def serve(self, peer: Peer) -> None:
        self.sessions += 1
        await peer.send(b"220 legacy.test\r\n")
        while line := await peer.line():
            await peer.send(b"221 Bye\r\n" if line == b"QUIT\r\n" else b"250 Ok\r\n")


async def connect(address: Address, source: str | None = None) -> Peer:
    stream = await trio.open_tcp_stream(address.host, address.port, local_address=source)
    return Peer(stream)


async def start_proxy_on(nursery: trio.Nursery, host: str, upstream: Address, **overrides: Any) -> Address:
    config = dataclasses.replace(Config(listen=Address(host, 0), upstream=upstream), **overrides)
    [listener] = await nursery.start(serve, config)
    return Address(host, listener.socket.getsockname()[1])


@pytest.mark.parametrize(
    ("rules", "refused", "welcome"),
    [
        ({"deny": networks("127.0.0.2/32")}, "127.0.0.2", "127.0.0.1"),
        ({"allow": networks("127.0.0.1/32")}, "127.0.0.2", "127.0.0.1"),
        ({"allow": networks("127.0.0.0/8"), "deny": networks("127.0.0.2/32")}, "127.0.0.2", "127.0.0.3"),
    ],
    ids=["deny", "allow", "deny-wins"],
)
async def test_a_refused_client_gets_554_at_connect_and_no_upstream_session(nursery, rules, refused, welcome):
    upstream = CountingUpstream()
    proxy = await start_proxy(nursery, await start_upstream(nursery, upstream.serve), **rules)
    outsider = await connect(proxy, refused)
    assert await outsider.rest() == ACCESS_DENIED
    assert upstream.sessions == 0, "a refused client must cost no upstream session"
    member = await connect(proxy, welcome)
    assert (await member.reply()).code == 220
    assert upstream.sessions == 1


async def test_ipv6_clients_are_judged_by_their_own_networks(nursery):
    upstream = await start_upstream(nursery, CountingUpstream().serve)
    denied = await start_proxy_on(nursery, "::1", upstream, deny=networks("::1/128"))
    assert await (await connect(denied)).rest() == ACCESS_DENIED
    outside = await start_proxy_on(nursery, "::1", upstream, allow=networks("2001:db8::/32", "127.0.0.0/8"))
    assert await (await connect(outside)).rest() == ACCESS_DENIED
    inside = await start_proxy_on(nursery, "::1", upstream, allow=networks("::1/128"))
    assert (await (await connect(inside)).reply()).code == 220


async def test_the_real_client_of_a_proxy_header_is_the_one_judged(nursery):
    """Behind a balancer every socket is the balancer's: the header's client decides."""
    upstream = await start_upstream(nursery, CountingUpstream().serve)
    proxy = await start_proxy(nursery, upstream, proxy_protocol=True, deny=networks("203.0.113.0/24"))
    spammer = await Peer.connect(proxy)
    await spammer.send(b"PROXY TCP4 203.0.113.7 10.0.0.1 4242 2525\r\n")
    assert await spammer.rest() == ACCESS_DENIED
    friend = await Peer.connect(proxy)
    await friend.send(b"PROXY TCP4 198.51.100.7 10.0.0.1 4242 2525\r\n")
    assert (await friend.reply()).code == 220


async def test_one_session_more_than_a_client_may_have_gets_421_and_others_still_come_in(nursery):
    upstream = CountingUpstream()
    proxy = await start_proxy(nursery, await start_upstream(nursery, upstream.serve), max_sessions_per_client=2)
    first, second = await connect(proxy, "127.0.0.2"), await connect(proxy, "127.0.0.2")
    for peer in (first, second):
        assert (await peer.reply()).code == 220
    third = await connect(proxy, "127.0.0.2")
    assert await third.rest() == b"421 4.7.0 Error: too many connections from your address, try again later\r\n"
    neighbour = await connect(proxy, "127.0.0.3")
    assert (await neighbour.reply()).code == 220
    assert upstream.sessions == 3
    await first.send(b"QUIT\r\n")
    assert (await first.reply()).code == 221
    await first.rest()
    with trio.fail_after(10):  # the slot frees when the session has ended
        while True:
            again = await connect(proxy, "127.0.0.2")
            if (await again.reply()).code == 220:
                break
            await trio.sleep(0.05)


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_the_upstream_proxy_header_names_the_real_client_first_on_the_connection(nursery, version):
    """Read back with pipeproxy's own parser, which the listening side uses; a real
    Postfix reading it is tested with the front door's Postfix tests."""
    seen: list[tuple[Address | None, bytes]] = []

    async def reads_a_header(peer: Peer) -> None:
        data = b""
        while (parsed := proxy_protocol.parse(data)) is None:
            data += await peer.stream.receive_some(4096)
        client, consumed = parsed
        seen.append((client, data[consumed:]))
        await peer.send(b"220 legacy.test\r\n")
        assert await peer.line() == b"QUIT\r\n"
        await peer.send(b"221 Bye\r\n")

    proxy = await start_proxy(nursery, await start_upstream(nursery, reads_a_header), upstream_proxy_protocol=version)
    client = await connect(proxy, "127.0.0.2")
    assert (await client.reply()).code == 220
    await client.send(b"QUIT\r\n")
    assert (await client.reply()).code == 221
    [(header_client, after)] = seen
    assert header_client is not None and header_client.host == "127.0.0.2"
    assert after == b"", "nothing but the header before the greeting"


@pytest.mark.parametrize(
    ("client", "server", "expected"),
    [
        (Address("192.0.2.7", 4000), Address("127.0.0.1", 2525), Address("192.0.2.7", 4000)),
        (Address("2001:db8::7", 4000), Address("::1", 25), Address("2001:db8::7", 4000)),
        (Address("::ffff:127.0.0.2", 4000), Address("::1", 25), Address("127.0.0.2", 4000)),
        (Address("192.0.2.7", 4000), Address("::1", 25), Address("192.0.2.7", 4000)),
        (Address("unknown", 0), Address("unknown", 0), None),
    ],
)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_every_header_pipeproxy_writes_reads_back_as_the_client(client, server, expected, version):
    header = proxy_protocol.header(version, client, server)
    assert proxy_protocol.parse(header + b"220 x\r\n") == (expected, len(header))

