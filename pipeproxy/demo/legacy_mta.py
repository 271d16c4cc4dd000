"""A small, strict legacy MTA: no PIPELINING, and no patience for clients that send early.

It stands in for the old servers pipeproxy protects, for the demo and the tests. Like
Exim's ``smtp_enforce_sync``, before every reply it looks whether the client has sent
anything it was not yet allowed to (input after a command, or before the greeting); if
so it answers ``554 5.5.0 SMTP synchronization error`` and drops the connection, and
records the violation. Messages it accepts are kept in memory, with their envelope.

It is deliberately small: HELO/EHLO, MAIL, RCPT, DATA, RSET, NOOP, VRFY, QUIT. A
recipient whose local part starts with ``reject`` is refused with 550.

With ``lenient=True`` it reads lines as the old MTAs that SMTP smuggling exploits do: a
bare LF or a bare CR ends a line as well as CRLF, and NUL bytes are dropped, so
``<LF>.<LF>``, ``<CR>.<CR>`` or ``<CRLF>.<NUL><CRLF>`` ends a message. The smuggling tests aim at that.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field

import trio

from ..core.wire import mailbox

GREETING = ("legacy.test ESMTP legacy MTA, no PIPELINING",)
EXTENSIONS = ("SIZE 10240000", "8BITMIME", "ENHANCEDSTATUSCODES")
MAX_LINE = 4096
STRICT_LINE_END = re.compile(rb"\r\n")
# Any line break, but a CR at the very end of the buffer may still be half a CRLF.
LENIENT_LINE_END = re.compile(rb"\r\n|\n|\r(?=[^\n])")


@dataclass
class Message:
    sender: str
    recipients: list[str]
    content: bytes


@dataclass
class LegacyMTA:
    greeting: tuple[str, ...] = GREETING
    esmtp: bool = True  # False: EHLO is an unknown command, as with `smtp-sink -e`
    extensions: tuple[str, ...] = EXTENSIONS
    # Waiting a moment before each reply gives a client that sends early the time to
    # be caught; 0 checks only what has already arrived.
    reply_delay: float = 0.0
    enforce_sync: bool = True  # False: accept early input silently, like `smtp-sink -p`
    lenient: bool = False
    messages: list[Message] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    connections: int = 0  # accepted so far
    open_conversations: int = 0

    async def serve(self, host: str = "127.0.0.1", port: int = 0, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await trio.serve_tcp(self.handle, port, host=host, task_status=task_status)

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            conversation = _Conversation(self, stream)
            self.connections += 1
            self.open_conversations += 1
            try:
                await conversation.run()
            except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
                pass
            finally:
                self.open_conversations -= 1
                conversation.close()


class _Conversation:
    def __init__(self, mta: LegacyMTA, stream: trio.SocketStream) -> None:
        self.mta = mta
        self.stream = stream
        self.buffer = bytearray()
        # A duplicate of the socket for one thing trio does not offer: a peek that does
        # not wait, to see whether the client sent before it was allowed to.
        self.peek_socket = socket.fromfd(stream.socket.fileno(), stream.socket.family, stream.socket.type)
        self.sender: str | None = None
        self.recipients: list[str] = []

    def close(self) -> None:
        self.peek_socket.close()

    async def run(self) -> None:
        if not await self.reply(220, *self.mta.greeting, after="connect"):
            return
        while True:
            line = await self.read_line()
            verb, _, argument = line.partition(" ")
            verb = verb.upper()
            self.mta.commands.append(verb)
            code, *text = self.answer(verb, argument)
            if verb == "DATA" and code == 354:
                if not await self.reply(code, *text, after=verb):
                    return
                content = await self.read_content()
                self.mta.messages.append(Message(self.sender or "", list(self.recipients), content))
                self.sender, self.recipients = None, []
                code, *text, verb = 250, "2.0.0 Ok: queued", "end of data"
            if not await self.reply(code, *text, after=verb):
                return
            if verb == "QUIT":
                return

    def answer(self, verb: str, argument: str) -> list:
        if verb == "EHLO" and self.mta.esmtp:
            self.sender, self.recipients = None, []
            return [250, "legacy.test", *self.mta.extensions]
        if verb == "HELO":
            self.sender, self.recipients = None, []
            return [250, "legacy.test"]
        if verb == "MAIL":
            if self.sender is not None:
                return [503, "5.5.1 Error: nested MAIL command"]
            self.sender = mailbox(argument)
            return [250, "2.1.0 Ok"]
        if verb == "RCPT":
            if self.sender is None:
                return [503, "5.5.1 Error: need MAIL command"]
            recipient = mailbox(argument)
            if recipient.lower().startswith("reject"):
                return [550, f"5.1.1 <{recipient}>: Recipient address rejected"]
            self.recipients.append(recipient)
            return [250, "2.1.5 Ok"]
        if verb == "DATA":
            if not self.recipients:
                return [554, "5.5.1 Error: no valid recipients"]
            return [354, "End data with <CR><LF>.<CR><LF>"]
        if verb == "RSET":
            self.sender, self.recipients = None, []
            return [250, "2.0.0 Ok"]
        if verb == "NOOP":
            return [250, "2.0.0 Ok"]
        if verb == "VRFY":
            return [252, "2.0.0 Cannot VRFY user"]
        if verb == "QUIT":
            return [221, "2.0.0 Bye"]
        return [502, "5.5.2 Error: command not recognized"]

    async def reply(self, code: int, *lines: str, after: str) -> bool:
        """Send a reply unless the client jumped the gun; False ends the conversation."""
        if self.mta.reply_delay:
            await trio.sleep(self.mta.reply_delay)
        if self.mta.enforce_sync and (self.buffer or self.input_waiting()):
            self.mta.violations.append(f"input before the reply to {after}")
            await self.stream.send_all(b"554 5.5.0 SMTP synchronization error\r\n")
            return False
        last = len(lines) - 1
        await self.stream.send_all(
            b"".join(f"{code}{' ' if i == last else '-'}{text}\r\n".encode() for i, text in enumerate(lines))
        )
        return True

    def input_waiting(self) -> bool:
        try:
            return bool(self.peek_socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return False

    async def read_line(self) -> str:
        line_end = LENIENT_LINE_END if self.mta.lenient else STRICT_LINE_END
        while (match := line_end.search(self.buffer)) is None:
            if len(self.buffer) > MAX_LINE:
                raise EOFError("line too long")
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.buffer += data
        line = bytes(self.buffer[: match.start()])
        del self.buffer[: match.end()]
        if self.mta.lenient:
            line = line.replace(b"\x00", b"")
        return line.decode("utf-8", "surrogateescape")

    async def read_content(self) -> bytes:
        lines = []
        while (line := await self.read_line()) != ".":
            lines.append(line[1:] if line.startswith(".") else line)
        return "".join(f"{line}\r\n" for line in lines).encode("utf-8", "surrogateescape")

