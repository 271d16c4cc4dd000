"""Bounded memory: a 50 MB message streams through a real pipeproxy process.

The proxy runs as its own process so its peak resident memory (VmHWM) can be read from
/proc before and after; the upstream here only counts what it receives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import trio
from peers import JsonLog, Peer, start_upstream

from pipeproxy.core.config import Address
from pipeproxy.demo.client import envelope_lines

MESSAGE_LINES = 50_000  # of 1,000 octets each: 50 MB
LINE = b"x" * 998 + b"\r\n"
# Generous against the 50 MB it would take to hold the message: buffers only.
MAX_GROWTH_KB = 16 * 1024


def peak_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


async def test_a_50_mb_message_does_not_grow_the_proxy_by_anything_like_50_mb(nursery):
    received = {"bytes": 0, "ended": False}

    async def counting_upstream(peer: Peer) -> None:
        await peer.send(b"220 legacy.test\r\n")
        for _ in range(4):  # HELO, MAIL, RCPT, DATA
            line = await peer.line()
            await peer.send(b"354 go\r\n" if line == b"DATA\r\n" else b"250 Ok\r\n")
        tail = b""
        while not received["ended"]:
            data = await peer.stream.receive_some(1 << 20)
            assert data, "proxy closed mid-message"
            received["bytes"] += len(data)
            received["ended"] = (tail + data)[-5:] == b"\r\n.\r\n"
            tail = data[-5:]
        await peer.send(b"250 Ok: queued\r\n")
        assert await peer.line() == b"QUIT\r\n"
        await peer.send(b"221 Bye\r\n")

    upstream = await start_upstream(nursery, counting_upstream)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PIPEPROXY_")}
    environ.update(PIPEPROXY_LISTEN="127.0.0.1:0", PIPEPROXY_UPSTREAM=str(upstream))
    process = await trio.lowlevel.open_process([sys.executable, "-m", "pipeproxy"], stdout=subprocess.PIPE, env=environ)
    try:
        listening = await JsonLog(process.stdout).until("listening")
        client = await Peer.connect(Address.parse(listening["addresses"][0]))
        await client.reply()
        await client.send(b"HELO client.test\r\n")
        await client.reply()
        await client.send(b"".join(envelope_lines("s@client.test", ["big@legacy.test"])))
        assert [r.code for r in await client.replies(3)] == [250, 250, 354]
        baseline = peak_rss_kb(process.pid)
        block = LINE * 1000
        for _ in range(MESSAGE_LINES // 1000):
            await client.send(block)
        await client.send(b".\r\n")
        assert (await client.reply()).code == 250
        growth = peak_rss_kb(process.pid) - baseline
        await client.send(b"QUIT\r\n")
        await client.reply()
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            await process.wait()
    assert received["bytes"] == len(LINE) * MESSAGE_LINES + 3
    print(f"peak resident memory grew by {growth} kB while 50 MB streamed through")
    assert growth < MAX_GROWTH_KB
