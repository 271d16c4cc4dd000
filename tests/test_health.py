"""The health endpoint answers for pipeproxy itself, never through an upstream session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import trio
from peers import LOCALHOST, JsonLog, start_legacy

from pipeproxy.core.config import Address, Config
from pipeproxy.shell.health import check, serve_health
from pipeproxy.demo.legacy_mta import LegacyMTA
from pipeproxy.shell.server import Server, listen


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


async def test_health_is_200_while_serving_503_while_draining_and_opens_no_upstream(nursery):
    mta = LegacyMTA()
    upstream = await start_legacy(nursery, mta)
    health = Address(LOCALHOST, free_port())
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PIPEPROXY_")}
    environ.update(PIPEPROXY_LISTEN="127.0.0.1:0", PIPEPROXY_UPSTREAM=str(upstream),
                   PIPEPROXY_HEALTH_LISTEN=str(health), PIPEPROXY_GRACE_PERIOD="5")
    process = await trio.lowlevel.open_process([sys.executable, "-m", "pipeproxy"], stdout=subprocess.PIPE, env=environ)
    log = JsonLog(process.stdout)
    try:
        await log.until("listening")
        assert await trio.to_thread.run_sync(check, health) == (True, "HTTP/1.0 200 OK")
        command = await trio.run_process([sys.executable, "-m", "pipeproxy", "health"], env=environ,
                                         capture_stdout=True, check=False)
        assert command.returncode == 0 and command.stdout.startswith(b"HTTP/1.0 200")
        assert mta.connections == 0, "a health check opened an upstream session"
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await process.wait() == 0
    healthy, said = await trio.to_thread.run_sync(check, health)
    assert not healthy and "cannot reach" in said


async def test_health_reports_draining_with_503(nursery):
    server = Server(Config(listen=Address(LOCALHOST, 0), upstream=Address(LOCALHOST, 9)))
    await nursery.start(server.serve)
    health = Address(LOCALHOST, free_port())
    await nursery.start(serve_health, await listen(health), server.health)
    assert (await trio.to_thread.run_sync(check, health))[0]
    await server.shutdown(grace=0)
    assert await trio.to_thread.run_sync(check, health) == (False, "HTTP/1.0 503 Service Unavailable")
