"""Real third-party peers: swaks as a pipelining client, a real Postfix as the legacy MTA.

Postfix is configured to refuse early input (tests/postfix.py). Each claim has a control
that shows the check can fail: the same burst sent straight at that Postfix is refused.
"""

from __future__ import annotations

import shutil
import socket
import uuid

import pytest
import trio

from pipeproxy.core.config import Address
from pipeproxy.demo.client import envelope_lines
from pipeproxy.demo.legacy_mta import LegacyMTA

from peers import start_legacy, start_proxy

pytestmark = pytest.mark.peers

RECIPIENTS = [f"user{i}@legacy.test" for i in range(1, 11)]
IMPROPER = "improper command pipelining"
HELO_FALLBACK = 'replacing command "EHLO client.test" with "XEHLO client.test"'


async def swaks(port: int, recipients: list[str], subject: str) -> str:
    """Run swaks --pipeline; its transcript, or a failure that shows it."""
    if shutil.which("swaks") is None:
        pytest.fail("swaks is not installed: run .ci/setup")
    result = await trio.run_process(
        ["swaks", "--server", "127.0.0.1", "--port", str(port), "--pipeline", "--helo", "client.test",
         "--from", "sender@client.test", "--to", ",".join(recipients), "--header", f"Subject: {subject}"],
        stdin=b"", capture_stdout=True, capture_stderr=True, check=False,
    )
    transcript = result.stdout.decode()
    assert result.returncode == 0, transcript + result.stderr.decode()
    return transcript


def pipelined(transcript: str) -> bool:
    """swaks sent DATA before it read the reply to MAIL."""
    lines = transcript.splitlines()
    data_sent = lines.index(" -> DATA")
    mail_answered = next(i for i, line in enumerate(lines) if line.startswith("<-  250 2.1.0"))
    return data_sent < mail_answered


def burst_straight_at(port: int, greeting_verb: bytes) -> bytes:
    """A raw client: HELO/EHLO, then MAIL, RCPT and DATA in one write; what comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        stream = sock.makefile("rb")
        stream.readline()
        sock.sendall(greeting_verb + b" client.test\r\n")
        while stream.readline()[3:4] == b"-":
            pass
        sock.sendall(b"".join(envelope_lines("sender@client.test", RECIPIENTS[:2])))
        return stream.read()


async def test_swaks_pipelines_through_pipeproxy_to_the_strict_legacy_mta(nursery):
    """swaks sees PIPELINING and uses it; the strict upstream never sees an early byte."""
    mta = LegacyMTA(reply_delay=0.002)
    proxy = await start_proxy(nursery, await start_legacy(nursery, mta))
    transcript = await swaks(proxy.port, RECIPIENTS, "strict")
    assert pipelined(transcript), transcript
    assert mta.violations == []
    assert [m.recipients for m in mta.messages] == [RECIPIENTS]


@pytest.mark.parametrize("mode", ["esmtp", "helo_only"])
async def test_swaks_delivers_ten_recipients_through_pipeproxy_to_postfix(nursery, request, mode):
    """Pipelined by swaks, lock-step to Postfix: ten copies delivered, no pipelining complaint."""
    postfix = request.getfixturevalue(f"postfix_{mode}")
    complaints_before = postfix.maillog.count(IMPROPER)
    fallbacks_before = postfix.maillog.count(HELO_FALLBACK)
    proxy = await start_proxy(nursery, Address("127.0.0.1", postfix.port))
    subject = f"pipeproxy {mode} {uuid.uuid4().hex}"
    transcript = await swaks(proxy.port, RECIPIENTS, subject)
    assert pipelined(transcript), transcript
    delivered = await trio.to_thread.run_sync(postfix.wait_delivered, subject, len(RECIPIENTS))
    assert sorted(m["Delivered-To"] for m in delivered) == sorted(RECIPIENTS)
    assert postfix.maillog.count(IMPROPER) == complaints_before
    if mode == "helo_only":  # this session's EHLO was refused, so pipeproxy said HELO
        assert postfix.maillog.count(HELO_FALLBACK) == fallbacks_before + 1


async def test_postfix_refuses_the_same_burst_sent_straight_at_it(postfix_helo_only):
    """The control: without pipeproxy, Postfix catches MAIL/RCPT/DATA sent in one write."""
    complaints_before = postfix_helo_only.maillog.count(IMPROPER)
    answer = await trio.to_thread.run_sync(burst_straight_at, postfix_helo_only.port, b"HELO")
    assert answer.startswith(b"554 5.5.0 Error: SMTP protocol synchronization")
    await trio.sleep(0.2)  # the maillog is written by postlogd, a moment later
    assert postfix_helo_only.maillog.count(IMPROPER) > complaints_before


async def test_postfix_esmtp_catches_input_sent_with_ehlo(postfix_esmtp):
    """The ESMTP control: Postfix checks after EHLO, so EHLO and MAIL in one write is refused."""
    def ehlo_and_mail() -> bytes:
        with socket.create_connection(("127.0.0.1", postfix_esmtp.port), timeout=30) as sock:
            stream = sock.makefile("rb")
            stream.readline()
            sock.sendall(b"EHLO client.test\r\nMAIL FROM:<sender@client.test>\r\n")
            return stream.read()

    answer = await trio.to_thread.run_sync(ehlo_and_mail)
    assert b"554 5.5.0 Error: SMTP protocol synchronization" in answer
