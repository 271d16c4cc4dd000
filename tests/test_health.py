"""The health endpoint answers for pipeproxy itself, never through an upstream session."""

from __future__ import annotations

import trio

from pipeproxy.core.config import Address, Config
from pipeproxy.demo.client import envelope_lines
from pipeproxy.demo.legacy_mta import LegacyMTA
from pipeproxy.shell.health import check, serve_health
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
    await nursery.start(serve_health, await listen(health), server.health)
    assert (await trio.to_thread.run_sync(check, health))[0]
    await server.shutdown(grace=0)
    assert await trio.to_thread.run_sync(check, health) == (False, "HTTP/1.0 503 Service Unavailable")
