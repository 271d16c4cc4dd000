"""TLS toward the upstream against a real Postfix offering STARTTLS (``postfix_tls``:
``smtpd_tls_security_level = may`` with a trustme certificate for localhost and
legacy.test): each of --upstream-tls may, encrypt and verify delivers a pipelined
message over TLS, which Postfix's maillog shows; verify refuses a certificate whose name
is not the upstream's.
"""

from __future__ import annotations

import uuid

import pytest
import structlog
import trio
from test_front_door_postfix import logged

from pipeproxy.core.config import Address
from pipeproxy.demo.client import envelope_lines

from peers import Peer, start_proxy

pytestmark = pytest.mark.peers


async def send_one(proxy: Address, subject: str) -> list[int]:
    """EHLO, then a pipelined transaction through ``proxy``: every reply code."""
    peer = await Peer.connect(proxy)
    async with peer.stream:
        codes = [(await peer.reply()).code]
        await peer.send(b"EHLO client.test\r\n")
        ehlo = await peer.reply()
        codes.append(ehlo.code)
        if ehlo.code != 250:
            return codes
        assert not any(line.upper().startswith("STARTTLS") for line in ehlo.lines), "the MTA's STARTTLS is not relayed"
        commands = envelope_lines("s@client.test", ["user1@legacy.test", "user2@legacy.test"])
        await peer.send(b"".join(commands))
        codes += [reply.code for reply in await peer.replies(len(commands))]
        if codes[-1] == 354:
            await peer.send(f"Subject: {subject}\r\n\r\nover TLS\r\n.\r\n".encode())
            codes.append((await peer.reply()).code)
        await peer.send(b"QUIT\r\n")
        codes.append((await peer.reply()).code)
    return codes


@pytest.mark.parametrize("mode", ["may", "encrypt", "verify"])
async def test_each_mode_delivers_over_tls_and_postfix_logs_the_tls_session(nursery, postfix_tls, mode):
    postfix = postfix_tls
    # verify checks the name: the certificate is for localhost, so the upstream is named so.
    upstream = Address("localhost" if mode == "verify" else "127.0.0.1", postfix.port)
    extra = {"upstream_tls_ca": postfix.ca_file} if mode == "verify" else {}
    proxy = await start_proxy(nursery, upstream, upstream_tls=mode, **extra)
    subject = f"upstream tls {mode} {uuid.uuid4().hex}"
    with structlog.testing.capture_logs() as logs:
        codes = await send_one(proxy, subject)
    assert codes == [220, 250, 250, 250, 250, 354, 250, 221]
    [established] = [line for line in logs if line["event"] == "upstream tls established"]
    assert established["version"].startswith("TLSv1.")
    delivered = await trio.to_thread.run_sync(postfix.wait_delivered, subject, 2)
    assert len(delivered) == 2
    assert "with ESMTPS" in " ".join(delivered[0]["Received"].split()), delivered[0]["Received"]
    assert await logged(postfix, r"TLS connection established from \S+\[127\.0\.0\.1\]")


async def test_verify_refuses_a_certificate_for_another_name_with_421(nursery, postfix_tls):
    """The certificate names localhost and legacy.test; reached as 127.0.0.1 it is not the
    upstream's, so the client's EHLO gets 421 and nothing of the client's goes upstream."""
    postfix = postfix_tls
    proxy = await start_proxy(
        nursery, Address("127.0.0.1", postfix.port), upstream_tls="verify", upstream_tls_ca=postfix.ca_file
    )
    with structlog.testing.capture_logs() as logs:
        codes = await send_one(proxy, "never")
    assert codes == [220, 421]
    [failed] = [line for line in logs if line["event"] == "upstream tls failed"]
    assert failed["action"] == "closed" and "certificate verify failed" in failed["reason"], failed
    assert "IP address mismatch" in failed["reason"] or "mismatch" in failed["reason"], failed


async def test_verify_without_the_ca_refuses_the_self_made_certificate(nursery, postfix_tls):
    postfix = postfix_tls
    proxy = await start_proxy(nursery, Address("localhost", postfix.port), upstream_tls="verify")
    with structlog.testing.capture_logs() as logs:
        codes = await send_one(proxy, "never")
    assert codes == [220, 421]
    [failed] = [line for line in logs if line["event"] == "upstream tls failed"]
    assert "certificate verify failed" in failed["reason"], failed


async def test_may_goes_on_in_clear_with_a_postfix_without_tls(nursery, postfix_esmtp):
    proxy = await start_proxy(nursery, Address("127.0.0.1", postfix_esmtp.port), upstream_tls="may")
    subject = f"upstream tls may clear {uuid.uuid4().hex}"
    assert await send_one(proxy, subject) == [220, 250, 250, 250, 250, 354, 250, 221]
    assert len(await trio.to_thread.run_sync(postfix_esmtp.wait_delivered, subject, 2)) == 2


async def test_encrypt_fails_closed_with_a_postfix_without_tls(nursery, postfix_esmtp):
    proxy = await start_proxy(nursery, Address("127.0.0.1", postfix_esmtp.port), upstream_tls="encrypt")
    assert await send_one(proxy, "never") == [220, 421]
