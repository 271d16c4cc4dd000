"""The health endpoint that checks pipeproxy itself, and the client that asks it.

Checking health through the SMTP port would open an upstream session every time, so
pipeproxy answers on a port of its own (``--health-listen``): a minimal HTTP/1.0 server
that reads one request, answers it and closes.

- ``GET /health``: ``200 ok sessions=N`` while serving, ``503 draining`` once stopping.
  ``pipeproxy health`` asks it (CRLF line ends, never a bare LF) and exits 0 on 200, so it
  can be a container HEALTHCHECK.
- ``GET /livez``: ``200`` while the process serves, draining included (a Kubernetes
  liveness probe must not kill a pod that is finishing its mail).
- ``GET /readyz``: ``200`` when not draining and the upstream answered a greeting
  recently; ``503`` otherwise (a Kubernetes readiness probe). The greeting of any real
  session counts; only when none came recently does pipeproxy open a connection of its
  own, read the greeting, say QUIT, and only once every ``PROBE_INTERVAL`` seconds.
- ``GET /metrics``: Prometheus text format.

Other paths get 404, other methods 405. ``/health`` and ``/livez`` never open an
upstream session. With ``--workers`` the parent answers, for every worker.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from ..core import proxy_protocol
from ..core.config import Address
from ..core.wire import ReplyReader

MAX_REQUEST = 4096
REQUEST_TIMEOUT = 5.0
# /readyz: a greeting this recent (seconds) means the upstream is alive; an older one
# gets a check of its own, at most once every PROBE_INTERVAL, each within PROBE_TIMEOUT.
FRESH = 10.0
PROBE_INTERVAL = 5.0
PROBE_TIMEOUT = 3.0
GET_ONLY = ("GET", "HEAD")


@dataclass
class Answer:
    status: str
    body: str
    content_type: str = "text/plain"
    headers: str = ""


def response(status: str, body: str, content_type: str = "text/plain", headers: str = "") -> bytes:
    payload = body.encode() + b"\r\n" if content_type == "text/plain" else body.encode()
    return (
        f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(payload)}\r\n"
        f"{headers}Connection: close\r\n\r\n"
    ).encode() + payload


class Readiness:
    """Whether the upstream greeted recently: from real sessions (``alive_at``, Unix time
    of the last 220 greeting, every worker's), else from a check of its own."""

    def __init__(self, upstream: Address, alive_at: Callable[[], float], proxy_header: str = "off",
                 clock: Callable[[], float] = time.time) -> None:
        self.upstream = upstream
        self.alive_at = alive_at
        self.proxy_header = proxy_header
        self.clock = clock
        self.probes = 0  # checks of its own so far
        self._probed_at = float("-inf")
        self._probe_alive_at = float("-inf")
        self._failure = "not checked yet"
        self._lock = trio.Lock()

    async def check(self) -> tuple[bool, str]:
        async with self._lock:  # concurrent requests share one check
            if self._fresh():
                return True, "ready"
            if self.clock() - self._probed_at >= PROBE_INTERVAL:
                self._probed_at = self.clock()
                self.probes += 1
                try:
                    with trio.fail_after(PROBE_TIMEOUT):
                        await self._probe()
                    self._probe_alive_at = self.clock()
                    return True, "ready"
                except (OSError, trio.TooSlowError, ValueError, EOFError) as error:
                    self._failure = f"upstream {self.upstream}: {_say(error)}"
            return False, self._failure

    def _fresh(self) -> bool:
        return self.clock() - max(self.alive_at(), self._probe_alive_at) < FRESH

    async def _probe(self) -> None:
        stream = await trio.open_tcp_stream(*self.upstream)
        async with stream:
            if self.proxy_header != "off":  # a check, not a client: LOCAL / UNKNOWN
                await stream.send_all(proxy_protocol.header(self.proxy_header, Address("", 0), Address("", 0)))
            reader = ReplyReader()
            while (greeting := reader.next_reply()) is None:
                data = await stream.receive_some(4096)
                if not data:
                    raise EOFError("closed before its greeting")
                reader.feed(data)
            if greeting.code != 220:
                raise ValueError(f"greeted {greeting.code}")
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(b"QUIT\r\n")
            with trio.move_on_after(1):
                await stream.receive_some(4096)


def _say(error: BaseException) -> str:
    if isinstance(error, trio.TooSlowError):
        return f"no greeting within {PROBE_TIMEOUT:g} s"
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error)


@dataclass
class Endpoints:
    """What the endpoint asks the process: whether it is draining, how many sessions
    are open, the metrics text, and the upstream's readiness."""

    draining: Callable[[], bool]
    sessions: Callable[[], int]
    metrics: Callable[[], bytes]
    readiness: Readiness | None = None

    async def answer(self, request: bytes) -> Answer:
        try:
            method, target, _ = request.split(b"\r\n", 1)[0].decode("ascii").split(" ")
        except (UnicodeDecodeError, ValueError):
            return Answer("400 Bad Request", "bad request")
        path = target.split("?", 1)[0]
        routes: dict[str, Callable[[], Awaitable[Answer]]] = {
            "/health": self._health, "/livez": self._livez, "/readyz": self._readyz, "/metrics": self._metrics,
        }
        if path not in routes:
            return Answer("404 Not Found", "not found")
        if method not in GET_ONLY:
            return Answer("405 Method Not Allowed", "method not allowed", headers="Allow: GET, HEAD\r\n")
        return await routes[path]()

    async def _health(self) -> Answer:
        if self.draining():
            return Answer("503 Service Unavailable", f"draining sessions={self.sessions()}")
        return Answer("200 OK", f"ok sessions={self.sessions()}")

    async def _livez(self) -> Answer:
        return Answer("200 OK", "alive")

    async def _readyz(self) -> Answer:
        if self.draining():
            return Answer("503 Service Unavailable", "draining")
        ready, said = await self.readiness.check() if self.readiness else (True, "ready")
        return Answer("200 OK" if ready else "503 Service Unavailable", said)

    async def _metrics(self) -> Answer:
        # The collection reads files (with workers): off the event loop.
        text = await trio.to_thread.run_sync(self.metrics)
        return Answer("200 OK", text.decode(), content_type="text/plain; version=0.0.4; charset=utf-8")


async def serve_health(
    listeners: list[trio.SocketListener],
    endpoints: Endpoints,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer health checks on ``listeners``."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            with trio.move_on_after(REQUEST_TIMEOUT):
                while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST:
                    data = await stream.receive_some(MAX_REQUEST)
                    if not data:
                        break
                    request += data
            answer = await endpoints.answer(request)
            data = response(answer.status, answer.body, answer.content_type, answer.headers)
            if request.startswith(b"HEAD "):
                data = data.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
            # A checker that hung up early has its answer already: nobody to tell.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(data)

    task_status.started()
    await trio.serve_listeners(handle, listeners)


def get(address: Address, path: str = "/health", method: str = "GET",
        timeout: float = REQUEST_TIMEOUT) -> tuple[int, str]:
    """One request to the endpoint: (status code, body); OSError if it cannot be reached."""
    with socket.create_connection((address.host, address.port), timeout=timeout) as sock:
        sock.sendall(f"{method} {path} HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
        answer = b""
        while data := sock.recv(65536):
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode(errors="replace")


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
