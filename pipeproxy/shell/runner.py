"""Running pipeproxy as a process: serve until a signal, drain, and worker processes.

``main`` is what ``pipeproxy serve`` does with its Config. SIGTERM or SIGINT starts the
drain, whose grace period runs from that signal; a second signal ends the grace period
at once. With ``workers`` above 1 the parent holds the port and starts that many
processes, each listening on it with SO_REUSEPORT, and stops them all on a signal.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import socket
import sys

import structlog
import trio

from ..core import logschema as L
from ..core.config import Address, Config
from ..core.logschema import write
from . import logging_setup as logs
from .health import serve_health
from .server import Server, listen
from .tls import ServerTls


def main(config: Config) -> int:
    """Serve as ``config`` says until stopped; the exit status (2: the address cannot be had)."""
    logs.configure(config.log_format, config.log_level)
    try:
        if config.tls:
            ServerTls(config)  # a certificate that cannot be loaded: one line and status 2, before any worker
        if config.workers > 1:
            return run_workers(config)
        trio.run(run, config)
    except OSError as error:
        print(f"pipeproxy: error: cannot listen on {config.listen}: {error.strerror or error}", file=sys.stderr)
        return 2
    except ValueError as error:  # a TLS certificate or key that cannot be loaded
        print(f"pipeproxy: error: {error}", file=sys.stderr)
        return 2
    return 0


async def run(config: Config, shared: bool = False) -> None:
    """Serve until SIGTERM or SIGINT, then drain; OSError if the address cannot be had."""
    log = structlog.get_logger("pipeproxy")
    server = Server(config)  # first: a TLS certificate that cannot be loaded stops us here
    listeners = await listen(config.listen, shared)
    tls_listeners = [each for address in config.tls_listen for each in await listen(address, shared)]
    health = await listen(config.health_listen, shared) if config.health_listen else []
    async with trio.open_nursery() as nursery:
        if health:
            await nursery.start(serve_health, health, server.health)

        async def stop(signalled_at: float) -> None:
            await server.shutdown(config.grace_period, signalled_at)
            nursery.cancel_scope.cancel()

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await nursery.start(server.serve, listeners, tls_listeners)
            stopping = False
            async for signum in signals:
                if stopping:
                    write(log, L.STOPPING_NOW, signal=signal.Signals(signum).name)
                    server.hurry()
                else:
                    write(log, L.STOPPING, signal=signal.Signals(signum).name)
                    stopping = True
                    nursery.start_soon(stop, trio.current_time())


def run_workers(config: Config) -> int:
    """Start ``config.workers`` processes on one port; stop them all on a signal."""
    log = structlog.get_logger("pipeproxy")
    # Hold the port (and learn it, if 0 was asked for) with a socket that is bound but
    # never listens, so it takes no connections; each worker binds it again.
    reserved = _reserve(config.listen)
    config = dataclasses.replace(config, listen=Address(config.listen.host, reserved.getsockname()[1]))
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_worker, args=(config, index), name=f"pipeproxy-{index}")
        for index in range(config.workers)
    ]
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.pid is not None and worker.exitcode is None:
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for worker in workers:
        worker.start()
    write(log, L.WORKERS_STARTED, workers=[worker.pid for worker in workers], port=config.listen.port)
    status = 0
    try:
        while any(worker.exitcode is None for worker in workers):
            for worker in workers:
                worker.join(timeout=0.5)
                if worker.exitcode is not None and worker.exitcode != 0 and not stopping:
                    write(log, L.WORKER_ENDED, worker=worker.pid, exitcode=worker.exitcode)
                    status = 1
                    stop(signal.SIGTERM, None)
    finally:
        reserved.close()
    return status


def _reserve(address: Address) -> socket.socket:
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(sockaddr)
    return sock


def _worker(config: Config, index: int) -> None:
    logs.configure(config.log_format, config.log_level)
    structlog.contextvars.bind_contextvars(worker=index)
    try:
        trio.run(run, config, True)
    except OSError as error:
        reason = error.strerror or error
        print(f"pipeproxy: error: worker {index} cannot listen on {config.listen}: {reason}", file=sys.stderr)
        sys.exit(2)
