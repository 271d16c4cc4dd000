"""Load: many concurrent sessions through a real pipeproxy process, every message accounted for.

``PIPEPROXY_LOAD_SESSIONS`` sets the number of sessions (default 1,000), each sending
``PIPEPROXY_LOAD_MESSAGES`` pipelined messages (default 2). The proxy runs as its own
process so that its memory per idle session and its open file descriptors can be read
from /proc; the upstream is the strict legacy MTA, which would refuse any early byte.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

import pytest
import trio
from peers import JsonLog, Peer, start_legacy, start_proxy

from pipeproxy.core.config import Address
from pipeproxy.demo.legacy_mta import LegacyMTA
from pipeproxy.demo.client import envelope_lines

SESSIONS = int(os.environ.get("PIPEPROXY_LOAD_SESSIONS", "1000"))
MESSAGES = int(os.environ.get("PIPEPROXY_LOAD_MESSAGES", "2"))
RECIPIENTS = ["a@legacy.test", "b@legacy.test", "reject-c@legacy.test"]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture(autouse=True)
def enough_file_descriptors():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, 4 * SESSIONS + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def open_idle_session(address: Address) -> Peer:
    peer = await Peer.connect(address)
    assert (await peer.reply()).code == 220
    await peer.send(b"EHLO load.test\r\n")
    assert (await peer.reply()).code == 250
    return peer


async def send_messages(peer: Peer, session: int, outcomes: dict[str, int]) -> None:
    """MESSAGES pipelined transactions; each outcome is the final reply code, by subject."""
    for message in range(MESSAGES):
        subject = f"load {session}.{message}"
        await peer.send(b"".join(envelope_lines(f"s{session}@load.test", RECIPIENTS)))
        replies = await peer.replies(len(RECIPIENTS) + 2)
        if replies[-1].code != 354:
            outcomes[subject] = replies[-1].code
            continue
        await peer.send(f"Subject: {subject}\r\n\r\nbody\r\n.\r\n".encode())
        outcomes[subject] = (await peer.reply()).code
    await peer.send(b"QUIT\r\n")
    assert (await peer.reply()).code == 221
    await peer.aclose()


async def test_many_sessions_every_message_accounted_for_no_leaks(nursery):
    mta = LegacyMTA()
    upstream = await start_legacy(nursery, mta)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PIPEPROXY_")}
    environ.update(
        PIPEPROXY_LISTEN="127.0.0.1:0", PIPEPROXY_UPSTREAM=str(upstream), PIPEPROXY_MAX_SESSIONS=str(SESSIONS + 10)
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "pipeproxy"], stdout=subprocess.PIPE, env=environ
    )
    try:
        listening = await JsonLog(process.stdout).until("listening")
        proxy = Address.parse(listening["addresses"][0])
        # The proxy logs a line per session; read them so its stdout never fills up.
        nursery.start_soon(drain, process.stdout)
        baseline_fds, baseline_rss = open_fds(process.pid), rss_kb(process.pid)

        peers: list[Peer] = []
        limit = trio.CapacityLimiter(200)  # connect in waves: the accept queue is finite

        async def connect_one() -> None:
            async with limit:
                peers.append(await open_idle_session(proxy))

        async with trio.open_nursery() as connecting:
            for _ in range(SESSIONS):
                connecting.start_soon(connect_one)
        idle_rss = rss_kb(process.pid)
        assert open_fds(process.pid) == baseline_fds + 2 * SESSIONS, "one client and one upstream socket a session"

        outcomes: dict[str, int] = {}
        async with trio.open_nursery() as sending:
            for number, peer in enumerate(peers):
                sending.start_soon(send_messages, peer, number, outcomes)

        with trio.fail_after(30):  # every session winds down and gives back its sockets
            while open_fds(process.pid) > baseline_fds:
                await trio.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            await process.wait()

    per_session_kb = (idle_rss - baseline_rss) / SESSIONS
    print(f"\n{SESSIONS} sessions held at once: {per_session_kb:.1f} kB resident per idle session "
          f"({idle_rss - baseline_rss} kB in all); {len(outcomes)} messages")
    assert len(outcomes) == SESSIONS * MESSAGES
    delivered = {m.content.split(b"\r\n")[0].removeprefix(b"Subject: ").decode() for m in mta.messages}
    assert len(mta.messages) == len(delivered), "a message was delivered twice"
    assert delivered == {subject for subject, code in outcomes.items() if code == 250}
    assert all(code in (250, 451, 421) for code in outcomes.values())
    assert mta.violations == []
    assert all(m.recipients == RECIPIENTS[:2] for m in mta.messages)


async def drain(stream) -> None:
    while await stream.receive_some(65536):
        pass


def task_count() -> int:
    def count(task) -> int:
        return 1 + sum(count(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    return count(trio.lowlevel.current_root_task())


async def test_sessions_leave_no_tasks_behind(nursery):
    """In-process: after 100 sessions open, send and close, the task tree is as it was."""
    mta = LegacyMTA()
    proxy = await start_proxy(nursery, await start_legacy(nursery, mta))
    await (await open_idle_session(proxy)).aclose()  # warm up: listeners' own tasks exist
    with trio.fail_after(10):
        while mta.open_conversations:
            await trio.sleep(0.01)
    before = task_count()
    peers = [await open_idle_session(proxy) for _ in range(100)]
    assert task_count() > before
    outcomes: dict[str, int] = {}
    async with trio.open_nursery() as sending:
        for number, peer in enumerate(peers):
            sending.start_soon(send_messages, peer, number, outcomes)
    with trio.fail_after(10):
        while task_count() > before or mta.open_conversations:
            await trio.sleep(0.01)
    assert task_count() == before
    assert len(mta.messages) == 100 * MESSAGES
