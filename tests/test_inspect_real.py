"""``pipeproxy inspect`` over logs that real sessions wrote: pipeproxy as a process, in front
of the bundled strict MTA and of a real Postfix, then its log inspected as an operator would.

The per-recipient fields (recipients, helo, queue_id, ...) come with the log fields of
issue 11 part 1; these tests check them when the log has them and what every log has
otherwise, so they hold on either side of that change.
"""

from __future__ import annotations

import json
import smtplib
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from pipeproxy.core.config import Address
from pipeproxy.demo.legacy_mta import LegacyMTA

from peers import start_legacy

MESSAGE = b"Subject: inspect\r\nMessage-ID: <inspect-1@client.test>\r\n\r\nhello\r\n"


def send(address: Address, recipients: list[list[str]]) -> list[Any]:
    """One session: a message to each list of recipients; what smtplib said of each."""
    said: list[Any] = []
    with smtplib.SMTP(address.host, address.port, local_hostname="client.test", timeout=30) as smtp:
        for listed in recipients:
            try:
                said.append(smtp.sendmail("s@client.test", listed, MESSAGE))
            except smtplib.SMTPRecipientsRefused as refused:
                said.append(refused.recipients)
                smtp.rset()
    return said


async def inspect(*args: str) -> str:
    result = await trio.run_process([sys.executable, "-m", "pipeproxy", "inspect", *args],
                                    capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr
    assert b"Traceback" not in result.stderr
    return result.stdout.decode()


async def logged_sessions(tmp_path: Path, proxy, sessions: int) -> Path:
    """The proxy's log, once ``sessions`` sessions have closed, as the file an operator has."""
    for _ in range(sessions):
        await proxy.log.until("session closed")
    path = tmp_path / "pipeproxy.log"
    path.write_text("".join(json.dumps(line) + "\n" for line in proxy.log.lines))
    return path


async def test_real_sessions_through_pipeproxy_inspected(nursery, pipeproxy_process, tmp_path):
    mta = LegacyMTA(reply_delay=0.002)
    proxy = await pipeproxy_process(await start_legacy(nursery, mta))
    said = await trio.to_thread.run_sync(send, proxy.address, [["a@legacy.test", "reject-me@legacy.test"],
                                                               ["reject-too@legacy.test"]])
    assert list(said[0]) == ["reject-me@legacy.test"] and list(said[1]) == ["reject-too@legacy.test"]
    await trio.to_thread.run_sync(send, proxy.address, [["b@legacy.test"]])
    log = await logged_sessions(tmp_path, proxy, 2)
    [first, second, third] = [line for line in proxy.log.lines if line["event"] == "transaction"]

    # the table: a line per transaction, in order
    rows = (await inspect("--no-header", str(log))).splitlines()
    assert len(rows) == 3
    assert first["session"] in rows[0] and "s@client.test" in rows[0] and "1/1" in rows[0]
    assert "message accepted" in rows[0] and "250 " in rows[0]
    assert second["outcome"] in rows[1] and "0/1" in rows[1]
    assert third["session"] in rows[2] and third["session"] != first["session"]

    # JSON, filtered
    records = [json.loads(line) for line in (await inspect("--json", "-f", "~outcome accepted", str(log))).splitlines()]
    assert [record["session"] for record in records] == [first["session"], third["session"]]
    record = records[0]
    assert (record["sender"], record["recipients_accepted"], record["recipients_rejected"]) == ("s@client.test", 1, 1)
    assert record["reply_code"] == 250 and record["client"].startswith("127.0.0.1:")
    if record["recipients"] is not None:  # the per-recipient fields are logged
        assert [(r["address"], r["code"]) for r in record["recipients"]] == [
            ("a@legacy.test", 250), ("reject-me@legacy.test", 550)]
        assert "Recipient address rejected" in record["recipients"][1]["reply"]
        assert record["helo"] == "client.test"

    # each filter term over the real log
    async def sessions_picked(expression: str) -> list[str]:
        out = await inspect("--json", "-f", expression, str(log))
        return [json.loads(line)["session"] for line in out.splitlines()]

    assert await sessions_picked("~from ^s@client\\.test$") == [first["session"]] * 2 + [third["session"]]
    assert await sessions_picked(f"~session {third['session'][:6]}") == [third["session"]]
    assert await sessions_picked("~client 127.0.0.0/8 & !~client ::/0") == [first["session"]] * 2 + [third["session"]]
    assert await sessions_picked("~code 250 & ~slow 0") == [first["session"], third["session"]]
    assert await sessions_picked("~slow 1000") == []
    assert await sessions_picked("~tls") == []
    assert await sessions_picked(f"!~outcome accepted | ~session {third['session']}") == [
        second["session"], third["session"]]
    if record["recipients"] is not None:
        assert await sessions_picked("~to ^reject") == [first["session"]] * 2
        assert await sessions_picked("~code 550 & ~outcome accepted") == [first["session"]]
        assert await sessions_picked("~helo ^client\\.test$") == [first["session"]] * 2 + [third["session"]]

    # the first session as a timeline
    timeline = await inspect("--session", first["session"], str(log))
    assert timeline.startswith(f"session {first['session']}  client 127.0.0.1:")
    assert "opened: client 127.0.0.1:" in timeline and "transaction: MAIL FROM:<s@client.test>" in timeline
    assert "closed: client quit" in timeline and third["session"] not in timeline
    if record["recipients"] is not None:
        assert "RCPT TO:<reject-me@legacy.test>  550 5.1.1 <reject-me@legacy.test>: Recipient address rejected" \
            in timeline

    # the summary
    summary = await inspect("--summary", str(log))
    assert "sessions: 2\n" in summary and "transactions: 3\n" in summary
    assert "2  message accepted" in summary and "client round trips saved: " in summary


@pytest.mark.peers
async def test_a_recipient_postfix_refuses_is_named_with_postfixs_own_text(pipeproxy_process, postfix_esmtp,
                                                                          tmp_path):
    proxy = await pipeproxy_process(Address("127.0.0.1", postfix_esmtp.port))
    said = await trio.to_thread.run_sync(send, proxy.address, [["ok@legacy.test", "nobody@[999.1.1.1]"]])
    assert said[0]["nobody@[999.1.1.1]"][0] == 501
    log = await logged_sessions(tmp_path, proxy, 1)
    [transaction] = [line for line in proxy.log.lines if line["event"] == "transaction"]
    rows = (await inspect("--no-header", str(log))).splitlines()
    assert len(rows) == 1 and "1/1" in rows[0] and "message accepted" in rows[0] and "250 2.0.0 Ok: queued" in rows[0]
    timeline = await inspect("--session", transaction["session"], str(log))
    assert "closed: client quit" in timeline
    if transaction.get("recipients") is not None:
        assert "RCPT TO:<nobody@[999.1.1.1]>  501 5.1.3 Bad recipient address syntax" in timeline
        picked = await inspect("--json", "-f", "~code 501 & ~to 999", str(log))
        assert [json.loads(line)["session"] for line in picked.splitlines()] == [transaction["session"]]
        summary = await inspect("--summary", str(log))
        assert "1  501 5.1.3 Bad recipient address syntax" in summary
    if transaction.get("queue_id") is not None:
        assert f"(queue id {transaction['queue_id']})" in timeline
