"""A user-space slow link: a TCP relay that delays every chunk by a fixed time each way.

This kernel has no netem, so the benchmarks put this between client and server. Each
direction has a reader that stamps every chunk with its arrival time and a writer that
sends it once the delay has passed, in order; sockets keep trio's TCP_NODELAY. A round
trip through it costs twice the one-way delay plus what the relay itself adds, so the
benchmark measures the real round trip with an SMTP NOOP ping-pong before using it.

    python benchmarks/delay_relay.py --listen 127.0.0.1:2600 --target 127.0.0.1:2525 --delay 0.05
"""

from __future__ import annotations

import argparse
import contextlib
import math

import trio

from pipeproxy.core.config import Address


async def _pipe(source: trio.SocketStream, sink: trio.SocketStream, delay: float) -> None:
    send, receive = trio.open_memory_channel[tuple[float, bytes]](math.inf)

    async def read() -> None:
        async with send:
            try:
                while data := await source.receive_some(65536):
                    await send.send((trio.current_time() + delay, data))
            except trio.BrokenResourceError:
                pass

    async def write() -> None:
        async with receive:
            async for due, data in receive:
                await trio.sleep_until(due)
                await sink.send_all(data)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await sink.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        nursery.start_soon(write)


async def serve(listen: Address, target: Address, delay: float, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async def handle(client: trio.SocketStream) -> None:
        async with client:
            try:
                server = await trio.open_tcp_stream(*target)
            except OSError:
                return
            async with server:
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_pipe, client, server, delay)
                        nursery.start_soon(_pipe, server, client, delay)
                except* (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    await trio.serve_tcp(handle, listen.port, host=listen.host, backlog=1024, task_status=task_status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=Address.parse, required=True)
    parser.add_argument("--target", type=Address.parse, required=True)
    parser.add_argument("--delay", type=float, default=0.05, help="one-way delay in seconds (default 0.05)")
    args = parser.parse_args()
    trio.run(serve, args.listen, args.target, args.delay)


if __name__ == "__main__":
    main()
