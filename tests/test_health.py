"""The health endpoint answers for pipeproxy itself, never through an upstream session."""

from __future__ import annotations

from importlib.metadata import version

import pytest
import trio
import trio.lowlevel
from prometheus_client import CollectorRegistry, generate_latest

from pipeproxy.core.config import Address, Config
from pipeproxy.demo.client import envelope_lines
from pipeproxy.demo.legacy_mta import LegacyMTA
from pipeproxy.shell.health import FRESH, PROBE_INTERVAL, Endpoints, Readiness, check, get, serve_health
from pipeproxy.shell.metrics import Metrics
from pipeproxy.shell.server import Server, listen

from peers import LOCALHOST, PIPEPROXY, closed_port, open_session, start_legacy


async def test_health_is_200_while_serving_503_while_draining_and_opens_no_upstream(
    nursery, pipeproxy_process, free_port, clean_env
):
    """200 from the endpoint and from `pipeproxy health`; 503 while a message holds the drain open."""
    mta = LegacyMTA()
    health = Address(LOCALHOST, free_port)
    proxy = await pipeproxy_process(
        await start_legacy(nursery, mta), PIPEPROXY_HEALTH_LISTEN=str(health), PIPEPROXY_GRACE_PERIOD="60"
    )
    assert await trio.to_thread.run_sync(check, health) == (True, "HTTP/1.0 200 OK")
    command = await trio.run_process([*PIPEPROXY, "health"], env={**clean_env, "PIPEPROXY_HEALTH_LISTEN": str(health)},
                                     capture_stdout=True, check=False)
    assert command.returncode == 0 and command.stdout.startswith(b"HTTP/1.0 200")
    assert mta.connections == 0, "a health check opened an upstream session"

    busy = await open_session(proxy.address)  # a message in DATA keeps the drain going
    await busy.send(b"".join(envelope_lines("s@client.test", ["r@legacy.test"])))
    assert [r.code for r in await busy.replies(3)] == [250, 250, 354]
    proxy.terminate()
    await proxy.log.until("draining")
    assert await trio.to_thread.run_sync(check, health) == (False, "HTTP/1.0 503 Service Unavailable")
    await busy.send(b"done\r\n.\r\n")
    assert (await busy.reply()).code == 250
    assert await proxy.stop() == 0
    healthy, said = await trio.to_thread.run_sync(check, health)
    assert not healthy and "cannot reach" in said


async def test_health_reports_draining_with_503(nursery, free_port):
    server = Server(Config(listen=Address(LOCALHOST, 0), upstream=closed_port()))
    await nursery.start(server.serve)
    health = Address(LOCALHOST, free_port)
    endpoints = Endpoints(lambda: server.stopping, lambda: len(server.connections), lambda: b"")
    await nursery.start(serve_health, await listen(health), endpoints)
    assert (await trio.to_thread.run_sync(check, health))[0]
    await server.shutdown(grace=0)
    assert await trio.to_thread.run_sync(check, health) == (False, "HTTP/1.0 503 Service Unavailable")


class FakeClock:
    """Unix time that moves only when the test says."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_readyz_counts_real_greetings_and_checks_the_upstream_only_when_none_came_recently(nursery):
    mta = LegacyMTA()
    upstream = await start_legacy(nursery, mta)
    clock, greeted = FakeClock(), [0.0]
    readiness = Readiness(upstream, lambda: greeted[0], clock=clock)
    greeted[0] = clock.now  # a real session was just greeted
    assert await readiness.check() == (True, "ready")
    assert (readiness.probes, mta.connections) == (0, 0)
    clock.now += FRESH  # no session since: pipeproxy checks for itself, once
    assert await readiness.check() == (True, "ready")
    assert await readiness.check() == (True, "ready")
    assert (readiness.probes, mta.connections) == (1, 1)
    await trio.lowlevel.checkpoint()
    assert mta.commands[-1:] == ["QUIT"], "the check said QUIT"


async def test_readyz_is_503_while_the_upstream_is_down_and_checks_it_at_most_every_few_seconds():
    clock = FakeClock()
    readiness = Readiness(closed_port(), lambda: 0.0, clock=clock)
    ready, said = await readiness.check()
    assert not ready and said.startswith("upstream 127.0.0.1:")
    assert (await readiness.check(), readiness.probes) == ((False, said), 1)
    clock.now += PROBE_INTERVAL
    assert (await readiness.check())[0] is False and readiness.probes == 2


async def test_paths_methods_and_draining(nursery, free_port):
    draining = [False]
    endpoints = Endpoints(lambda: draining[0], lambda: 3, lambda: b"pipeproxy_sessions_total 3.0\n",
                          Readiness(closed_port(), lambda: 0.0))
    health = Address(LOCALHOST, free_port)
    await nursery.start(serve_health, await listen(health), endpoints)

    def ask(path: str, method: str = "GET") -> tuple[int, str]:
        return get(health, path, method)

    answers = {path: await trio.to_thread.run_sync(ask, path) for path in ("/health", "/livez", "/metrics", "/x")}
    assert answers == {"/health": (200, "ok sessions=3\r\n"), "/livez": (200, "alive\r\n"),
                       "/metrics": (200, "pipeproxy_sessions_total 3.0\n"), "/x": (404, "not found\r\n")}
    assert (await trio.to_thread.run_sync(ask, "/readyz"))[0] == 503  # the upstream is down
    for path in ("/health", "/livez", "/readyz", "/metrics"):
        assert (await trio.to_thread.run_sync(ask, path, "POST"))[0] == 405
    assert (await trio.to_thread.run_sync(ask, "/nowhere", "DELETE"))[0] == 404
    assert await trio.to_thread.run_sync(ask, "/livez", "HEAD") == (200, "")
    draining[0] = True
    assert await trio.to_thread.run_sync(ask, "/readyz") == (503, "draining\r\n")
    assert await trio.to_thread.run_sync(ask, "/livez") == (200, "alive\r\n")
    assert await trio.to_thread.run_sync(ask, "/health") == (503, "draining sessions=3\r\n")


def metric(text: str, sample: str) -> float:
    """The value of one sample line (name and labels exactly as exposed) in /metrics text."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.rsplit(" ", 1)[0] == sample]
    assert len(values) == 1, f"{sample} not in:\n{text}"
    return values[0]


def test_transaction_lines_count_under_few_labels():
    """However many error texts the outcomes carry, they count as one "not completed";
    the recipients and the final codes as the lines say, none counted for a zero."""
    registry = CollectorRegistry()
    counted = Metrics(registry)
    for n in range(100):
        counted.observe("transaction", {"outcome": f"upstream failed: error {n}", "recipients_accepted": 2,
                                        "recipients_rejected": n % 2, "reply_code": 451 if n % 2 else None,
                                        "upstream_wait": 0.01})
    counted.observe("transaction", {"outcome": "message accepted", "recipients_accepted": 1, "reply_code": 250})
    text = generate_latest(registry).decode()
    assert metric(text, 'pipeproxy_messages_total{outcome="not completed"}') == 100
    assert metric(text, 'pipeproxy_messages_total{outcome="message accepted"}') == 1
    assert metric(text, 'pipeproxy_recipients_total{result="accepted"}') == 201
    assert metric(text, 'pipeproxy_recipients_total{result="refused"}') == 50
    assert metric(text, 'pipeproxy_upstream_replies_total{code="451",stage="message"}') == 50
    assert metric(text, 'pipeproxy_upstream_replies_total{code="250",stage="message"}') == 1
    assert metric(text, "pipeproxy_upstream_wait_seconds_count") == 101
    assert len(counted._outcomes) == 2  # the children it keeps at hand: one per label, not per text


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_metrics_and_the_session_count_cover_every_worker(nursery, pipeproxy_process, free_port, workers):
    mta = LegacyMTA()
    health = Address(LOCALHOST, free_port)
    proxy = await pipeproxy_process(await start_legacy(nursery, mta), PIPEPROXY_HEALTH_LISTEN=str(health),
                                    PIPEPROXY_WORKERS=workers)
    while len(proxy.log.events("listening")) < int(workers):
        await proxy.log.until("listening")
    assert await trio.to_thread.run_sync(get, health, "/readyz") == (200, "ready\r\n")
    sessions = 20
    for _ in range(sessions):
        client = await open_session(proxy.address)
        await client.send(b"".join(envelope_lines("s@client.test", ["a@legacy.test", "reject@legacy.test"])))
        await client.replies(4)
        await client.send(b"hi\r\n.\r\nMAIL FROM:<s@client.test>\r\nXCLIENT ADDR=1.2.3.4\r\nQUIT\r\n")
        await client.rest()
        await client.aclose()
    idle = [await open_session(proxy.address) for _ in range(sessions)]
    while len(proxy.log.events("session open")) < 2 * sessions:
        await proxy.log.until("session open")
    assert len({line.get("worker") for line in proxy.log.events("session open")}) == int(workers)
    assert await trio.to_thread.run_sync(get, health, "/health") == (200, f"ok sessions={sessions}\r\n")
    status, text = await trio.to_thread.run_sync(get, health, "/metrics")
    assert status == 200
    assert metric(text, "pipeproxy_sessions_open") == sessions
    assert metric(text, "pipeproxy_sessions_total") == 2 * sessions
    assert metric(text, 'pipeproxy_messages_total{outcome="message accepted"}') == sessions
    assert metric(text, 'pipeproxy_messages_total{outcome="not completed"}') == sessions  # the MAIL before QUIT
    assert metric(text, 'pipeproxy_recipients_total{result="accepted"}') == sessions
    assert metric(text, 'pipeproxy_recipients_total{result="refused"}') == sessions
    assert metric(text, 'pipeproxy_refusals_total{reason="not relayable"}') == sessions  # the XCLIENT
    assert metric(text, 'pipeproxy_upstream_replies_total{code="250",stage="message"}') == sessions
    assert metric(text, 'pipeproxy_upstream_replies_total{code="220",stage="greeting"}') == 2 * sessions
    assert metric(text, "pipeproxy_upstream_wait_seconds_count") == 2 * sessions
    assert metric(text, "pipeproxy_session_duration_seconds_count") == sessions
    assert metric(text, 'pipeproxy_build_info{version="' + version("pipeproxy") + '"}') == 1
    for client in idle:
        await client.aclose()
    assert await proxy.stop() == 0
