"""The wire layer: command lines, replies and message content, cut at every point.

Properties use hypothesis: whatever bytes a client sends as content, the upstream gets
canonical CRLF lines, every leading dot stuffed, and exactly one terminator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeproxy.core.ehlo import rewrite_ehlo
from pipeproxy.core.wire import ClientError, ClientInput, Reply, ReplyReader, Stuffer, Unstuffer, UpstreamError, mailbox

# Bytes that matter to framing, mixed with ordinary text, so examples hit the edges.
FRAMING = st.lists(
    st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"\x00", b"a", b"MAIL FROM:<x@y>", b" "]), max_size=40
).map(b"".join)


def cuts(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p % (len(data) + 1) for p in points})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@dataclass
class Reframed:
    out: bytes  # what the upstream got
    done: bool  # the client's end of data was seen
    refused: str | None
    size: int  # content octets
    rest: list[bytes | str]  # the command lines after the end (or why one was refused)


def reframe(data: bytes, pieces_at: list[int] | None = None, reject: bool = False) -> Reframed:
    """Feed ``data`` in pieces as the session does: one client buffer, read as content
    until its end, then as command lines."""
    client, unstuffer, stuffer = ClientInput(), Unstuffer(), Stuffer(reject_bare=reject)
    out = b""
    for piece in cuts(data, pieces_at or []):
        client.feed(piece)
        if not unstuffer.done:
            out += stuffer.frame(client.read_content(unstuffer))
    if unstuffer.done and not stuffer.refused:
        out += stuffer.finish()
    rest: list[bytes | str] = []
    while unstuffer.done:
        try:
            if (line := client.next_line()) is None:
                break
            rest.append(line)
        except ClientError as error:
            rest.append(error.reason)
    return Reframed(out, unstuffer.done, stuffer.refused, unstuffer.size, rest)


def client_stuffed(content: bytes) -> bytes:
    """What a correct client sends for CRLF-line content (RFC 5321 §4.5.2)."""
    return re.sub(rb"(?m)^\.", b"..", content) + b".\r\n"


@given(
    st.lists(st.sampled_from([b"", b".", b"..", b"text", b". dot", b"x.y"]), max_size=12),
    st.lists(st.integers(0, 500)),
)
def test_correct_clients_content_passes_unchanged_whatever_the_cuts(lines, points):
    content = b"".join(line + b"\r\n" for line in lines)
    sent = client_stuffed(content)
    body = reframe(sent + b"NEXT\r\n", points)
    assert body.out == sent
    assert body.rest == [b"NEXT"]
    assert body.size == len(content)


@given(FRAMING, st.lists(st.integers(0, 500)))
def test_any_content_reaches_the_upstream_as_exactly_one_canonical_message(garbage, points):
    """No bare CR/LF/NUL survives, every dot line is stuffed, one terminator at the end."""
    body = reframe(garbage + b"\r\n.\r\nMAIL FROM:<after@x>\r\n", points)
    out = body.out
    assert body.done
    assert out.endswith(b".\r\n")
    message, terminator = out[:-3], out[-3:]
    assert terminator == b".\r\n" and (message == b"" or message.endswith(b"\r\n"))
    assert b"\x00" not in out
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", out) is None, "bare CR or LF reached the upstream"
    for line in message.split(b"\r\n")[:-1]:
        assert not line.startswith(b".") or line.startswith(b".."), f"unstuffed dot line {line!r}"
    assert body.rest[-1] == b"MAIL FROM:<after@x>"


@given(FRAMING, st.lists(st.integers(0, 500)))
def test_reframing_does_not_depend_on_how_input_is_cut(garbage, points):
    data = garbage + b"\r\n.\r\n"
    assert reframe(data, points).out == reframe(data).out


@pytest.mark.parametrize(
    "variant",
    [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\r\n.\n", b"\n.\r", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"],
)
def test_smuggling_terminators_never_end_the_message(variant):
    """SEC Consult 2023 end-of-data variants: content, never an end, in either policy."""
    data = b"first" + variant + b"MAIL FROM:<evil@x>\r\n"
    body = reframe(data)
    assert not body.done and body.out.count(b"MAIL FROM") == 1
    body = reframe(data + b".\r\n")
    assert body.done and body.out.endswith(b"\r\n.\r\n") and body.out.count(b"\r\n.\r\n") == 1
    assert reframe(data + b".\r\n", reject=True).refused


def test_reject_policy_taints_and_produces_nothing_after_the_bad_byte():
    client, unstuffer, stuffer = ClientInput(), Unstuffer(), Stuffer(reject_bare=True)
    for piece, upstream in [(b"good\r\n", b"good"), (b"bad\nline\r\n", b""), (b"more\r\n.\r\n", b"")]:
        client.feed(piece)  # "good"'s CRLF waits: it may yet start the terminator
        assert stuffer.frame(client.read_content(unstuffer)) == upstream
    assert unstuffer.done and stuffer.refused


def test_the_stuffer_frames_content_cut_anywhere_as_bdat_chunks_would_be():
    """The framing toward the upstream does not rely on the unstuffer's cuts: a CRLF split
    between two pieces stays one line break, a dot after it is stuffed."""
    data = b"a\r\n.b\r\n\r\n.\r\nc"
    for cut in range(len(data) + 1):
        stuffer = Stuffer()
        out = stuffer.frame(data[:cut]) + stuffer.frame(data[cut:]) + stuffer.finish()
        assert out == b"a\r\n..b\r\n\r\n..\r\nc\r\n.\r\n", cut
    stuffer = Stuffer()
    assert stuffer.frame(b"x\r") + stuffer.finish() == b"x\r\n.\r\n", "a last bare CR is a line break"


def test_empty_message_and_client_dot_stuffing():
    assert reframe(b".\r\n").out == b".\r\n"
    assert reframe(b"..\r\n.\r\n").out == b"..\r\n.\r\n"
    assert reframe(b"...x\r\n.\r\n").out == b"...x\r\n.\r\n"


def lines_of(reader: ClientInput, data: bytes, pieces: list[bytes]) -> list[bytes | str]:
    results: list[bytes | str] = []
    for piece in pieces:
        reader.feed(piece)
        while True:
            try:
                line = reader.next_line()
            except ClientError as error:
                results.append(error.reason)
                continue
            if line is None:
                break
            results.append(line)
    return results


COMMAND_TOKENS = [b"NOOP", b"\r\n", b"\n", b"\r", b"x" * 300, b"\x00", b"AUTH PLAIN " + b"A" * 600]


@given(st.lists(st.sampled_from(COMMAND_TOKENS), max_size=12).map(b"".join), st.lists(st.integers(0, 5000)))
def test_command_lines_are_the_same_whatever_the_cuts_and_stay_bounded(data, points):
    whole = lines_of(ClientInput(), data, [data])
    reader = ClientInput()
    assert lines_of(reader, data, cuts(data, points)) == whole
    assert len(reader) <= 12288


def test_auth_lines_may_be_longer_than_commands():
    reader = ClientInput()
    reader.feed(b"AUTH PLAIN " + b"A" * 3000 + b"\r\n")
    assert reader.next_line() == b"AUTH PLAIN " + b"A" * 3000
    reader.feed(b"A" * 3000 + b"\r\n")
    assert reader.next_line(sasl=True) == b"A" * 3000
    reader.feed(b"NOOP " + b"A" * 3000 + b"\r\n")
    with pytest.raises(ClientError, match="too long"):
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
    with pytest.raises(UpstreamError):
        reader.next_reply()


# RFC 5321 §4.2's reply line as a regular expression: the specification the reply
# reader's octet-by-octet check is held to.
REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])(?:([ -])[^\r\x00]*)?")


def variants_of_reply_lines() -> list[bytes]:
    """Well-formed reply lines with each of their first five octets set to every value
    but LF (which ends a line), and cut short after each: the code, the separator and
    the text's first octet."""
    lines = []
    for base in (b"250 ok", b"354-go"):
        for position in range(5):
            lines += [base[:position] + bytes([octet]) + base[position + 1 :] for octet in range(256) if octet != 10]
            lines.append(base[:position])
    return lines


def test_a_reply_line_is_taken_exactly_when_it_is_well_formed():
    for raw in variants_of_reply_lines():
        reader = ReplyReader()
        reader.feed(raw + b"\r\n")
        if (match := REPLY_LINE.fullmatch(raw)) is None:
            with pytest.raises(UpstreamError):
                reader.next_reply()
            continue
        text = raw[4:].decode("utf-8", "surrogateescape")
        if match[2] != b"-":
            assert reader.next_reply() == Reply(int(match[1]), (text,)), raw
        else:  # the first line of a multi-line reply: nothing yet; the next line ends it
            assert reader.next_reply() is None, raw
            reader.feed(match[1] + b" end\r\n")
            assert reader.next_reply() == Reply(int(match[1]), (text, "end")), raw


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


@pytest.mark.parametrize("cut", [1, 3, 100])
def test_upstream_reply_lines_are_kept_octet_for_octet(cut):
    """Trailing spaces, a bare code, an empty last EHLO line: relayed as sent (only the line
    end is made CRLF), since clients wait for the exact separator."""
    data = b"250-mx.test  \r\n250-SIZE 10\n250 \r\n250\r\n"
    reader = ReplyReader()
    replies = []
    for i in range(0, len(data), cut):
        reader.feed(data[i : i + cut])
        while (reply := reader.next_reply()) is not None:
            replies.append(reply)
    assert [reply.serialise() for reply in replies] == [b"250-mx.test  \r\n250-SIZE 10\r\n250 \r\n", b"250\r\n"]
