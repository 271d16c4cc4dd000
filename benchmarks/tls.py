"""TLS benchmarks (issue 10): handshakes per second for one pipeproxy process, messages
per second with TLS against without, and memory per idle TLS session.

One pipeproxy process (``python -m pipeproxy``, one worker) with a trustme certificate,
a STARTTLS listener and an implicit TLS listener (``--tls-listen``), in front of
``smtp-sink -p`` (a legacy MTA: no PIPELINING, no TLS). The clients are trio tasks in
this process, on the same machine. Everything is on 127.0.0.1.

    .venv/bin/python benchmarks/tls.py [--seconds 5] [--idle 500]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
import trustme

HERE = Path(__file__).resolve().parent
CONTENT = b"From: load@client.test\r\nSubject: load\r\n\r\n" + b"A line of a benchmark message body.\r\n" * 50
RECIPIENTS = 5


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Reader:
    """Replies from a stream, whole (multi-line ones too)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream, self.buffer = stream, b""

    async def replies(self, count: int) -> list[int]:
        codes: list[int] = []
        while len(codes) < count:
            end = self.buffer.find(b"\r\n")
            if end < 0:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError("closed")
                self.buffer += data
                continue
            line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            if line[3:4] != b"-":
                codes.append(int(line[:3]))
        return codes


async def open_session(port: int, context: ssl.SSLContext | None, implicit: bool) -> tuple[trio.abc.Stream, Reader]:
    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
    if implicit:
        assert context is not None
        stream = trio.SSLStream(stream, context, server_hostname="localhost")
        await stream.do_handshake()
    reader = Reader(stream)
    await reader.replies(1)
    await stream.send_all(b"EHLO load.test\r\n")
    await reader.replies(1)
    if context is not None and not implicit:
        await stream.send_all(b"STARTTLS\r\n")
        assert await reader.replies(1) == [220]
        stream = trio.SSLStream(stream, context, server_hostname="localhost")
        await stream.do_handshake()
        reader = Reader(stream)
        await stream.send_all(b"EHLO load.test\r\n")
        await reader.replies(1)
    return stream, reader


async def handshakes(port: int, context: ssl.SSLContext, seconds: float, concurrency: int) -> dict:
    """Implicit TLS sessions opened (handshake, greeting) and closed, as fast as they go."""
    done = 0
    deadline = trio.current_time() + seconds

    async def client() -> None:
        nonlocal done
        while trio.current_time() < deadline:
            stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), context, server_hostname="localhost")
            await stream.do_handshake()
            await Reader(stream).replies(1)
            await stream.send_all(b"QUIT\r\n")
            await trio.aclose_forcefully(stream)
            done += 1

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(client)
    return {"handshakes": done, "per_second": round(done / (trio.current_time() - started))}


async def messages(port: int, context: ssl.SSLContext | None, implicit: bool, count: int, concurrency: int) -> float:
    """Messages a second, ``concurrency`` persistent pipelining sessions."""
    remaining = count
    envelope = b"MAIL FROM:<load@client.test>\r\n" + b"".join(
        b"RCPT TO:<r%d@legacy.test>\r\n" % i for i in range(RECIPIENTS)
    ) + b"DATA\r\n"

    async def client() -> None:
        nonlocal remaining
        stream, reader = await open_session(port, context, implicit)
        while remaining > 0:
            remaining -= 1
            await stream.send_all(envelope)
            codes = await reader.replies(RECIPIENTS + 2)
            assert codes[-1] == 354, codes
            await stream.send_all(CONTENT + b".\r\n")
            assert await reader.replies(1) == [250]
        await stream.send_all(b"QUIT\r\n")
        await reader.replies(1)
        await trio.aclose_forcefully(stream)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(client)
    return count / (time.perf_counter() - started)


async def idle_memory(pid: int, port: int, context: ssl.SSLContext | None, sessions: int) -> float:
    """kB of pipeproxy's resident memory per idle session (greeted, EHLO, TLS if asked)."""
    await trio.sleep(0.5)
    before = rss_kb(pid)
    opened = []
    for _ in range(sessions):
        opened.append(await open_session(port, context, implicit=context is not None))
    await trio.sleep(1.0)
    after = rss_kb(pid)
    for stream, _ in opened:
        await trio.aclose_forcefully(stream)
    await trio.sleep(1.0)
    return (after - before) / sessions


async def main(arguments: argparse.Namespace) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="pipeproxy-tls-bench-"))
    ca = trustme.CA()
    issued = ca.issue_cert("localhost")
    cert, key = folder / "cert.pem", folder / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    context = ssl.create_default_context()
    ca.configure_trust(context)

    sink_port = free_port()
    sink = subprocess.Popen(  # noqa: ASYNC220 (started once, before any load)
        ["smtp-sink", "-u", "nobody", "-C", "-F", "-p", f"127.0.0.1:{sink_port}", "1024"]
    )

    async def start_proxy() -> tuple[subprocess.Popen[bytes], int, int]:
        plain_port, tls_port = free_port(), free_port()
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PIPEPROXY_")}
        environ.update(
            PIPEPROXY_LISTEN=f"127.0.0.1:{plain_port}", PIPEPROXY_UPSTREAM=f"127.0.0.1:{sink_port}",
            PIPEPROXY_TLS_CERT=str(cert), PIPEPROXY_TLS_KEY=str(key), PIPEPROXY_TLS_LISTEN=f"127.0.0.1:{tls_port}",
            PIPEPROXY_LOG_LEVEL="warning", PIPEPROXY_LOG_FORMAT="json", PIPEPROXY_MAX_SESSIONS="5000",
        )
        proxy = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "pipeproxy"], env=environ, stdout=subprocess.DEVNULL
        )
        for _ in range(100):
            try:
                (await trio.open_tcp_stream("127.0.0.1", tls_port)).socket.close()
                break
            except OSError:
                await trio.sleep(0.1)
        return proxy, plain_port, tls_port

    def stop(proxy: subprocess.Popen[bytes]) -> None:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(30)

    results: dict = {}
    proxy, plain_port, tls_port = await start_proxy()
    try:
        cpu = cpu_seconds(proxy.pid)
        results["handshakes"] = await handshakes(tls_port, context, arguments.seconds, arguments.concurrency)
        results["handshakes"]["proxy_cpu"] = round((cpu_seconds(proxy.pid) - cpu) / arguments.seconds, 2)
        runs: dict[str, list[float]] = {"clear": [], "starttls": [], "implicit": []}
        for _ in range(arguments.runs):  # interleaved: the machine's load swings hit each alike
            runs["clear"].append(await messages(plain_port, None, False, arguments.messages, arguments.concurrency))
            runs["starttls"].append(
                await messages(plain_port, context, False, arguments.messages, arguments.concurrency)
            )
            runs["implicit"].append(await messages(tls_port, context, True, arguments.messages, arguments.concurrency))
        results["messages_per_second"] = {name: round(statistics.median(values)) for name, values in runs.items()}
        results["tls_over_clear"] = round(
            statistics.median(s / c for s, c in zip(runs["starttls"], runs["clear"], strict=True)), 2
        )
        stop(proxy)
        # Each in a fresh process: memory freed by one kind of session stays resident and
        # the next would reuse it.
        results["idle_kb_per_session"] = {}
        for kind, tls in (("clear", None), ("tls", context)):
            proxy, plain_port, tls_port = await start_proxy()
            port = tls_port if tls else plain_port
            results["idle_kb_per_session"][kind] = round(await idle_memory(proxy.pid, port, tls, arguments.idle), 1)
            stop(proxy)
    finally:
        if proxy.poll() is None:
            stop(proxy)
        sink.terminate()
        sink.wait(10)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="of handshakes")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--messages", type=int, default=1000, help="per run and kind")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle", type=int, default=500, help="idle sessions for the memory figure")
    print(json.dumps(trio.run(main, parser.parse_args()), indent=2))
