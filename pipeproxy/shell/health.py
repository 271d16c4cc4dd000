"""A health endpoint that checks pipeproxy itself, and the client that asks it.

Checking health through the SMTP port would open an upstream session every time, so
pipeproxy answers on a port of its own (``--health-listen``): a minimal HTTP/1.0 server
that reads one request and answers ``200 ok`` while serving, ``503 draining`` once
stopping, and closes. ``pipeproxy health`` sends ``GET /health`` with CRLF line ends
(never a bare LF) and exits 0 on 200, 1 otherwise, so it can be a container HEALTHCHECK;
Kubernetes can use an httpGet probe on the same port.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable

import trio

from ..core.config import Address

MAX_REQUEST = 4096
REQUEST_TIMEOUT = 5.0


def response(status: str, body: str) -> bytes:
    return (
        f"HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body) + 2}\r\n"
        f"Connection: close\r\n\r\n{body}\r\n"
    ).encode()


async def serve_health(
    listeners: list[trio.SocketListener],
    status: Callable[[], tuple[bool, str]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer health checks on ``listeners``; ``status()`` gives (healthy, text)."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            with trio.move_on_after(REQUEST_TIMEOUT):
                while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST:
                    data = await stream.receive_some(MAX_REQUEST)
                    if not data:
                        break
                    request += data
            healthy, text = status()
            # A checker that hung up early has its answer already: nobody to tell.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(response("200 OK" if healthy else "503 Service Unavailable", text))

    task_status.started()
    await trio.serve_listeners(handle, listeners)


def check(address: Address, timeout: float = REQUEST_TIMEOUT) -> tuple[bool, str]:
    """Ask the health endpoint; (healthy, what it said or what went wrong)."""
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout) as sock:
            sock.sendall(f"GET /health HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
            answer = b""
            while data := sock.recv(4096):
                answer += data
    except OSError as error:
        return False, f"cannot reach {address}: {error}"
    status_line = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    return status_line.split(" ")[1:2] == ["200"], status_line


def probe(address: Address) -> int:
    """``pipeproxy health``: ask, print the answer, and give the exit status (0: healthy)."""
    # An endpoint listening on every address is asked on loopback.
    if address.host in ("0.0.0.0", "::"):
        address = Address("127.0.0.1" if address.host == "0.0.0.0" else "::1", address.port)
    healthy, said = check(address)
    print(said)
    return 0 if healthy else 1
