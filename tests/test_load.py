"""Load: many concurrent sessions through a real pipeproxy process, every message accounted for.

``PIPEPROXY_LOAD_SESSIONS`` sets the number of sessions (default 1,000), each sending
``PIPEPROXY_LOAD_MESSAGES`` pipelined messages (default 2). The proxy runs as its own
process so that its memory per idle session and its open file descriptors can be read
from /proc; the upstream is the strict legacy MTA, which would refuse any early byte.
"""

from __future__ import annotations

import os
import resource

import pytest
import trio

from pipeproxy.demo.client import envelope_lines
from pipeproxy.demo.legacy_mta import LegacyMTA

from peers import Peer, open_session, start_legacy, start_proxy

SESSIONS = int(os.environ.get("PIPEPROXY_LOAD_SESSIONS", "1000"))
MESSAGES = int(os.environ.get("PIPEPROXY_LOAD_MESSAGES", "2"))
RECIPIENTS = ["a@legacy.test", "b@legacy.test", "reject-c@legacy.test"]
# README says about 20 kB resident per idle session (18 to 20 measured). Three times that
# still fails a session that holds a 64 KiB buffer; the fixed slack is allocator noise,
# which matters when PIPEPROXY_LOAD_SESSIONS is small.
MAX_IDLE_SESSION_KB = 60
RSS_NOISE_KB = 2048


@pytest.fixture(autouse=True)
def enough_file_descriptors():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, 4 * SESSIONS + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


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


async def test_many_sessions_every_message_accounted_for_no_leaks_small_idle_sessions(nursery, pipeproxy_process):
    """Every message delivered once or refused; every socket given back; idle sessions small."""
    mta = LegacyMTA()
    proxy = await pipeproxy_process(await start_legacy(nursery, mta), PIPEPROXY_MAX_SESSIONS=str(SESSIONS + 10))
    # The proxy logs a line per session; read them so its stdout never fills up.
    nursery.start_soon(proxy.log.follow)
    baseline_fds, baseline_rss = proxy.open_fds(), proxy.status_kb("VmRSS")

    peers: list[Peer] = []
    limit = trio.CapacityLimiter(200)  # connect in waves: the accept queue is finite

    async def connect_one() -> None:
        async with limit:
            peers.append(await open_session(proxy.address, "load.test"))

    async with trio.open_nursery() as connecting:
        for _ in range(SESSIONS):
            connecting.start_soon(connect_one)
    idle_rss = proxy.status_kb("VmRSS")
    assert proxy.open_fds() == baseline_fds + 2 * SESSIONS, "one client and one upstream socket a session"

    outcomes: dict[str, int] = {}
    async with trio.open_nursery() as sending:
        for number, peer in enumerate(peers):
            sending.start_soon(send_messages, peer, number, outcomes)

    with trio.fail_after(30):  # every session winds down and gives back its sockets
        while proxy.open_fds() > baseline_fds:
            await trio.sleep(0.05)
    assert await proxy.stop() == 0

    per_session_kb = (idle_rss - baseline_rss) / SESSIONS
    print(f"\n{SESSIONS} sessions held at once: {per_session_kb:.1f} kB resident per idle session "
          f"({idle_rss - baseline_rss} kB in all); {len(outcomes)} messages")
    assert idle_rss - baseline_rss < MAX_IDLE_SESSION_KB * SESSIONS + RSS_NOISE_KB
    assert len(outcomes) == SESSIONS * MESSAGES
    delivered = {m.content.split(b"\r\n")[0].removeprefix(b"Subject: ").decode() for m in mta.messages}
    assert len(mta.messages) == len(delivered), "a message was delivered twice"
    assert delivered == {subject for subject, code in outcomes.items() if code == 250}
    assert all(code in (250, 451, 421) for code in outcomes.values())
    assert mta.violations == []
    assert all(m.recipients == RECIPIENTS[:2] for m in mta.messages)


def task_count() -> int:
    def count(task) -> int:
        return 1 + sum(count(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    return count(trio.lowlevel.current_root_task())


async def test_sessions_leave_no_tasks_behind(nursery):
    """In-process: after 100 sessions open, send and close, the task tree is as it was."""
    mta = LegacyMTA()
    proxy = await start_proxy(nursery, await start_legacy(nursery, mta))
    await (await open_session(proxy, "load.test")).aclose()  # warm up: listeners' own tasks exist
    with trio.fail_after(10):
        while mta.open_conversations:
            await trio.sleep(0.01)
    before = task_count()
    peers = [await open_session(proxy, "load.test") for _ in range(100)]
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
