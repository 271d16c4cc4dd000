"""The trio shell around one session: no peer can hold it for ever, and the order of what
the core says is the order on the wire, whatever the timing of both sides.

Found in reviews (core v2; writes at the end of the event loop's turn); each test failed
before its fix.
"""

from __future__ import annotations

import os
import re
import ssl

import structlog
import trio
import trio.testing

from pipeproxy.core.config import Config, Timeouts
from pipeproxy.core.events import Event, UpstreamConnected
from pipeproxy.shell.connection import Connection
from pipeproxy.shell.tls import ServerTls

from peers import Peer, WrappedStream, open_session, start_proxy, start_upstream
from test_faults import greet_and_accept_envelope, greet_and_ehlo, reset


async def test_an_upstream_that_stops_reading_mid_message_cannot_hang_the_session(nursery, autojump_clock):
    """The upstream takes the envelope and says 354, then never reads again (a stuck or
    black-holed MTA). The write to it must give up, so the session's 421 and close happen."""

    async def stop_reading(peer: Peer) -> None:
        await greet_and_accept_envelope(peer)
        await trio.sleep_forever()

    timeouts = Timeouts(data_block=60.0)
    proxy = await start_proxy(nursery, await start_upstream(nursery, stop_reading), timeouts=timeouts)
    client = await open_session(proxy)
    await client.send(b"MAIL FROM:<s@x>\r\nRCPT TO:<r@x>\r\nDATA\r\n")
    assert [reply.code for reply in await client.replies(3)] == [250, 250, 354]

    async def flood() -> None:
        line = b"x" * 998 + b"\r\n"
        try:
            while True:
                await client.send(line * 64)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the proxy closed: what the test waits for

    nursery.start_soon(flood)
    with trio.fail_after(3600):  # virtual time: a hang shows as this, never as a slow test
        rest = await client.rest()
    assert rest.startswith(b"421 4.4.2"), rest


class _StallThenReset(WrappedStream):
    """pipeproxy's end of an upstream that stalls on the second RCPT for 2 s, then resets."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if bytes(data).startswith(b"RCPT TO:<r2@"):
            await trio.sleep(2)
            raise trio.BrokenResourceError("reset")
        await self.inner.send_all(data)


async def test_replies_already_given_go_out_before_the_421s_of_a_failure_that_follows(autojump_clock):
    """MAIL and RCPT 1 are answered and held; the write of RCPT 2 stalls, and meanwhile the
    hold time sends the held 250s on their way; then that write fails. The 421s for RCPT 2
    and DATA must come after the 250s the upstream really gave, never instead of them."""
    proxy_side, upstream_side = trio.testing.memory_stream_pair()
    client, proxy_client = trio.testing.memory_stream_pair()

    class Stalling(Connection):
        async def _connect(self) -> Event:
            self._use_upstream(_StallThenReset(proxy_side))
            return UpstreamConnected()

    async def upstream() -> None:
        await upstream_side.send_all(b"220 legacy.test\r\n")
        received = b""
        while data := await upstream_side.receive_some():
            received += data
            while b"\r\n" in received:
                _, received = received.split(b"\r\n", 1)
                await trio.sleep(0.01)
                await upstream_side.send_all(b"250 ok\r\n")

    got = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Stalling(proxy_client, Config(hold_time=1.0)).serve)
        nursery.start_soon(upstream)
        await client.send_all(b"EHLO c\r\n")
        while not got.endswith(b"PIPELINING\r\n"):
            got += await client.receive_some()
        got = b""
        await client.send_all(b"MAIL FROM:<s@x>\r\nRCPT TO:<r1@x>\r\nRCPT TO:<r2@x>\r\nDATA\r\n")
        with trio.move_on_after(30):
            while data := await client.receive_some():
                got += data
        nursery.cancel_scope.cancel()
    codes = [line[:3] for line in got.split(b"\r\n") if line]
    assert codes == [b"250", b"250", b"421", b"421"], got


async def test_an_upstream_reset_found_by_a_write_ends_the_session_with_421s_and_no_error(nursery):
    """The upstream answers MAIL and resets at once: the write of RCPT finds the reset and
    the shell closes that socket. Its reader then waited for readability on the closed
    socket (fd -1): a ValueError, logged as 'session failed' after the clean close."""

    async def answer_mail_then_reset(peer: Peer) -> None:
        await greet_and_ehlo(peer)
        assert (await peer.line()).startswith(b"MAIL")
        os.write(peer.stream.socket.fileno(), b"250 Ok\r\n")  # and the reset: no checkpoint between
        reset(peer)

    proxy = await start_proxy(nursery, await start_upstream(nursery, answer_mail_then_reset))
    with structlog.testing.capture_logs() as logs:
        client = await open_session(proxy)
        await client.send(b"MAIL FROM:<s@x>\r\nRCPT TO:<r@x>\r\nDATA\r\n")
        with trio.fail_after(10):
            rest = await client.rest()
        await trio.sleep(0.1)  # the session's last lines
    assert rest.startswith(b"250 Ok\r\n421 4.4.2"), rest
    assert [line for line in logs if line["log_level"] == "error"] == []
    assert "session closed" in [line["event"] for line in logs]


async def test_starttls_after_a_client_write_that_timed_out_waits_for_no_handshake(nursery, tls_files, autojump_clock):
    """The client pipelines NOOP and STARTTLS and reads nothing more: the NOOP reply's write
    times out, the client is gone, and the session ends then, not a handshake's time later."""

    async def upstream_script(peer: Peer) -> None:
        await greet_and_ehlo(peer)
        assert await peer.line() == b"NOOP\r\n"
        await peer.send(b"250 Ok\r\n")
        await trio.sleep_forever()

    cert, key = tls_files
    config = Config(
        upstream=await start_upstream(nursery, upstream_script), tls_cert=cert, tls_key=key,
        timeouts=Timeouts(client_idle=10.0, tls_handshake=1000.0),
    )
    client_stream, proxy_stream = trio.testing.lockstep_stream_pair()  # no buffer: a write waits for a read
    connection = Connection(proxy_stream, config, tls=ServerTls(config))
    ended = trio.Event()

    async def serve() -> None:
        await connection.serve()
        ended.set()

    async def reply() -> bytes:
        data = b""
        while not re.search(rb"(^|\n)\d{3} [^\r\n]*\r\n$", data):
            data += await client_stream.receive_some()
        return data

    nursery.start_soon(serve)
    assert (await reply()).startswith(b"220 ")
    await client_stream.send_all(b"EHLO client.test\r\n")
    assert (await reply()).startswith(b"250")
    await client_stream.send_all(b"NOOP\r\nSTARTTLS\r\n")
    started = trio.current_time()
    await ended.wait()
    assert trio.current_time() - started < 100  # client_idle (10 s), not the handshake's 1000 s


async def test_cleartext_read_while_starttls_waits_never_reaches_the_session_inside_tls(nursery, tls_files, ca):
    """CVE-2011-0411's shape, through the shell: the client pipelines NOOP and STARTTLS and,
    before reading the NOOP's reply, injects a command in clear. The client reader reads it
    while the STARTTLS actions hold the lock (their write waits for the client to read), so
    its event waits behind them; by then the stream it came from has been replaced by TLS."""
    upstream_lines: list[bytes] = []

    async def upstream_script(peer: Peer) -> None:
        await greet_and_ehlo(peer)
        assert await peer.line() == b"NOOP\r\n"
        await peer.send(b"250 Ok\r\n")
        while line := await peer.line():
            upstream_lines.append(line)
            await peer.send(b"250-legacy.test\r\n250 8BITMIME\r\n" if line.startswith(b"EHLO") else b"250 Ok\r\n")

    cert, key = tls_files
    config = Config(upstream=await start_upstream(nursery, upstream_script), tls_cert=cert, tls_key=key)
    client_stream, proxy_stream = trio.testing.lockstep_stream_pair()  # no buffer: a write waits for a read
    nursery.start_soon(Connection(proxy_stream, config, tls=ServerTls(config)).serve)
    received = b""

    async def reply() -> bytes:
        nonlocal received
        while not (end := re.search(rb"(^|\n)\d{3} [^\r\n]*\r\n", received)):
            received += await client_stream.receive_some()
        answer, received = received[: end.end()], received[end.end() :]
        return answer

    assert (await reply()).startswith(b"220 ")
    await client_stream.send_all(b"EHLO client.test\r\n")
    assert (await reply()).startswith(b"250")
    await client_stream.send_all(b"NOOP\r\nSTARTTLS\r\n")
    await trio.testing.wait_all_tasks_blocked()  # the NOOP's 250 waits for the client to read
    await client_stream.send_all(b"RSET injected-in-clear\r\n")
    assert (await reply()).startswith(b"250 ")
    assert (await reply()).startswith(b"220 ")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    tls = trio.SSLStream(client_stream, context, server_hostname="localhost")
    await tls.do_handshake()
    await tls.send_all(b"EHLO client.test\r\nQUIT\r\n")
    while await tls.receive_some():  # to the session's end: everything sent upstream is in
        pass
    assert upstream_lines[0].startswith(b"EHLO"), upstream_lines
    assert not any(b"injected" in line for line in upstream_lines), upstream_lines
