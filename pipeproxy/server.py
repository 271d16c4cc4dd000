"""Listening: accept client connections and give each its own proxied session.

A failure inside one session is logged and ends that session only; the listener goes on.
Past ``max_sessions`` a new client gets 421 at once and is closed.
"""

from __future__ import annotations

import structlog
import trio

from .config import Address, Config
from .proxy import proxy_connection
from .wire import reply

# Connections can arrive in bursts (PEERS.md: socat's backlog of 5 dropped SYNs);
# trio caps this at the system's somaxconn.
BACKLOG = 4096
TOO_MANY_SESSIONS = reply(421, "4.7.0 Error: too many sessions, try again later")
REFUSAL_TIMEOUT = 5.0


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

    active = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal active
        if active >= config.max_sessions:
            await refuse(stream)
            return
        active += 1
        try:
            await proxy_connection(stream, config)
        except Exception:
            log.exception("session failed")
        finally:
            active -= 1

    async def refuse(stream: trio.SocketStream) -> None:
        # At once, not a hang: the client can try again or go to another MX.
        log.warning("session refused: too many sessions", max_sessions=config.max_sessions)
        with trio.move_on_after(REFUSAL_TIMEOUT):
            try:
                await stream.send_all(TOO_MANY_SESSIONS)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await stream.aclose()

    task_status.started(listeners)
    await trio.serve_listeners(handle, listeners)
