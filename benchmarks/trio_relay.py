"""The floor for anything built on trio: a bare byte relay, nothing parsed.

Two tasks a connection, ``receive_some``/``send_all`` on ``SocketStream``, as the
simplest trio proxy would be written; ``benchmarks/run.py`` measures pipeproxy beside it.

    python benchmarks/trio_relay.py --listen 127.0.0.1:2526 --target 127.0.0.1:2525
"""

from __future__ import annotations

import argparse
from functools import partial

import trio

from pipeproxy.core.config import Address


async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
        await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def relay(target: Address, client: trio.SocketStream) -> None:
    async with client, await trio.open_tcp_stream(*target) as upstream, trio.open_nursery() as nursery:
        nursery.start_soon(pump, client, upstream)
        nursery.start_soon(pump, upstream, client)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=Address.parse, required=True)
    parser.add_argument("--target", type=Address.parse, required=True)
    args = parser.parse_args()
    handler = partial(relay, args.target)
    trio.run(partial(trio.serve_tcp, handler, args.listen.port, host=args.listen.host, backlog=4096))


if __name__ == "__main__":
    main()
