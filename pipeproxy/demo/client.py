"""A small SMTP client on trio that pipelines when told to, counting its round trips.

Used by ``pipeproxy demo`` (and the benchmarks) to show what a pipelining client costs
in waits for replies: each ``exchange`` is one write followed by one wait, whatever the
number of commands in it.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from ..core.wire import Reply, ReplyReader


class SMTPClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.round_trips = 0
        self._replies = ReplyReader()

    @classmethod
    async def connect(cls, host: str, port: int) -> SMTPClient:
        client = cls(await trio.open_tcp_stream(host, port))
        client.round_trips = 1
        return client

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def read_reply(self) -> Reply:
        while (reply := self._replies.next_reply()) is None:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("server closed the connection")
            self._replies.feed(data)
        return reply

    async def exchange(self, *lines: bytes, replies: int | None = None) -> list[Reply]:
        """Send ``lines`` in one write, then read one reply per line (or ``replies``)."""
        await self.stream.send_all(b"".join(lines))
        self.round_trips += 1
        return [await self.read_reply() for _ in range(len(lines) if replies is None else replies)]

    async def send_mail(
        self, sender: str, recipients: Sequence[str], content: bytes, *, pipelining: bool
    ) -> list[Reply]:
        """One transaction; every reply in order, the last one the message's fate."""
        envelope = envelope_lines(sender, recipients)
        if pipelining:
            replies = await self.exchange(*envelope)
        else:
            replies = [(await self.exchange(line))[0] for line in envelope]
        if replies[-1].code != 354:
            return replies
        replies += await self.exchange(stuff(content) + b".\r\n")
        return replies


def envelope_lines(sender: str, recipients: Sequence[str]) -> list[bytes]:
    """MAIL, one RCPT per recipient and DATA: the group a pipelining client sends."""
    lines = [f"MAIL FROM:<{sender}>\r\n".encode()]
    lines += [f"RCPT TO:<{rcpt}>\r\n".encode() for rcpt in recipients]
    return [*lines, b"DATA\r\n"]


def stuff(content: bytes) -> bytes:
    """Content as SMTP DATA lines: CRLF-ended, each leading dot doubled (RFC 5321 §4.5.2)."""
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    if content.startswith(b"."):
        content = b"." + content
    return content.replace(b"\r\n.", b"\r\n..")
