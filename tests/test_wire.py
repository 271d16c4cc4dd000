"""The wire layer: command lines, replies and message re-framing, cut at every point.

Properties use hypothesis: whatever bytes a client sends as content, the upstream gets
canonical CRLF lines, every leading dot stuffed, and exactly one terminator.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeproxy.core.ehlo import rewrite_ehlo
from pipeproxy.core.wire import BodyReframer, CommandReader, ProtocolError, Reply, ReplyReader, mailbox

# Bytes that matter to framing, mixed with ordinary text, so examples hit the edges.
FRAMING = st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"\x00", b"a", b"MAIL FROM:<x@y>", b" "]), max_size=40).map(b"".join)


def cuts(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p % (len(data) + 1) for p in points})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def reframe(data: bytes, pieces_at: list[int] = (), reject: bool = False) -> tuple[bytes, BodyReframer]:
    """Feed ``data`` in pieces as the session does; the upstream bytes, and the reframer
    with ``leftover`` holding everything after the end, later pieces included."""
    body = BodyReframer(reject_bare=reject)
    out = b""
    pieces = cuts(data, list(pieces_at))
    while pieces and not body.done:
        out += body.feed(pieces.pop(0))
    if body.done:
        body.leftover += b"".join(pieces)
        if not body.refused:
            out += body.finish()
    return out, body


def client_stuffed(content: bytes) -> bytes:
    """What a correct client sends for CRLF-line content (RFC 5321 §4.5.2)."""
    return re.sub(rb"(?m)^\.", b"..", content) + b".\r\n"


@given(st.lists(st.sampled_from([b"", b".", b"..", b"text", b". dot", b"x.y"]), max_size=12), st.lists(st.integers(0, 500)))
def test_correct_clients_content_passes_unchanged_whatever_the_cuts(lines, points):
    content = b"".join(line + b"\r\n" for line in lines)
    sent = client_stuffed(content)
    out, body = reframe(sent + b"NEXT\r\n", points)
    assert out == sent
    assert body.leftover == b"NEXT\r\n"
    assert body.size == len(content)


@given(FRAMING, st.lists(st.integers(0, 500)))
def test_any_content_reaches_the_upstream_as_exactly_one_canonical_message(garbage, points):
    """No bare CR/LF/NUL survives, every dot line is stuffed, one terminator at the end."""
    out, body = reframe(garbage + b"\r\n.\r\nMAIL FROM:<after@x>\r\n", points)
    assert body.done
    assert out.endswith(b".\r\n")
    message, terminator = out[:-3], out[-3:]
    assert terminator == b".\r\n" and (message == b"" or message.endswith(b"\r\n"))
    assert b"\x00" not in out
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", out) is None, "bare CR or LF reached the upstream"
    for line in message.split(b"\r\n")[:-1]:
        assert not line.startswith(b".") or line.startswith(b".."), f"unstuffed dot line {line!r}"
    assert body.leftover.endswith(b"MAIL FROM:<after@x>\r\n")


@given(FRAMING, st.lists(st.integers(0, 500)))
def test_reframing_does_not_depend_on_how_input_is_cut(garbage, points):
    data = garbage + b"\r\n.\r\n"
    assert reframe(data, points)[0] == reframe(data)[0]


@pytest.mark.parametrize(
    "variant",
    [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\r\n.\n", b"\n.\r", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"],
)
def test_smuggling_terminators_never_end_the_message(variant):
    """SEC Consult 2023 end-of-data variants: content, never an end, in either policy."""
    data = b"first" + variant + b"MAIL FROM:<evil@x>\r\n"
    out, body = reframe(data)
    assert not body.done and out.count(b"MAIL FROM") == 1
    out, body = reframe(data + b".\r\n")
    assert body.done and out.endswith(b"\r\n.\r\n") and out.count(b"\r\n.\r\n") == 1
    _, rejecting = reframe(data + b".\r\n", reject=True)
    assert rejecting.refused


def test_reject_policy_taints_and_produces_nothing_after_the_bad_byte():
    body = BodyReframer(reject_bare=True)
    assert body.feed(b"good\r\n") == b"good"  # its CRLF may yet start the terminator
    assert body.feed(b"bad\nline\r\n") == b""
    assert body.feed(b"more\r\n.\r\n") == b""
    assert body.done and body.refused


def test_empty_message_and_client_dot_stuffing():
    assert reframe(b".\r\n")[0] == b".\r\n"
    assert reframe(b"..\r\n.\r\n")[0] == b"..\r\n.\r\n"
    assert reframe(b"...x\r\n.\r\n")[0] == b"...x\r\n.\r\n"


def lines_of(reader: CommandReader, data: bytes, pieces: list[bytes]) -> list:
    results = []
    for piece in pieces:
        reader.feed(piece)
        while True:
            try:
                line = reader.next_line()
            except ProtocolError as error:
                results.append(error.reason)
                continue
            if line is None:
                break
            results.append(line)
    return results


@given(st.lists(st.sampled_from([b"NOOP", b"\r\n", b"\n", b"\r", b"x" * 300, b"\x00", b"AUTH PLAIN " + b"A" * 600]), max_size=12).map(b"".join),
       st.lists(st.integers(0, 5000)))
def test_command_lines_are_the_same_whatever_the_cuts_and_stay_bounded(data, points):
    whole = lines_of(CommandReader(), data, [data])
    reader = CommandReader()
    assert lines_of(reader, data, cuts(data, points)) == whole
    assert len(reader) <= 12288


def test_auth_lines_may_be_longer_than_commands():
    reader = CommandReader()
    reader.feed(b"AUTH PLAIN " + b"A" * 2000 + b"\r\n")
    assert reader.next_line() == b"AUTH PLAIN " + b"A" * 2000
    reader.feed(b"A" * 2000 + b"\r\n")
    assert reader.next_line(sasl=True) == b"A" * 2000
    reader.feed(b"NOOP " + b"A" * 2000 + b"\r\n")
    with pytest.raises(ProtocolError, match="too long"):
        reader.next_line()


@pytest.mark.parametrize("size", [1, 2, 7, 100])
def test_replies_multiline_and_cut_anywhere(size):
    data = b"250-first\r\n250-second\n250 last\r\n354 go\r\n"
    reader = ReplyReader()
    replies = []
    for i in range(0, len(data), size):
        reader.feed(data[i : i + size])
        while (reply := reader.next_reply()) is not None:
            replies.append(reply)
    assert replies == [Reply(250, ("first", "second", "last")), Reply(354, ("go",))]
    assert replies[0].serialise() == b"250-first\r\n250-second\r\n250 last\r\n"


@pytest.mark.parametrize(
    "data",
    [b"HTTP/1.1 200 OK\r\n", b"25 short\r\n", b"250x\r\n", b"250-a\r\n251 b\r\n", b"2" * 20000, b"650 no\r\n",
     b"250-long\r\n" * 2000 + b"250 end\r\n"],
)
def test_malformed_replies_are_protocol_errors(data):
    reader = ReplyReader()
    reader.feed(data)
    with pytest.raises(ProtocolError):
        reader.next_reply()


def test_mailbox_of_mail_and_rcpt_arguments():
    assert mailbox("FROM:<a@b> SIZE=10") == "a@b"
    assert mailbox("TO: <c@d>") == "c@d"
    assert mailbox("FROM:<>") == ""
    assert mailbox("FROM:e@f BODY=8BITMIME") == "e@f"


def test_ehlo_rewrite_reports_what_it_removed_and_keeps_a_bare_250():
    reply, removed = rewrite_ehlo(Reply(250, ("mx",)))
    assert reply.lines == ("mx", "PIPELINING") and removed == ()
    reply, removed = rewrite_ehlo(Reply(250, ("mx", "STARTTLS", "AUTH PLAIN LOGIN", "Chunking")), frozenset({"AUTH"}))
    assert reply.lines == ("mx", "PIPELINING") and removed == ("STARTTLS", "AUTH", "CHUNKING")
