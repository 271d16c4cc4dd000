"""Running pipeproxy as a process: serve until a signal, drain, reload, worker processes.

``main`` is what ``pipeproxy serve`` does with its Config. Every address is bound before
anything runs, so one that cannot be had ends pipeproxy with one line naming it and
exit status 2, workers or not.

Signals, one process: SIGTERM or SIGINT starts the drain, whose grace period runs from
that signal; a second one ends the grace period at once. SIGHUP reloads what can be
reloaded (the Server's reload hooks) and logs ``reload``; pipeproxy goes on serving.

With ``workers`` above 1 the parent (``supervise``) binds one listening socket per
worker (SO_REUSEPORT), starts the workers, serves the health endpoint and ``/metrics``
for all of them, and restarts a worker that dies with a back-off. It tells its workers
what to do over a pipe each: ``drain``, ``hurry`` (a second signal), ``reload``. A
worker takes SIGTERM and SIGINT sent to it directly as a drain too, but never as
"hurry", so a signal sent to the whole process group (Ctrl-C in a terminal, systemd's
``KillMode=control-group``), which reaches each worker directly and through the parent,
starts one drain. A worker ignores SIGHUP (the parent relays it), and drains if the
parent is gone (its pipe reaches end of file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from importlib.metadata import version
from multiprocessing.connection import Connection as Pipe
from typing import Any

import structlog
import trio

from ..core import logschema as L
from ..core import session, values
from ..core.config import Address, Config, settings
from ..core.logschema import write
from . import logging_setup as logs
from . import metrics
from .health import Endpoints, Readiness, serve_health
from .server import ListenError, Server, bind, listen, listeners_of, probe
from .tls import ServerTls, upstream_context

# A worker that dies is replaced after FIRST_DELAY seconds, doubling each time it dies
# again within STABLE seconds of starting, up to MAX_DELAY.
FIRST_DELAY = 0.1
MAX_DELAY = 30.0
STABLE = 60.0
REDACTED = "<redacted>"


def main(config: Config) -> int:
    """Serve as ``config`` says until stopped; the exit status (2: an address cannot be had)."""
    logs.configure(config.log_format, config.log_level)
    try:
        if config.tls:
            ServerTls(config)  # a certificate that cannot be loaded: one line and status 2, before any worker
        upstream_context(config)  # the same for --upstream-tls-ca
        health = bind(config.health_listen) if config.health_listen else []
        if config.workers > 1:
            return run_workers(config, health)
        listeners = bind(config.listen)
    except (ListenError, ValueError) as error:  # ValueError: a TLS certificate, key or CA
        print(f"pipeproxy: error: {error}", file=sys.stderr)
        return 2
    starting(config)
    set_title("pipeproxy")
    exposition = metrics.start()
    assert exposition is not None
    trio.run(run, config, listeners, health, exposition)
    return 0


def effective_settings(config: Config) -> dict[str, Any]:
    """Every setting as an operator would write it; secrets redacted."""
    shown: dict[str, Any] = {}
    for name, (setting, _) in settings().items():
        value = getattr(config, name)
        if setting.secret and value:
            shown[name] = REDACTED
        elif value is None or isinstance(value, bool | int | float | str):
            shown[name] = value
        elif isinstance(value, Address | enum.Enum):
            shown[name] = str(value) if isinstance(value, Address) else value.value
        elif isinstance(value, tuple | frozenset):
            shown[name] = [str(item) for item in (sorted(value) if isinstance(value, frozenset) else value)]
        elif dataclasses.is_dataclass(value):
            shown[name] = dataclasses.asdict(value)  # type: ignore[arg-type]
        else:
            shown[name] = values.show(value)
    return shown


def starting(config: Config) -> None:
    log = structlog.get_logger("pipeproxy")
    # Whether pip compiled the core (setup.py) or fell back to pure Python, say for want
    # of a compiler: the same behaviour at 7 to 15 % more CPU a message.
    core = "python" if session.__file__.endswith(".py") else "compiled"
    shown = effective_settings(config)
    write(log, L.STARTING, version=version("pipeproxy"), pid=os.getpid(), core=core, settings=shown)


def set_title(title: str) -> None:
    """What ps shows for this process (its whole command line)."""
    try:
        import setproctitle
    except ImportError:  # pragma: no cover - a dependency; only the name in ps is lost
        return
    setproctitle.setproctitle(title)


class _Process:
    """One serving process's reactions: drain, hurry, reload."""

    def __init__(self, server: Server, config: Config, nursery: trio.Nursery) -> None:
        self.server = server
        self.config = config
        self.nursery = nursery
        self.stopping = False
        self.log = structlog.get_logger("pipeproxy")

    def drain(self, signame: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        write(self.log, L.STOPPING, signal=signame)
        self.nursery.start_soon(self._stop, trio.current_time())

    def hurry(self, signame: str) -> None:
        self.drain(signame)
        write(self.log, L.STOPPING_NOW, signal=signame)
        self.server.hurry()

    def reload(self, signame: str) -> None:
        write(self.log, L.RELOAD, signal=signame, reloaded=self.server.reload())

    async def _stop(self, signalled_at: float) -> None:
        await self.server.shutdown(self.config.grace_period, signalled_at)
        self.nursery.cancel_scope.cancel()


async def run(
    config: Config,
    listeners: list[socket.socket],
    health: list[socket.socket],
    exposition: metrics.Exposition | None,
    control: Pipe | None = None,
) -> None:
    """Serve until stopped, then drain. ``control``: a worker's pipe from its parent."""
    server = Server(config)
    async with trio.open_nursery() as nursery:
        process = _Process(server, config, nursery)
        if health and exposition is not None:
            endpoints = Endpoints(
                draining=lambda: server.stopping,
                sessions=lambda: len(server.connections),
                metrics=exposition.text,
                readiness=Readiness(config.upstream, lambda: exposition.value(metrics.UPSTREAM_ALIVE, max),
                                    config.upstream_proxy_protocol),
            )
            await nursery.start(serve_health, listeners_of(health), endpoints)
        wanted = [signal.SIGTERM, signal.SIGINT] + ([] if control else [signal.SIGHUP])
        _ignore(wanted)
        with trio.open_signal_receiver(*wanted) as signals:
            # Implicit TLS ports: each worker listens with SO_REUSEPORT, like the plain one.
            shared = control is not None
            tls_listeners = [each for address in config.tls_listen for each in await listen(address, shared)]
            await nursery.start(server.serve, listeners_of(listeners), tls_listeners)
            if control is not None:
                nursery.start_soon(_obey, control, process)
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    process.reload(name)
                elif control is not None or not process.stopping:
                    process.drain(name)  # a worker: its parent says when to hurry
                else:
                    process.hurry(name)


def _ignore(signals: list[signal.Signals]) -> None:
    """Leaving open_signal_receiver, trio raises again the signals it has not handed out,
    under the handler that was there before. A signal that came with another (a group
    SIGTERM with the parent's drain) must not then kill the process as it exits: so the
    handler before is "ignore"."""
    for signum in signals:
        signal.signal(signum, signal.SIG_IGN)


async def _obey(control: Pipe, process: _Process) -> None:
    """A worker: carry out the parent's ``drain SIGNAL``, ``hurry SIGNAL``, ``reload SIGNAL`` lines."""
    stream = trio.lowlevel.FdStream(os.dup(control.fileno()))
    buffer = b""
    async with stream:
        while data := await stream.receive_some(4096):
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                what, _, signame = line.decode().partition(" ")
                getattr(process, what)(signame)
    process.drain("parent gone")


# -- workers ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Slot:
    index: int
    sockets: list[socket.socket]
    process: Any = None  # multiprocessing.Process
    pipe: Pipe | None = None  # the parent's end
    exitcode: int | None = None


def run_workers(config: Config, health: list[socket.socket]) -> int:
    """Start ``config.workers`` processes on one port, keep them running, stop them on a signal."""
    port = probe(config.listen)
    config = dataclasses.replace(config, listen=Address(config.listen.host, port))
    slots = [_Slot(index, bind(config.listen, shared=True)) for index in range(config.workers)]
    starting(config)
    set_title("pipeproxy: parent")
    directory = tempfile.mkdtemp(prefix="pipeproxy-metrics-")
    os.environ[metrics.MULTIPROC_VARIABLE] = directory  # before a worker imports prometheus_client
    try:
        return trio.run(supervise, config, slots, health, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def supervise(config: Config, slots: list[_Slot], health: list[socket.socket], directory: str) -> int:
    log = structlog.get_logger("pipeproxy")
    context = multiprocessing.get_context("spawn")
    exposition = metrics.Exposition(directory)
    stopping = trio.Event()

    def tell(what: str, signame: str) -> None:
        for slot in slots:
            if slot.pipe is not None:
                with contextlib.suppress(OSError):
                    os.write(slot.pipe.fileno(), f"{what} {signame}\n".encode())

    def start(slot: _Slot) -> None:
        reader, writer = context.Pipe(duplex=False)
        slot.process = context.Process(target=_worker, args=(config, slot.index, slot.sockets, reader),
                                       name=f"pipeproxy-worker-{slot.index}")
        slot.process.start()
        reader.close()
        slot.pipe = writer

    async def keep_running(slot: _Slot) -> None:
        delay = 0.0
        while True:
            begun = trio.current_time()
            await trio.lowlevel.wait_readable(slot.process.sentinel)
            slot.process.join()
            slot.exitcode, pid = slot.process.exitcode, slot.process.pid
            assert slot.pipe is not None
            slot.pipe.close()
            slot.pipe = None
            multiprocessing_dead(pid, directory)
            if stopping.is_set():
                return
            delay = FIRST_DELAY if trio.current_time() - begun >= STABLE else min(max(delay * 2, FIRST_DELAY),
                                                                                  MAX_DELAY)
            write(log, L.WORKER_RESTARTING, worker=slot.index, pid=pid, exitcode=slot.exitcode, delay=delay)
            with trio.move_on_after(delay):
                await stopping.wait()
            if stopping.is_set():
                return
            start(slot)
            write(log, L.WORKER_STARTED, worker=slot.index, pid=slot.process.pid)

    async def watch(signals: AsyncIterator[int]) -> None:
        seen = 0
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                write(log, L.RELOAD, signal=name, reloaded=[])
                tell("reload", name)
                continue
            seen += 1
            if seen == 1:
                write(log, L.STOPPING, signal=name)
                stopping.set()
                # Only the workers hold the port now: when they close it, new clients are refused.
                for slot in slots:
                    for sock in slot.sockets:
                        sock.close()
                tell("drain", name)
            else:
                write(log, L.STOPPING_NOW, signal=name)
                tell("hurry", name)

    _ignore([signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, signals)
            for slot in slots:
                start(slot)
            write(log, L.WORKERS_STARTED, workers=[slot.process.pid for slot in slots], port=config.listen.port)
            if health:
                endpoints = Endpoints(
                    draining=stopping.is_set,
                    sessions=lambda: int(exposition.value(metrics.SESSIONS_OPEN)),
                    metrics=exposition.text,
                    readiness=Readiness(config.upstream, lambda: exposition.value(metrics.UPSTREAM_ALIVE, max),
                                        config.upstream_proxy_protocol),
                )
                await nursery.start(serve_health, listeners_of(health), endpoints)
            # Each keeper returns once its worker has ended after a stop.
            async with trio.open_nursery() as keepers:
                for slot in slots:
                    keepers.start_soon(keep_running, slot)
            nursery.cancel_scope.cancel()
    return 0 if all(slot.exitcode == 0 for slot in slots) else 1


def multiprocessing_dead(pid: int | None, directory: str) -> None:
    """Drop a dead worker's live gauges (its open sessions); its counters stay."""
    from prometheus_client import multiprocess

    if pid is not None:
        multiprocess.mark_process_dead(pid, directory)


def _worker(config: Config, index: int, sockets: list[socket.socket], control: Pipe) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the parent relays it
    set_title(f"pipeproxy: worker {index}")
    logs.configure(config.log_format, config.log_level, worker=index)
    metrics.start(os.environ[metrics.MULTIPROC_VARIABLE])
    trio.run(run, config, sockets, [], None, control)
