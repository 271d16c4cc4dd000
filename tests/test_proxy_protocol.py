"""PROXY protocol v1 and v2 on the listening side: good headers, bad ones, over sockets."""

from __future__ import annotations

import socket
import struct

import pytest
import structlog

from pipeproxy.core import proxy_protocol
from pipeproxy.core.config import Address
from pipeproxy.demo.legacy_mta import LegacyMTA

from peers import Peer, start_legacy, start_proxy


def v2(command: int, family: int, payload: bytes) -> bytes:
    return proxy_protocol.V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, len(payload)) + payload


V2_IPV4 = v2(1, 0x11, socket.inet_pton(socket.AF_INET, "203.0.113.7") + socket.inet_pton(socket.AF_INET, "10.0.0.1")
             + struct.pack("!HH", 4242, 2525))
V2_IPV6 = v2(
    1, 0x21,
    socket.inet_pton(socket.AF_INET6, "2001:db8::7") + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    + struct.pack("!HH", 4242, 2525),
)


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 4242 2525\r\n", Address("203.0.113.7", 4242)),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 4242 2525\r\n", Address("2001:db8::7", 4242)),
        (b"PROXY UNKNOWN\r\n", None),
        (V2_IPV4, Address("203.0.113.7", 4242)),
        (V2_IPV6, Address("2001:db8::7", 4242)),
        (v2(0, 0x00, b""), None),
    ],
)
def test_good_headers_whole_and_cut_anywhere(header, client):
    assert proxy_protocol.parse(header + b"EHLO x\r\n") == (client, len(header))
    for cut in range(len(header)):
        assert proxy_protocol.parse(header[:cut]) is None


@pytest.mark.parametrize(
    "data",
    [
        b"EHLO client.test\r\n",
        b"PROXY TCP4 203.0.113.7 10.0.0.1 4242\r\n",
        b"PROXY TCP4 2001:db8::7 10.0.0.1 4242 2525\r\n",
        b"PROXY TCP4 nonsense 10.0.0.1 4242 2525\r\n",
        b"PROXY TCP4 203.0.113.7 10.0.0.1 99999 2525\r\n",
        b"PROXY " + b"x" * 200,
        proxy_protocol.V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),
        proxy_protocol.V2_SIGNATURE + b"\x21\x11\xff\xff",
        v2(1, 0x31, bytes(216)),
    ],
)
def test_bad_headers_are_errors(data):
    with pytest.raises(ValueError):
        proxy_protocol.parse(data)


@pytest.mark.parametrize("header", [b"PROXY TCP4 203.0.113.7 10.0.0.1 4242 2525\r\n", V2_IPV4], ids=["v1", "v2"])
async def test_the_real_client_is_logged_and_the_session_works(nursery, header):
    mta = LegacyMTA()
    proxy = await start_proxy(nursery, await start_legacy(nursery, mta), proxy_protocol=True)
    with structlog.testing.capture_logs() as logs:
        client = await Peer.connect(proxy)
        await client.send(header + b"EHLO client.test\r\n")
        assert [r.code for r in await client.replies(2)] == [220, 250]
        await client.send(b"QUIT\r\n")
        assert (await client.reply()).code == 221
        await client.rest()
    opened = [line for line in logs if line["event"] == "session open"]
    assert opened[0]["client"] == "203.0.113.7:4242"


async def test_a_connection_without_a_valid_header_is_closed_and_logged(nursery):
    mta = LegacyMTA()
    proxy = await start_proxy(nursery, await start_legacy(nursery, mta), proxy_protocol=True)
    with structlog.testing.capture_logs() as logs:
        client = await Peer.connect(proxy)
        await client.send(b"EHLO client.test\r\n")
        assert await client.rest() == b""
    assert [line["event"] for line in logs] == ["bad PROXY header, closing"]
    assert mta.connections == 0, "no upstream session for a client that failed the header"
