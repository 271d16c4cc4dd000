"""A load generator: concurrent SMTP sessions sending messages, timing every one.

Each of ``--concurrency`` workers sends messages to ``--recipients`` recipients until
``--messages`` have been sent in all, either all in one persistent session per worker
or one connection per message. It pipelines when the server advertises PIPELINING, as
real clients do. It prints one JSON line: messages per second and per-message latency
(p50, p99; a persistent session's connection set-up is not part of any message, a
fresh connection's is).

    python benchmarks/load.py --server 127.0.0.1:2525 --concurrency 20 --messages 2000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import trio

from pipeproxy.core.config import Address
from pipeproxy.demo.client import SMTPClient

CONTENT = b"From: load@client.test\r\nSubject: load\r\n\r\n" + b"A line of a benchmark message body.\r\n" * 50


async def open_session(server: Address) -> tuple[SMTPClient, bool]:
    client = await SMTPClient.connect(*server)
    await client.read_reply()
    [ehlo] = await client.exchange(b"EHLO load.test\r\n")
    return client, "PIPELINING" in (line.upper() for line in ehlo.lines[1:])


async def worker(server: Address, recipients: list[str], quota, persistent: bool, latencies: list[float]) -> None:
    session = None
    while quota():
        started = time.perf_counter()
        if session is None:
            session = await open_session(server)
        client, pipelining = session
        replies = await client.send_mail("load@client.test", recipients, CONTENT, pipelining=pipelining)
        if replies[-1].code != 250:
            raise RuntimeError(f"message refused: {replies[-1]}")
        if not persistent:
            await client.exchange(b"QUIT\r\n")
            await client.aclose()
            session = None
        latencies.append(time.perf_counter() - started)
    if session is not None:
        await session[0].exchange(b"QUIT\r\n")
        await session[0].aclose()


async def run(server: Address, concurrency: int, messages: int, recipients: int, persistent: bool) -> dict:
    remaining = messages

    def quota() -> bool:
        nonlocal remaining
        remaining -= 1
        return remaining >= 0

    rcpts = [f"r{i}@legacy.test" for i in range(recipients)]
    latencies: list[float] = []
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker, server, rcpts, quota, persistent, latencies)
    elapsed = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "messages": len(latencies),
        "seconds": elapsed,
        "per_second": len(latencies) / elapsed,
        "p50_ms": quantiles[49] * 1000,
        "p99_ms": quantiles[98] * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", type=Address.parse, required=True)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--recipients", type=int, default=5)
    parser.add_argument("--per-message-connections", action="store_true")
    args = parser.parse_args()
    persistent = not args.per_message_connections
    result = trio.run(run, args.server, args.concurrency, args.messages, args.recipients, persistent)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
