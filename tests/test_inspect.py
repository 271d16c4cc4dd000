"""``pipeproxy inspect`` as an operator runs it, on the hand-written log (inspect_log.py):
each output, files plain and gzip and standard input, garbage, --follow, bad expressions."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeproxy.inspect.outputs import Quantiles
from pipeproxy.inspect.reading import Grouper, Session, parse_line

import inspect_log
from inspect_log import LINES, OLD_TRANSACTION, REFUSAL

PIPEPROXY = [sys.executable, "-m", "pipeproxy"]


def inspect(*args: str, stdin: str | bytes | None = None) -> subprocess.CompletedProcess[str]:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    ran = subprocess.run([*PIPEPROXY, "inspect", *args], input=data, capture_output=True, timeout=60)
    result = subprocess.CompletedProcess(ran.args, ran.returncode, ran.stdout.decode(), ran.stderr.decode())
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "pipeproxy.log"
    path.write_text(inspect_log.text())
    return path


def test_the_table_has_a_line_per_transaction_in_the_order_they_ended(log):
    result = inspect(str(log))
    assert result.returncode == 0 and result.stderr == ""
    heading, *rows = result.stdout.splitlines()
    assert heading.split()[:4] == ["time", "session", "client", "sender"] and "final reply" in heading
    assert len(rows) == 5
    first = rows[0]
    for shown in ("2026-11-28 09:00:02", "3f2a9c1b7d0e", "127.0.0.2:40000", "alice@client.test", "1/1",
                  "12.0 ms", "message accepted", "250 2.0.0 Ok: queued as 4XyZ12"):
        assert shown in first
    assert "2500.0 ms" in rows[2] and "554 5.7.1 Message rejected as spam" in rows[2]
    assert "\x1b[" not in result.stdout  # no colour into a pipe


def test_the_table_is_coloured_when_asked_and_filtered(log):
    result = inspect("--color", "always", "--no-header", "-f", "~code 5xx", str(log))
    rows = result.stdout.splitlines()
    assert len(rows) == 2 and all("\x1b[" in row for row in rows)
    assert "\x1b[31m" in rows[1]  # the refused message in red


def test_json_gives_each_picked_transaction_with_its_recipients_answers(log):
    result = inspect("--json", "-f", "~to nobody", str(log))
    [line] = result.stdout.splitlines()
    record = json.loads(line)
    assert record["session"] == "3f2a9c1b7d0e" and record["client"] == "127.0.0.2:40000"
    assert record["server"] == "127.0.0.1:2525" and record["helo"] == "mail.client.test"
    assert record["recipients"] == [
        {"address": "bob@dest.test", "code": 250, "reply": None},
        {"address": "nobody@dest.test", "code": 550, "reply": REFUSAL},
    ]
    assert (record["reply_code"], record["reply"], record["outcome"]) == (
        250, "2.0.0 Ok: queued as 4XyZ12", "message accepted")
    assert (record["queue_id"], record["message_id"]) == ("4XyZ12", "<m1@client.test>")
    tls = json.loads(inspect("--json", "-f", "~tls", str(log)).stdout)
    assert tls["tls"]["version"] == "TLSv1.3" and "tls" not in record


def test_a_session_reads_as_a_timeline_with_every_refusal_and_why_it_closed(log):
    result = inspect("--session", "3f2a", str(log))
    assert result.returncode == 0
    out = result.stdout
    assert out.splitlines()[0].startswith("session 3f2a9c1b7d0e  client 127.0.0.2:40000  EHLO name mail.client.test")
    for shown in ("opened: client 127.0.0.2:40000 on 127.0.0.1:2525",
                  "RCPT TO:<bob@dest.test>  250",
                  f"RCPT TO:<nobody@dest.test>  550 {REFUSAL}",
                  "message accepted: 250 2.0.0 Ok: queued as 4XyZ12 (queue id 4XyZ12)",
                  "DATA refused: 554 5.7.1 Message rejected as spam",
                  "closed: client quit after 3.0 s, 12 commands"):
        assert shown in out
    assert "0a1b2c3d4e5f" not in out and "carol" not in out


def test_a_session_with_a_transcript_shows_it_and_its_other_events(log):
    out = inspect("--session", "0a1b2c3d4e5f", str(log)).stdout
    assert "EHLO name v6.client.test" in out.splitlines()[0]
    assert "client  EHLO v6.client.test" in out and "MTA     250 2.1.0 Ok" in out
    assert "command refused: verb STARTTLS, reason not available through this proxy" in out
    assert "closed: client connection lost" in out
    still_open = inspect("--session", "99aa", str(log)).stdout
    assert still_open.rstrip().endswith("still open at the end of the log")


def test_an_unknown_session_says_so_and_exits_1(log):
    result = inspect("--session", "ffff", str(log))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "pipeproxy inspect: no session ffff in the input\n"


def test_the_summary_counts_sessions_outcomes_codes_refusals_waits_and_round_trips(log):
    out = inspect("--summary", str(log)).stdout
    assert "sessions: 3, 1 still open at the end" in out
    assert "transactions: 5" in out
    assert "2  message accepted" in out and "1  MAIL refused" in out
    assert "final reply codes: 250 ×2," in out
    assert "recipient replies: 250 ×4, 550 ×1" in out
    assert "1  550 5.1.1 <…>: Recipient address rejected: User unknown in virtual mailbox table" in out
    assert "upstream wait per transaction: p50 20.0 ms" in out  # 20 ms, to within 1 %
    # groups [4,1] [3,1] [3] [1] [2]: 15 replies in 7 writes
    assert "client round trips saved: 8 (15 replies in transactions, in 7 client writes)" in out
    filtered = inspect("--summary", "-f", "~from alice", str(log)).stdout
    assert "1 with a transaction the filter picked" in filtered and "transactions picked: 2" in filtered


def test_quantiles_are_within_one_percent_in_bounded_memory():
    quantiles = Quantiles()
    for value in range(1, 100_001):
        quantiles.add(value / 1000)
    assert abs(quantiles.quantile(0.5) - 50.0) / 50.0 < 0.011
    assert abs(quantiles.quantile(0.99) - 99.0) / 99.0 < 0.011
    assert len(quantiles.buckets) < 1200


def test_gzip_and_standard_input_read_the_same(log, tmp_path):
    packed = tmp_path / "pipeproxy.log.1.gz"  # told by its bytes, not its name
    packed.write_bytes(gzip.compress(log.read_bytes()))
    plain = inspect(str(log)).stdout
    assert inspect(str(packed)).stdout == plain
    assert inspect(stdin=log.read_text()).stdout == plain
    assert inspect("-", stdin=gzip.compress(log.read_bytes())).stdout == plain


def test_several_files_are_one_log(log, tmp_path):
    first, second = tmp_path / "a.log", tmp_path / "b.log.gz"
    first.write_text(inspect_log.text(LINES[:7]))
    second.write_bytes(gzip.compress(inspect_log.text(LINES[7:]).encode()))
    assert inspect(str(first), str(second)).stdout == inspect(str(log)).stdout


def test_garbage_and_truncated_lines_are_skipped_and_counted(log):
    good = log.read_text().splitlines()
    noise = [
        "plain text from a shell script",
        '{"event": "other program", "level": "info"}',  # JSON, but no timestamp
        "[1, 2, 3]",
        good[6][:40],  # a line cut short
        '{"event": "x", "level": "info", "timestamp": "t"} trailing',
        "\x00\xff binary",
        "",
    ]
    mixed = ("\n".join(good[:6] + noise + good[6:]) + "\n").encode()
    result = inspect(stdin=mixed + b"\xff\xfe not UTF-8\n" + good[6][:25].encode())  # and one cut at the end
    assert result.returncode == 0
    assert result.stdout == inspect(str(log)).stdout
    assert result.stderr == (
        f"pipeproxy inspect: skipped 8 of {len(good) + len(noise) + 2} lines that are not pipeproxy's JSON "
        "log lines (the first: line 7)\n"
    )


def test_a_prefix_before_the_json_is_allowed():
    """docker logs -t and container runtimes put a timestamp (and stream) before each line."""
    line = json.dumps(OLD_TRANSACTION)
    assert parse_line(f"2026-11-28T09:00:05.000000000Z stdout F {line}".encode()) == OLD_TRANSACTION


def test_lines_before_the_new_fields_still_make_a_table_and_a_timeline(tmp_path):
    path = tmp_path / "old.log"
    path.write_text(inspect_log.text([OLD_TRANSACTION]))
    assert "old@client.test" in inspect(str(path)).stdout
    out = inspect("--session", "abcdef", str(path)).stdout
    assert "recipients: 2 accepted, 1 refused (this log does not name them)" in out


@pytest.mark.parametrize(
    ("expression", "column"),
    [("~code 5xx &", 12), ("~frm alice", 1), ("(~tls", 1), ("~slow fast", 7), ("~to [", 5)],
)
def test_a_bad_expression_gives_one_line_saying_where_and_status_2(log, expression, column):
    result = inspect("-f", expression, str(log))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"pipeproxy inspect: error: argument -f/--filter: bad filter {expression!r} "
                                    f"at column {column}: ")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["/nonexistent/pipeproxy.log"], "cannot read /nonexistent/pipeproxy.log: No such file or directory"),
        (["--session", "xyz"], "--session: a session id is hex digits"),
        (["--follow", "--summary"], "--follow reads one FILE"),
        (["--json", "--summary"], "not allowed with argument"),
    ],
)
def test_bad_options_give_one_line_and_status_2(args, says):
    result = inspect(*args, stdin="")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and says in result.stderr


def test_the_grouper_holds_only_open_sessions():
    """Memory follows the sessions open at a time, not the length of the log."""
    most_open = 0
    grouper = Grouper()
    for line in inspect_log.text().splitlines():
        grouper.feed(line.encode())
        most_open = max(most_open, len(grouper.open))
    assert most_open == 3 and list(grouper.open) == ["99aa00bb11cc"]
    closed: list[Session] = []
    grouper.on_session = closed.append
    grouper.finish()
    assert [session.id for session in closed] == ["99aa00bb11cc"] and not grouper.open
    assert closed[0].closed is None and closed[0].lines is None  # lines kept only when asked


def test_the_helo_name_from_a_transcript_reaches_transactions_that_lack_it():
    picked = []
    grouper = Grouper(lambda line, session: picked.append(line))
    context = {"session": "123456789abc", "client": "127.0.0.1:9", "upstream": "127.0.0.1:25"}
    for line in [
        {**context, "event": "transcript", "direction": "client", "line": "HELO legacy.client"},
        {**context, "event": "transaction", "sender": "a@b"},
    ]:
        grouper.feed(json.dumps({**line, "level": "info", "timestamp": "2026-11-28T09:00:00.000000Z"}).encode())
    assert picked[0]["helo"] == "legacy.client"


@contextlib.contextmanager
def following(*args: str, stdin: int | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``pipeproxy inspect --follow ARGS``, killed when the test is done with it (pass or fail)."""
    with subprocess.Popen([*PIPEPROXY, "inspect", "--follow", *args], stdin=stdin, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as process:
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()


def test_follow_prints_matches_from_a_growing_file_as_they_are_written(tmp_path):
    path = tmp_path / "growing.log"
    path.write_text(inspect_log.text(LINES[:3]))
    with following("--json", "-f", "~from alice", str(path)) as process:
        assert process.stdout is not None
        with path.open("a") as log:
            for line in LINES[3:]:
                log.write(json.dumps(line) + "\n")
                log.flush()
            # half a line: printed only once its end arrives
            log.write(json.dumps(OLD_TRANSACTION | {"sender": "alice@late.test"})[:30])
            log.flush()
        first = json.loads(process.stdout.readline())  # blocks until printed; the test's timeout bounds it
        second = json.loads(process.stdout.readline())
        assert (first["sender"], first["reply_code"]) == ("alice@client.test", 250)
        assert (second["sender"], second["outcome"]) == ("alice@client.test", "DATA refused")
        with path.open("a") as log:
            log.write(json.dumps(OLD_TRANSACTION | {"sender": "alice@late.test"})[30:] + "\n")
        third = json.loads(process.stdout.readline())
        assert third["sender"] == "alice@late.test"
        assert process.poll() is None  # still following


def test_follow_reads_a_pipe_until_its_writer_closes_it():
    with following("--no-header", stdin=subprocess.PIPE) as process:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(inspect_log.text(LINES[:8]).encode())
        process.stdin.flush()
        assert "alice@client.test" in process.stdout.readline().decode()  # printed before the pipe ends
        process.stdin.write(inspect_log.text(LINES[8:]).encode())
        process.stdin.close()
        rest = process.stdout.read().decode()
        assert process.wait(timeout=60) == 0 and len(rest.splitlines()) == 4


def test_follow_reads_a_rotated_file_from_its_start(tmp_path):
    path = tmp_path / "rotating.log"
    path.write_text(inspect_log.text(LINES[:7]))
    with following("--no-header", str(path)) as process:
        assert process.stdout is not None
        assert "alice@client.test" in process.stdout.readline().decode()
        os.rename(path, tmp_path / "rotating.log.1")
        time.sleep(0.1)  # not a timing assertion: the new file may come at any time
        path.write_text(inspect_log.text([OLD_TRANSACTION]))
        assert "old@client.test" in process.stdout.readline().decode()
