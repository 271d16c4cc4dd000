"""Real-socket helpers: start pipeproxy and scripted peers on 127.0.0.1, talk to them.

``Peer`` wraps one stream with line and reply reading; ``open_session`` gets one through
pipeproxy's greeting and EHLO. A scripted upstream is any async function of a Peer,
served on a fresh port by ``start_upstream``; it may misbehave on purpose (drop
mid-DATA, never greet). ``ProxyProcess`` is a real ``python -m pipeproxy`` with its JSON
log and its /proc figures. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from pipeproxy.core.config import Address, Config
from pipeproxy.core.wire import Reply, ReplyReader
from pipeproxy.shell.server import serve

LOCALHOST = "127.0.0.1"
PIPEPROXY = [sys.executable, "-m", "pipeproxy"]


class WrappedStream(trio.abc.Stream):
    """``inner`` passed through: a test's misbehaving stream overrides what it changes."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Peer:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.reads = 0  # receive calls that returned data
        self._replies = ReplyReader()

    @classmethod
    async def connect(cls, address: Address) -> Peer:
        return cls(await trio.open_tcp_stream(*address))

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        if data:
            self.reads += 1
            self.buffer += data
        return bool(data)

    async def line(self) -> bytes:
        """The next CRLF-ended line, CRLF included; b"" at EOF."""
        while (end := self.buffer.find(b"\r\n")) < 0:
            if not await self._fill():
                return b""
        line = bytes(self.buffer[: end + 2])
        del self.buffer[: end + 2]
        return line

    async def until(self, marker: bytes) -> bytes:
        """Everything up to and including ``marker``; what arrived before EOF if it never comes."""
        while (end := self.buffer.find(marker)) < 0:
            if not await self._fill():
                data = bytes(self.buffer)
                self.buffer.clear()
                return data
        data = bytes(self.buffer[: end + len(marker)])
        del self.buffer[: end + len(marker)]
        return data

    async def reply(self) -> Reply:
        """The next reply. Only its own lines are taken from ``buffer``: what came in the
        same read after it (a 421 right behind a 354) stays there for ``rest``."""
        while True:
            while (end := self.buffer.find(b"\n")) < 0:
                if not await self._fill():
                    raise EOFError("connection closed")
            self._replies.feed(bytes(self.buffer[: end + 1]))
            del self.buffer[: end + 1]
            if (reply := self._replies.next_reply()) is not None:
                return reply

    async def replies(self, count: int) -> list[Reply]:
        return [await self.reply() for _ in range(count)]

    async def rest(self) -> bytes:
        """Everything until EOF."""
        while await self._fill():
            pass
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def open_session(address: Address, client_name: str = "client.test") -> Peer:
    """A client through pipeproxy, past the 220 greeting and an EHLO offering PIPELINING."""
    peer = await Peer.connect(address)
    assert (await peer.reply()).code == 220
    await peer.send(f"EHLO {client_name}\r\n".encode())
    ehlo = await peer.reply()
    assert ehlo.code == 250 and "PIPELINING" in ehlo.lines, ehlo
    return peer


async def start_proxy(nursery: trio.Nursery, upstream: Address, **overrides) -> Address:
    config = dataclasses.replace(Config(listen=Address(LOCALHOST, 0), upstream=upstream), **overrides)
    [listener] = await nursery.start(serve, config)
    return Address(LOCALHOST, listener.socket.getsockname()[1])


async def start_upstream(nursery: trio.Nursery, script: Callable[[Peer], Awaitable[None]]) -> Address:
    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await script(Peer(stream))

    [listener] = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host=LOCALHOST))
    return Address(LOCALHOST, listener.socket.getsockname()[1])


async def start_legacy(nursery: trio.Nursery, mta) -> Address:
    [listener] = await nursery.start(mta.serve, LOCALHOST, 0)
    return Address(LOCALHOST, listener.socket.getsockname()[1])


class JsonLog:
    """The JSON log lines a pipeproxy process writes to a pipe, read as they come."""

    def __init__(self, stream: trio.abc.ReceiveStream | None) -> None:
        """``stream``: a process's stdout, as trio.Process gives it (None without a pipe)."""
        assert stream is not None, "the process was started without stdout=subprocess.PIPE"
        self.stream = stream
        self.lines: list[dict[str, Any]] = []
        self._buffer = b""

    async def until(self, event: str) -> dict:
        """Read lines up to the next one whose event is ``event``, and return it."""
        while True:
            while b"\n" not in self._buffer:
                data = await self.stream.receive_some(65536)
                assert data, f"process ended before {event!r}: {self.lines}"
                self._buffer += data
            line, self._buffer = self._buffer.split(b"\n", 1)
            self.lines.append(json.loads(line))
            if self.lines[-1]["event"] == event:
                return self.lines[-1]

    async def follow(self) -> None:
        """Read every line until the process ends, so its stdout pipe never fills up."""
        while data := await self.stream.receive_some(65536):
            self._buffer += data
            *complete, self._buffer = self._buffer.split(b"\n")
            self.lines.extend(json.loads(line) for line in complete)

    def events(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["event"] == event]


def unused_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (the kernel's pick, so free just now)."""
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def closed_port() -> Address:
    """A port on 127.0.0.1 with nothing listening: connecting is refused."""
    return Address(LOCALHOST, unused_port())


def clean_environ(**variables: str) -> dict[str, str]:
    """os.environ without the caller's PIPEPROXY_* settings, plus ``variables``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PIPEPROXY_")}
    return {**environ, **variables}


class ProxyProcess:
    """A ``python -m pipeproxy`` process listening on a free port of 127.0.0.1.

    ``start`` returns once it logs ``listening``; ``log`` holds the JSON lines read so far.
    Configured only through PIPEPROXY_* variables, as the container is.
    """

    def __init__(self, process: trio.Process, log: JsonLog, address: Address) -> None:
        self.process = process
        self.log = log
        self.address = address
        self.terminated = False

    @classmethod
    async def start(cls, upstream: Address, new_session: bool = False, **variables: str) -> ProxyProcess:
        """``new_session``: in a process group of its own, for signals sent to the whole group."""
        environ = clean_environ(PIPEPROXY_LISTEN=f"{LOCALHOST}:0", PIPEPROXY_UPSTREAM=str(upstream), **variables)
        process = await trio.lowlevel.open_process(PIPEPROXY, stdout=subprocess.PIPE, env=environ,
                                                   start_new_session=new_session)
        log = JsonLog(process.stdout)
        try:
            listening = await log.until("listening")
        except BaseException:
            process.kill()
            await process.wait()
            raise
        return cls(process, log, Address.parse(listening["addresses"][0]))

    @property
    def pid(self) -> int:
        return self.process.pid

    def status_kb(self, field: str) -> int:
        """A memory figure from /proc/PID/status, e.g. VmRSS (resident) or VmHWM (its peak)."""
        with open(f"/proc/{self.pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))

    def reset_peak_memory(self) -> int:
        """Make VmHWM start again from the current resident size (Linux clear_refs), and return that."""
        with open(f"/proc/{self.pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return self.status_kb("VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def terminate(self) -> None:
        """SIGTERM, once: it starts the drain (a second one would cut the grace period short)."""
        if not self.terminated and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        self.terminated = True

    async def stop(self, limit: float = 30.0) -> int:
        """SIGTERM (a graceful drain), then its exit status; killed if still alive after ``limit``."""
        self.terminate()
        with trio.move_on_after(limit):
            return await self.process.wait()
        self.process.kill()
        await self.process.wait()
        raise AssertionError(f"pipeproxy did not stop within {limit} s of SIGTERM")
