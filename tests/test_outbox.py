"""The outbox: writes made at the end of the event loop's turn, in order, and every
failure told to the connection once. Over real socket pairs."""

from __future__ import annotations

import socket

import trio
import trio.testing

from pipeproxy.shell import outbox
from pipeproxy.shell.outbox import Channel


def _pair() -> tuple[trio.SocketStream, socket.socket]:
    """pipeproxy's end as a trio stream, the peer's as a plain non-blocking socket."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    return trio.SocketStream(trio.socket.from_stdlib_socket(ours)), theirs


class Asks:
    """A channel's ``unsettled`` callback: how often it asked to be settled."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def _received(peer: socket.socket) -> bytes:
    try:
        return peer.recv(1 << 20)
    except BlockingIOError:
        return b""


async def test_what_a_turn_pushes_is_written_when_the_turn_ends_in_the_order_pushed():
    stream, peer = _pair()
    channel = Channel(stream, asks := Asks())
    channel.push(b"250 first\r\n")
    channel.push(b"250 second\r\n")
    assert _received(peer) == b""  # nothing yet: the turn goes on
    await trio.lowlevel.checkpoint()  # the turn ends
    assert _received(peer) == b"250 first\r\n250 second\r\n"
    assert channel.settled
    await trio.lowlevel.checkpoint()
    assert asks.count == 0  # all written: nobody is asked to settle it
    assert await channel.settle(1.0) is None


async def test_writes_from_many_channels_in_one_turn_all_go_at_its_end():
    pairs = [_pair() for _ in range(5)]
    channels = [Channel(stream, Asks()) for stream, _ in pairs]
    for number, channel in enumerate(channels):
        channel.push(b"reply %d\r\n" % number)
    assert [_received(peer) for _, peer in pairs] == [b""] * 5
    await trio.lowlevel.checkpoint()
    assert [_received(peer) for _, peer in pairs] == [b"reply %d\r\n" % number for number in range(5)]


async def test_what_the_socket_does_not_take_waits_in_order_and_settling_bounds_it_in_time(autojump_clock):
    stream, peer = _pair()
    channel = Channel(stream, asks := Asks())
    big = bytes(range(256)) * 40_000  # more than any socket buffer takes at once
    channel.push(big)
    channel.push(b"after")
    await trio.lowlevel.checkpoint()
    assert not channel.settled  # the rest waits for the connection to settle it
    await trio.lowlevel.checkpoint()
    assert asks.count == 1  # and the connection is asked to, once
    assert await channel.settle(5.0) is True  # the peer never reads: the time runs out
    channel.push(b"more")  # after a failure nothing more is written
    received = b""
    while chunk := _received(peer):
        received += chunk
    assert big.startswith(received) and len(received) < len(big)
    assert b"after" not in received and b"more" not in received


async def test_settling_writes_the_rest_once_the_peer_reads_again():
    stream, peer = _pair()
    channel = Channel(stream, Asks())
    big = b"x" * 3_000_000
    channel.push(big)
    channel.push(b"END")
    await trio.lowlevel.checkpoint()
    received = bytearray()

    async def read_all() -> None:
        while not received.endswith(b"END"):
            await trio.lowlevel.wait_readable(peer)
            received.extend(_received(peer))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        assert await channel.settle(60.0) is None
    assert received == big + b"END"


async def test_a_peer_that_is_gone_is_told_once():
    stream, peer = _pair()
    peer.close()
    channel = Channel(stream, asks := Asks())
    channel.push(b"250 ok\r\n" * 100_000)
    await trio.lowlevel.checkpoint()  # the write at the end of the turn fails
    assert not channel.settled
    await trio.lowlevel.checkpoint()
    assert asks.count == 1  # the connection is asked to settle it, and hears of the failure
    assert await channel.settle(1.0) is False
    assert channel.settled
    assert await channel.settle(1.0) is None


async def test_a_bug_in_one_write_leaves_the_outbox_working_for_every_other(monkeypatch):
    """trio disables, for the whole process, an instrument that raises: a bug in one
    channel's write must stay that channel's, its bytes kept for its own settling."""
    broken_stream, broken_peer = _pair()
    broken = Channel(broken_stream, broken_asks := Asks())
    real_write = outbox.os.write

    def write(fd: int, data: bytes) -> int:
        if fd == broken_stream.socket.fileno():
            raise ZeroDivisionError("a bug")
        return real_write(fd, data)

    monkeypatch.setattr(outbox.os, "write", write)
    broken.push(b"kept\r\n")
    await trio.lowlevel.checkpoint()
    monkeypatch.undo()
    stream, peer = _pair()
    Channel(stream, Asks()).push(b"250 ok\r\n")
    await trio.lowlevel.checkpoint()  # a later turn: the outbox still writes at its end
    assert _received(peer) == b"250 ok\r\n"
    assert not broken.settled
    assert broken_asks.count == 1  # its connection settles it
    assert await broken.settle(1.0) is None
    assert _received(broken_peer) == b"kept\r\n"


async def test_a_stream_that_is_not_a_plain_socket_asks_to_be_settled_at_its_first_push():
    """TLS streams are written only by settling: the outbox cannot write them."""
    ours, theirs = trio.testing.memory_stream_pair()
    channel = Channel(ours, asks := Asks())
    channel.push(b"250 first\r\n")
    channel.push(b"250 second\r\n")
    assert asks.count == 1  # once for what waits, not once a push
    await trio.lowlevel.checkpoint()
    assert not channel.settled  # the end of the turn wrote nothing
    assert await channel.settle(1.0) is None
    assert await theirs.receive_some() == b"250 first\r\n250 second\r\n"
    channel.push(b"250 third\r\n")
    assert asks.count == 2
