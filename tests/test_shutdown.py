"""Stopping while one client is stuck: the others are told at once, and the grace period
runs from the moment shutdown is asked for, not from when the stuck client gets round
to it.

A client is made stuck for real: it never reads while pipeproxy has replies for it, over
sockets with small buffers, so pipeproxy's write to it blocks (until the client_idle
timeout). Times are trio's autojump clock, so nothing here waits in real time.
"""

from __future__ import annotations

import socket

import trio

from pipeproxy.core.config import Address, Config
from pipeproxy.demo.legacy_mta import LegacyMTA
from pipeproxy.shell.server import FINAL_CLOSE_TIMEOUT, Server

from peers import LOCALHOST, Peer, start_legacy

SHUTTING_DOWN = b"421 4.3.2 Service shutting down, closing connection\r\n"
GRACE = 30.0
SMALL_BUFFER = 4096
# Replies to this many EHLOs (about 90 octets each) overflow both small buffers.
EHLOS = 2000


async def small_buffer_listener() -> trio.SocketListener:
    # Accepted sockets inherit the listener's send buffer: pipeproxy's writes to a
    # client block after a few kilobytes instead of several megabytes.
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    await sock.bind((LOCALHOST, 0))
    sock.listen()
    return trio.SocketListener(sock)


async def connect_stuck_client(address: Address) -> trio.SocketStream:
    """A client that pipelines many EHLOs and never reads a reply."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    await sock.connect(tuple(address))
    stream = trio.SocketStream(sock)
    await stream.send_all(b"EHLO stuck.test\r\n" * EHLOS)
    return stream


async def test_a_stuck_client_delays_neither_the_others_421_nor_the_end_of_the_grace_period(nursery, autojump_clock):
    mta = LegacyMTA()
    upstream = await start_legacy(nursery, mta)
    server = Server(Config(listen=Address(LOCALHOST, 0), upstream=upstream))
    listener = await small_buffer_listener()
    await nursery.start(server.serve, [listener])
    address = Address(LOCALHOST, listener.socket.getsockname()[1])

    stuck = await connect_stuck_client(address)
    idle = await Peer.connect(address)
    assert (await idle.reply()).code == 220
    # The autojump clock only moves when every task waits: pipeproxy is then blocked
    # writing to the stuck client, holding that session's actions behind the write.
    await trio.sleep(1)
    assert len(server.connections) == 2 and len(mta.commands) < EHLOS, "the client is not stuck"

    started = trio.current_time()
    stopped = trio.Event()

    async def shutdown() -> None:
        await server.shutdown(grace=GRACE)
        stopped.set()

    nursery.start_soon(shutdown)
    said = await idle.rest()
    # Told one after another, the idle session waited for the stuck one's drain, that
    # is for the stuck write's client_idle timeout (300 s), far past the grace period.
    assert trio.current_time() - started < GRACE, "the idle session's 421 waited for the stuck session"
    assert said == SHUTTING_DOWN
    await stopped.wait()
    assert trio.current_time() - started <= GRACE + FINAL_CLOSE_TIMEOUT, "the grace period started late"
    await stuck.aclose()
