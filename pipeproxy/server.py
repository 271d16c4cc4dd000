"""Listening: accept client connections and give each its own proxied session.

A failure inside one session is logged and ends that session only; the listener goes on.
"""

from __future__ import annotations

import structlog
import trio

from .config import Address, Config
from .proxy import proxy_connection

# Connections can arrive in bursts (PEERS.md: socat's backlog of 5 dropped SYNs);
# trio caps this at the system's somaxconn.
BACKLOG = 4096


async def listen(address: Address) -> list[trio.SocketListener]:
    """The listening sockets for ``address``; OSError if it cannot be had."""
    return await trio.open_tcp_listeners(address.port, host=address.host, backlog=BACKLOG)


async def serve(
    config: Config,
    listeners: list[trio.SocketListener] | None = None,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Proxy every connection on ``listeners`` (default: ``config.listen``) to ``config.upstream``."""
    log = structlog.get_logger("pipeproxy.server")
    listeners = listeners or await listen(config.listen)
    addresses = [str(Address(*listener.socket.getsockname()[:2])) for listener in listeners]
    log.info("listening", addresses=addresses, upstream=str(config.upstream))

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await proxy_connection(stream, config)
        except Exception:
            log.exception("session failed")

    task_status.started(listeners)
    await trio.serve_listeners(handle, listeners)
