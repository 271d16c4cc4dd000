"""TLS toward clients over real sockets: smtplib's starttls() and SMTP_SSL, swaks --tls
--pipeline and openssl s_client, to the strict legacy MTA, which knows nothing of TLS.

Certificates come from trustme, a test CA made for each test.
"""

from __future__ import annotations

import shutil
import smtplib
import ssl
import subprocess

import pytest
import structlog
import trio
import trustme

from pipeproxy.core.config import Address, Config
from pipeproxy.demo.client import envelope_lines
from pipeproxy.demo.legacy_mta import LegacyMTA
from pipeproxy.shell.server import serve

from peers import LOCALHOST, Peer, WrappedStream, start_legacy

RECIPIENTS = [f"r{i}@legacy.test" for i in range(10)]


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def start_tls_proxy(nursery: trio.Nursery, mta: LegacyMTA, files: tuple[str, str], **overrides) -> list[Address]:
    """pipeproxy with TLS before ``mta``: [its STARTTLS address, its implicit TLS address]."""
    config = Config(
        listen=Address(LOCALHOST, 0),
        upstream=await start_legacy(nursery, mta),
        tls_cert=files[0],
        tls_key=files[1],
        tls_listen=(Address(LOCALHOST, 0),),
        **overrides,
    )
    listeners = await nursery.start(serve, config)
    return [Address(LOCALHOST, listener.socket.getsockname()[1]) for listener in listeners]


def send_with_smtplib(address: Address, context: ssl.SSLContext, implicit: bool) -> dict[str, tuple[int, bytes]]:
    if implicit:
        client: smtplib.SMTP = smtplib.SMTP_SSL(address.host, address.port, context=context, timeout=30)
    else:
        client = smtplib.SMTP(address.host, address.port, timeout=30)
        client.ehlo()
        assert "auth" not in client.esmtp_features, "AUTH is for encrypted sessions"
        client.starttls(context=context)
    client.ehlo()
    assert "pipelining" in client.esmtp_features and "starttls" not in client.esmtp_features
    refused = client.sendmail("s@client.test", RECIPIENTS, b"Subject: over TLS\r\n\r\nhello\r\n")
    client.quit()
    return refused


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
async def test_smtplib_sends_over_tls_and_the_legacy_mta_gets_it_lock_step(nursery, ca, tls_files, implicit):
    mta = LegacyMTA()
    starttls, implicit_tls = await start_tls_proxy(nursery, mta, tls_files)
    with structlog.testing.capture_logs() as logs:
        refused = await trio.to_thread.run_sync(
            send_with_smtplib, implicit_tls if implicit else starttls, client_context(ca), implicit
        )
    assert refused == {}
    assert len(mta.messages) == 1 and mta.messages[0].recipients == RECIPIENTS
    assert mta.violations == []
    [established] = [line for line in logs if line["event"] == "tls established"]
    assert established["version"].startswith("TLSv1.")
    [transaction] = [line for line in logs if line["event"] == "transaction"]
    assert transaction["tls"]["version"] == established["version"]


async def test_plaintext_sent_after_starttls_is_never_answered_inside_tls(nursery, ca, tls_files):
    """CVE-2011-0411 over a socket: the NOOP and RSET sent with STARTTLS are gone; the first
    reply inside TLS is the one to the client's EHLO, and the MTA never saw them."""
    mta = LegacyMTA()
    starttls, _ = await start_tls_proxy(nursery, mta, tls_files)
    client = await Peer.connect(starttls)
    assert (await client.reply()).code == 220
    await client.send(b"EHLO client.test\r\n")
    assert b"STARTTLS" in b" ".join(line.encode() for line in (await client.reply()).lines)
    await client.send(b"STARTTLS\r\nNOOP\r\nRSET\r\n")
    assert (await client.reply()).code == 220
    tls = trio.SSLStream(client.stream, client_context(ca), server_hostname="localhost")
    await tls.do_handshake()
    await tls.send_all(b"EHLO client.test\r\n")
    first = b""
    while not first.endswith(b"250 PIPELINING\r\n"):
        first += await tls.receive_some()
    assert first.startswith(b"250-legacy.test"), first
    await tls.send_all(b"QUIT\r\n")
    assert (await tls.receive_some()).startswith(b"221")
    assert "NOOP" not in mta.commands and "RSET" not in mta.commands


async def test_a_handshake_that_fails_or_never_comes_costs_nothing_and_is_logged(nursery, tls_files, autojump_clock):
    mta = LegacyMTA()
    _, implicit_tls = await start_tls_proxy(nursery, mta, tls_files)
    with structlog.testing.capture_logs() as logs:
        garbage = await Peer.connect(implicit_tls)
        await garbage.send(b"EHLO i do not speak TLS\r\n")
        assert await garbage.rest() == b""
        silent = await Peer.connect(implicit_tls)
        assert await silent.rest() == b"", "closed after the handshake timeout"
    failures = [line for line in logs if line["event"] == "tls handshake failed"]
    assert len(failures) == 2 and "in time" in failures[1]["reason"]
    assert mta.connections == 0, "no upstream session for a client that never got through TLS"


@pytest.mark.peers
@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed (.ci/setup installs it)")
@pytest.mark.parametrize("mode", ["--tls", "--tlsc"])
async def test_swaks_pipelines_inside_tls_and_the_mta_sees_one_command_at_a_time(nursery, tls_files, mode):
    mta = LegacyMTA(reply_delay=0.002)
    starttls, implicit_tls = await start_tls_proxy(nursery, mta, tls_files)
    target = starttls if mode == "--tls" else implicit_tls
    result = await trio.run_process(
        ["swaks", "--server", target.host, "--port", str(target.port), mode, "--pipeline", "--hide-all",
         "--from", "s@client.test", "--to", ",".join(RECIPIENTS), "--helo", "client.test"],
        stdin=subprocess.DEVNULL, capture_stdout=True, capture_stderr=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert len(mta.messages) == 1 and len(mta.messages[0].recipients) == 10
    assert mta.violations == []


@pytest.mark.peers
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
async def test_openssl_s_client_starttls_smtp(nursery, tls_files):
    mta = LegacyMTA()
    starttls, _ = await start_tls_proxy(nursery, mta, tls_files)
    # -crlf turns each LF it reads into CRLF: the input has bare LFs for that reason.
    result = await trio.run_process(
        ["openssl", "s_client", "-starttls", "smtp", "-crlf", "-quiet", "-connect", f"{starttls.host}:{starttls.port}"],
        stdin=b"EHLO client.test\nQUIT\n", capture_stdout=True, capture_stderr=True, check=False,
    )
    assert b"250 PIPELINING" in result.stdout and b"221" in result.stdout, result.stdout + result.stderr


async def test_a_client_without_tls_support_still_sends_in_clear_when_tls_is_optional(nursery, tls_files):
    mta = LegacyMTA()
    starttls, _ = await start_tls_proxy(nursery, mta, tls_files)
    client = await Peer.connect(starttls)
    await client.reply()
    await client.send(b"EHLO client.test\r\n")
    await client.reply()
    await client.send(b"".join(envelope_lines("s@client.test", ["r@legacy.test"])) + b"hi\r\n.\r\n")
    assert [reply.code for reply in await client.replies(4)] == [250, 250, 354, 250]
    assert len(mta.messages) == 1


class _HeaderFirst(WrappedStream):
    """A load balancer's side of a connection: its PROXY header, then the client's first
    bytes (here the TLS ClientHello) in the same write, as one TCP segment."""

    def __init__(self, inner: trio.SocketStream, header: bytes) -> None:
        super().__init__(inner)
        self.header = header

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        data, self.header = self.header + bytes(data), b""
        await self.inner.send_all(data)


async def test_implicit_tls_behind_a_proxy_header_keeps_the_client_hello_sent_with_it(nursery, ca, tls_files):
    """The bytes read with the PROXY header are the start of the TLS handshake: they were
    handed to the session as cleartext after a handshake that could not complete."""
    mta = LegacyMTA()
    _, implicit = await start_tls_proxy(nursery, mta, tls_files, proxy_protocol=True)
    tcp = await trio.open_tcp_stream(*implicit)
    header = b"PROXY TCP4 203.0.113.7 10.0.0.1 4242 465\r\n"
    tls = trio.SSLStream(_HeaderFirst(tcp, header), client_context(ca), server_hostname="localhost")
    with structlog.testing.capture_logs() as logs, trio.fail_after(10):
        await tls.do_handshake()
        greeting = b""
        while not greeting.endswith(b"\r\n"):
            greeting += await tls.receive_some()
        await tls.send_all(b"QUIT\r\n")
        assert (await tls.receive_some()).startswith(b"221")
    assert greeting.startswith(b"220 "), greeting
    [opened] = [line for line in logs if line["event"] == "session open"]
    assert opened["client"] == "203.0.113.7:4242"
