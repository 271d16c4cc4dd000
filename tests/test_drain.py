"""Stopping gracefully: drain in-process and on SIGTERM, and several workers on one port."""

from __future__ import annotations

import pytest
import trio

from pipeproxy.core.config import Address, Config
from pipeproxy.demo.client import envelope_lines
from pipeproxy.demo.legacy_mta import LegacyMTA
from pipeproxy.shell.server import Server

from peers import LOCALHOST, Peer, open_session, start_legacy

SHUTTING_DOWN = b"421 4.3.2 Service shutting down, closing connection\r\n"


async def start_server(nursery, upstream: Address) -> tuple[Server, Address]:
    server = Server(Config(listen=Address(LOCALHOST, 0), upstream=upstream))
    [listener] = await nursery.start(server.serve)
    return server, Address(LOCALHOST, listener.socket.getsockname()[1])


async def into_data(address: Address) -> Peer:
    client = await open_session(address)
    await client.send(b"".join(envelope_lines("s@client.test", ["r@legacy.test"])))
    assert [r.code for r in await client.replies(3)] == [250, 250, 354]
    return client


async def test_drain_finishes_the_message_in_flight_closes_idle_sessions_and_refuses_new_ones(nursery):
    mta = LegacyMTA(reply_delay=0.002)
    server, address = await start_server(nursery, await start_legacy(nursery, mta))
    busy = await into_data(address)
    await busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
    idle = await Peer.connect(address)
    await idle.reply()
    stopped = trio.Event()

    async def shutdown():
        await server.shutdown(grace=30)
        stopped.set()

    nursery.start_soon(shutdown)
    assert await idle.rest() == SHUTTING_DOWN
    with pytest.raises(OSError):
        await trio.open_tcp_stream(*address)
    await busy.send(b"second half\r\n.\r\n")
    assert await busy.rest() == b"250 2.0.0 Ok: queued\r\n" + SHUTTING_DOWN
    await stopped.wait()
    [message] = mta.messages
    assert message.content == b"Subject: in flight\r\n\r\nfirst half\r\nsecond half\r\n"


async def test_after_the_grace_period_unfinished_messages_get_421_and_are_not_delivered(nursery, autojump_clock):
    mta = LegacyMTA()
    server, address = await start_server(nursery, await start_legacy(nursery, mta))
    slow = await into_data(address)
    await slow.send(b"Subject: never finished\r\n")
    started = trio.current_time()
    await server.shutdown(grace=30)
    assert trio.current_time() - started >= 30
    assert await slow.rest() == SHUTTING_DOWN
    assert mta.messages == []


async def test_sigterm_drains_a_process_and_it_exits_0(nursery, pipeproxy_process):
    """A message in DATA when SIGTERM arrives is delivered whole; the process then exits 0."""
    mta = LegacyMTA(reply_delay=0.002)
    proxy = await pipeproxy_process(await start_legacy(nursery, mta))
    client = await into_data(proxy.address)
    await client.send(b"Subject: sigterm\r\n\r\nbefore\r\n")
    proxy.terminate()
    await proxy.log.until("draining")
    await client.send(b"after\r\n.\r\n")
    assert await client.rest() == b"250 2.0.0 Ok: queued\r\n" + SHUTTING_DOWN
    await proxy.log.until("stopped")
    assert await proxy.stop() == 0
    assert mta.messages[0].content == b"Subject: sigterm\r\n\r\nbefore\r\nafter\r\n"


async def test_two_workers_share_the_port_and_both_serve(nursery, pipeproxy_process):
    mta = LegacyMTA()
    proxy = await pipeproxy_process(await start_legacy(nursery, mta), PIPEPROXY_WORKERS="2")
    [started] = proxy.log.events("workers started")
    assert len(started["workers"]) == 2
    await proxy.log.until("listening")  # the second worker's; start() waited for the first
    for _ in range(40):  # the kernel spreads connections by their addresses' hash
        client = await Peer.connect(proxy.address)
        await client.reply()
        await client.send(b"QUIT\r\n")
        await client.rest()
        await client.aclose()
    with trio.fail_after(30):
        while len(proxy.log.events("session closed")) < 40:
            await proxy.log.until("session closed")
    assert await proxy.stop() == 0
    assert {line["worker"] for line in proxy.log.events("session open")} == {0, 1}
