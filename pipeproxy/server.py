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


async def serve(config: Config, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on ``config.listen`` and proxy every connection to ``config.upstream``."""
    log = structlog.get_logger("pipeproxy.server")
    listeners = await trio.open_tcp_listeners(config.listen.port, host=config.listen.host, backlog=BACKLOG)
    addresses = [str(Address(*listener.socket.getsockname()[:2])) for listener in listeners]
    log.info("listening", addresses=addresses, upstream=str(config.upstream))

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await proxy_connection(stream, config)
        except Exception:
            log.exception("session failed")

    task_status.started(listeners)
    await trio.serve_listeners(handle, listeners)
