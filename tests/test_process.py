"""The pipeproxy process as an operator and a service manager meet it: signals to the
whole process group, a second instance on a busy port, a busy health port, SIGHUP, a
worker killed, the startup line, and what ps shows. Real processes, real signals."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess

import pytest
import trio

from pipeproxy.core import session
from pipeproxy.core.config import Address, Config, settings
from pipeproxy.demo.client import envelope_lines
from pipeproxy.demo.legacy_mta import LegacyMTA
from pipeproxy.shell import runner

from peers import LOCALHOST, PIPEPROXY, Peer, ProxyProcess, clean_environ, open_session, start_legacy

SHUTTING_DOWN = b"421 4.3.2 Service shutting down, closing connection\r\n"


async def all_listening(proxy: ProxyProcess, workers: int) -> None:
    """ProxyProcess.start waited for the first worker's 'listening'; wait for the rest."""
    while len(proxy.log.events("listening")) < workers:
        await proxy.log.until("listening")


async def into_data(address: Address) -> Peer:
    client = await open_session(address)
    await client.send(b"".join(envelope_lines("s@client.test", ["r@legacy.test"])))
    assert [r.code for r in await client.replies(3)] == [250, 250, 354]
    return client


@pytest.mark.parametrize("how", ["to the group", "to each worker, then to the parent"])
async def test_one_sigterm_per_process_starts_one_drain_however_it_arrived(nursery, pipeproxy_process, how):
    """Ctrl-C or systemd's KillMode=control-group reach every worker directly and through
    the parent: the message in DATA must still be completed, not cut off as by a second
    signal. The second case is the first with the parent's relay arriving late, as it
    may on a busy machine (signals that arrive together are merged)."""
    mta = LegacyMTA(reply_delay=0.002)
    proxy = await pipeproxy_process(await start_legacy(nursery, mta), new_session=True, PIPEPROXY_WORKERS="2")
    await all_listening(proxy, 2)
    client = await into_data(proxy.address)
    await client.send(b"Subject: group\r\n\r\nbefore\r\n")
    if how == "to the group":
        os.killpg(proxy.pid, signal.SIGTERM)
    else:
        for worker in proxy.log.events("workers started")[0]["workers"]:
            os.kill(worker, signal.SIGTERM)
    while len(proxy.log.events("draining")) < 2:
        await proxy.log.until("draining")
    if how != "to the group":
        proxy.process.send_signal(signal.SIGTERM)
        while not [line for line in proxy.log.events("stopping") if "worker" not in line]:
            await proxy.log.until("stopping")
        await trio.sleep(0.2)  # time for a relayed signal to arrive (the old parent sent one)
    await client.send(b"after\r\n.\r\n")
    assert await client.rest() == b"250 2.0.0 Ok: queued\r\n" + SHUTTING_DOWN
    with trio.fail_after(30):
        assert await proxy.process.wait() == 0
    await proxy.log.follow()
    assert proxy.log.events("stopping now") == []
    assert [m.content for m in mta.messages] == [b"Subject: group\r\n\r\nbefore\r\nafter\r\n"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PIPEPROXY, *args], capture_output=True, text=True, timeout=60, env=clean_environ())


async def test_a_second_instance_with_workers_on_a_busy_port_fails_with_status_2(nursery, pipeproxy_process):
    """SO_REUSEPORT would let it share the port silently, splitting mail between two configurations."""
    proxy = await pipeproxy_process(await start_legacy(nursery, LegacyMTA()), PIPEPROXY_WORKERS="2")
    for workers in ("2", "1"):
        second = await trio.to_thread.run_sync(
            run_cli, "--listen", str(proxy.address), "--upstream", "127.0.0.1:25", "--workers", workers)
        assert second.returncode == 2
        assert second.stderr == f"pipeproxy: error: cannot listen on {proxy.address}: Address already in use\n"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_busy_health_port_is_named_and_gives_status_2(workers):
    with socket.socket() as taken:
        taken.bind((LOCALHOST, 0))
        taken.listen()
        busy = f"{LOCALHOST}:{taken.getsockname()[1]}"
        result = run_cli("--listen", f"{LOCALHOST}:0", "--upstream", "127.0.0.1:25", "--health-listen", busy,
                         "--workers", workers)
    assert (result.returncode, result.stderr) == (2, f"pipeproxy: error: cannot listen on {busy}: "
                                                     "Address already in use\n")


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sighup_reloads_logs_and_serves_on(nursery, pipeproxy_process, workers):
    mta = LegacyMTA()
    proxy = await pipeproxy_process(await start_legacy(nursery, mta), PIPEPROXY_WORKERS=workers)
    await all_listening(proxy, int(workers))
    proxy.process.send_signal(signal.SIGHUP)
    reloads = [await proxy.log.until("reload")]
    if workers == "2":  # the parent's line, then each worker's
        reloads += [await proxy.log.until("reload"), await proxy.log.until("reload")]
        assert sorted(line.get("worker", -1) for line in reloads) == [-1, 0, 1]
    assert all((line["signal"], line["reloaded"]) == ("SIGHUP", []) for line in reloads)
    client = await open_session(proxy.address)
    await client.send(b"QUIT\r\n")
    assert (await client.reply()).code == 221
    assert proxy.process.returncode is None
    assert await proxy.stop() == 0


def title(pid: int) -> str:
    """What `ps -o args` shows for ``pid``."""
    return subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()


async def test_a_killed_worker_is_restarted_and_serves(nursery, pipeproxy_process):
    mta = LegacyMTA()
    proxy = await pipeproxy_process(await start_legacy(nursery, mta), PIPEPROXY_WORKERS="2")
    await all_listening(proxy, 2)
    [started] = proxy.log.events("workers started")
    first, second = started["workers"]
    assert [title(proxy.pid), title(first), title(second)] == [
        "pipeproxy: parent", "pipeproxy: worker 0", "pipeproxy: worker 1"]

    os.kill(first, signal.SIGKILL)
    died = await proxy.log.until("worker died, restarting")
    assert (died["worker"], died["pid"], died["exitcode"]) == (0, first, -signal.SIGKILL)
    assert died["delay"] > 0
    replaced = await proxy.log.until("worker started")
    assert replaced["worker"] == 0 and replaced["pid"] != first
    assert (await proxy.log.until("listening"))["worker"] == 0
    assert title(replaced["pid"]) == "pipeproxy: worker 0"
    for _ in range(10):
        client = await open_session(proxy.address)
        await client.send(b"QUIT\r\n")
        assert (await client.reply()).code == 221
        await client.aclose()
    assert proxy.process.returncode is None
    assert await proxy.stop() == 0


async def test_the_first_line_says_the_version_and_every_setting(nursery, pipeproxy_process):
    from importlib.metadata import version

    proxy = await pipeproxy_process(await start_legacy(nursery, LegacyMTA()), PIPEPROXY_MAX_SESSIONS="7")
    first = proxy.log.lines[0]
    assert (first["event"], first["version"], first["pid"]) == ("starting", version("pipeproxy"), proxy.pid)
    # The process imports what this one does: the sources, or the compiled build (test_compiled.py).
    assert first["core"] == ("python" if session.__file__.endswith(".py") else "compiled")
    assert set(first["settings"]) == set(settings())
    assert first["settings"]["max_sessions"] == 7 and first["settings"]["listen"] == "127.0.0.1:0"
    assert first["settings"]["timeouts"]["data_end"] == 600
    assert await proxy.stop() == 0


def test_secret_settings_are_redacted():
    config = Config(log_addresses="hash", log_hash_key="s3cret-key")
    shown = runner.effective_settings(config)
    assert shown["log_hash_key"] == "<redacted>" and "s3cret-key" not in repr(shown)
    assert shown["log_addresses"] == "hash" and shown["listen"] == "127.0.0.1:2525"



def write_pair(ca, name: str, cert: str, key: str) -> None:
    issued = ca.issue_cert(name)
    with open(cert, "wb") as out:
        out.write(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(key)


async def starttls(address: Address, context) -> tuple[Peer, trio.SSLStream, str]:
    """A session at ``address`` in TLS: (its clear peer, its TLS stream, the certificate's name)."""
    client = await open_session(address)
    await client.send(b"STARTTLS\r\n")
    assert (await client.reply()).code == 220
    stream = trio.SSLStream(client.stream, context, server_hostname=None)
    await stream.do_handshake()
    der = stream.getpeercert(binary_form=True)
    name = next(each for each in (b"old.pipeproxy.test", b"new.pipeproxy.test") if each in der)
    return client, stream, name.decode()


async def tls_reply(stream: trio.SSLStream) -> bytes:
    """One whole reply, multi-line or not, read inside TLS."""
    data = b""
    while not re.search(rb"(^|\r\n)\d{3}( [^\r\n]*)?\r\n$", data):
        data += await stream.receive_some(65536)
    return data


async def test_sighup_reloads_the_certificate_while_a_tls_session_goes_on(nursery, pipeproxy_process, ca, tmp_path):
    """Certificate rotation: the open TLS session goes on with the old certificate, a new
    session gets the new one; a bad new pair is logged and the current one kept."""
    import ssl

    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    write_pair(ca, "old.pipeproxy.test", cert, key)
    mta = LegacyMTA()
    proxy = await pipeproxy_process(await start_legacy(nursery, mta), PIPEPROXY_TLS_CERT=cert, PIPEPROXY_TLS_KEY=key)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    _, old_session, name = await starttls(proxy.address, context)
    assert name == "old.pipeproxy.test"

    write_pair(ca, "new.pipeproxy.test", cert, key)
    proxy.process.send_signal(signal.SIGHUP)
    reload = await proxy.log.until("reload")
    assert reload["reloaded"] == ["tls certificate"]
    # The open session goes on, inside the TLS it had.
    await old_session.send_all(b"EHLO client.test\r\n")
    assert (await tls_reply(old_session)).startswith(b"250-")
    await old_session.send_all(b"".join(envelope_lines("s@client.test", ["r@legacy.test"])))
    replies = b""
    while replies.count(b"\r\n") < 3:
        replies += await old_session.receive_some(65536)
    assert [line[:3] for line in replies.split(b"\r\n")[:3]] == [b"250", b"250", b"354"]
    await old_session.send_all(b"Subject: rotated\r\n\r\nhi\r\n.\r\n")
    assert (await tls_reply(old_session)).startswith(b"250")
    assert len(mta.messages) == 1
    _, new_session, name = await starttls(proxy.address, context)
    assert name == "new.pipeproxy.test"

    # A key that is not the certificate's: logged, and the new sessions keep the current pair.
    other = ca.issue_cert("other.pipeproxy.test")
    other.private_key_pem.write_to_path(key)
    proxy.process.send_signal(signal.SIGHUP)
    reload = await proxy.log.until("reload")
    assert reload["reloaded"] == []
    assert proxy.log.events("reload failed"), "the bad pair is logged"
    _, third, name = await starttls(proxy.address, context)
    assert name == "new.pipeproxy.test"
    assert proxy.process.returncode is None
    for stream in (old_session, new_session, third):
        await stream.aclose()
    assert await proxy.stop() == 0
