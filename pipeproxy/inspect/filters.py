"""The filter language of ``pipeproxy inspect``, in the spirit of mitmproxy's.

A filter picks transactions (the ``transaction`` log lines). Terms::

    ~from RE      the sender matches RE
    ~to RE        any recipient matches RE
    ~client NET   the client's address is in NET (CIDR or one address), else matches RE
    ~helo RE      the client's EHLO/HELO name matches RE
    ~session ID   the session id starts with ID (hex)
    ~code N       the final reply's code, or any recipient's: 550, 55x, 5xx
    ~outcome RE   the outcome matches RE ("refused", "accepted", "connection lost")
    ~slow S       waited at least S on the upstream: 0.5, 0.5s, 500ms
    ~tls          TLS details were logged

combined with ``!`` (not), ``&`` (and), ``|`` (or) and parentheses; ``!`` binds
tightest, then ``&``, then ``|``. Two terms side by side mean ``&``. Regular
expressions are searched, case-insensitively. An argument runs to the next space
(a ``)`` it did not open ends it too), or is quoted: ``"a b"``, ``'a b'``, with
``\\"`` and ``\\\\`` inside. A filter prints back (``str``) as one that parses to the
same tree; a bad one raises FilterError with the position it went wrong at.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Record = dict[str, Any]  # a transaction line, as JSON gave it
Test = Callable[[Record], bool]


class FilterError(ValueError):
    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.message = message
        self.position = position  # 0-based offset into the expression

    def __str__(self) -> str:
        return f"column {self.position + 1}: {self.message}"


@dataclass(frozen=True)
class Term:
    op: str
    arg: str | None = None
    test: Test = field(default=lambda record: True, compare=False, repr=False)

    def __str__(self) -> str:
        return f"~{self.op}" if self.arg is None else f"~{self.op} {quote(self.arg)}"

    def __call__(self, record: Record) -> bool:
        return self.test(record)


@dataclass(frozen=True)
class Not:
    child: Node

    def __str__(self) -> str:
        inner = str(self.child)
        return f"!{inner}" if isinstance(self.child, Term | Not) else f"!({inner})"

    def __call__(self, record: Record) -> bool:
        return not self.child(record)


@dataclass(frozen=True)
class And:
    left: Node
    right: Node

    def __str__(self) -> str:
        left = f"({self.left})" if isinstance(self.left, Or) else str(self.left)
        right = f"({self.right})" if isinstance(self.right, Or | And) else str(self.right)
        return f"{left} & {right}"

    def __call__(self, record: Record) -> bool:
        return self.left(record) and self.right(record)


@dataclass(frozen=True)
class Or:
    left: Node
    right: Node

    def __str__(self) -> str:
        right = f"({self.right})" if isinstance(self.right, Or) else str(self.right)
        return f"{self.left} | {right}"

    def __call__(self, record: Record) -> bool:
        return self.left(record) or self.right(record)


Node = Term | Not | And | Or


# -- arguments -------------------------------------------------------------------------

def _bare_end(text: str, start: int) -> int:
    """Where a bare argument starting at ``start`` ends: a space, or a ``)`` it did not open."""
    depth = 0
    position = start
    while position < len(text):
        char = text[position]
        if char.isspace():
            break
        if char == "(":
            depth += 1
        elif char == ")":
            if depth == 0:
                break
            depth -= 1
        position += 1
    return position


def quote(arg: str) -> str:
    """``arg`` as the parser reads it back: bare when that is safe, else double-quoted."""
    bare = arg and arg[0] not in "\"'" and _bare_end(arg + ")", 0) == len(arg)
    if bare:
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- the terms -------------------------------------------------------------------------

def _regex(arg: str, position: int) -> re.Pattern[str]:
    try:
        return re.compile(arg, re.IGNORECASE)
    except re.error as error:
        raise FilterError(f"bad regular expression {arg!r}: {error.msg}", position) from None


def _field_matches(name: str) -> Callable[[str, int], Test]:
    def build(arg: str, position: int) -> Test:
        search = _regex(arg, position).search
        return lambda record: search(record.get(name) or "") is not None

    return build


def _to(arg: str, position: int) -> Test:
    search = _regex(arg, position).search
    return lambda record: any(search(r.get("address") or "") for r in record.get("recipients") or ())


_HOSTS: dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address | None] = {}


def client_host(client: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in "127.0.0.2:40000" or "[::1]:40000" (None if it is not one)."""
    try:
        return _HOSTS[client]
    except KeyError:
        pass
    host = client.rsplit(":", 1)[0] if client.count(":") == 1 or client.startswith("[") else client
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    if len(_HOSTS) < 100_000:
        _HOSTS[client] = address
    return address


def _client(arg: str, position: int) -> Test:
    try:
        network = ipaddress.ip_network(arg, strict=False)
    except ValueError:
        return _field_matches("client")(arg, position)

    def test(record: Record) -> bool:
        host = client_host(record.get("client") or "")
        return host is not None and host.version == network.version and host in network

    return test


def _session(arg: str, position: int) -> Test:
    if not re.fullmatch(r"[0-9a-fA-F]+", arg):
        raise FilterError(f"a session id is hex digits, not {arg!r}", position)
    prefix = arg.lower()
    return lambda record: (record.get("session") or "").startswith(prefix)


def code_matcher(arg: str, position: int) -> Callable[[int], bool]:
    match = re.fullmatch(r"([1-5])([0-9x])([0-9x])", arg.lower())
    if not match or (match[2] == "x" and match[3] != "x"):
        raise FilterError(f"a reply code is like 550, 55x or 5xx, not {arg!r}", position)
    digits = "".join(d for d in match.groups() if d != "x")
    low = int(digits.ljust(3, "0"))
    high = low + 10 ** (3 - len(digits))
    return lambda code: low <= code < high


def _code(arg: str, position: int) -> Test:
    matches = code_matcher(arg, position)

    def test(record: Record) -> bool:
        code = record.get("reply_code")
        if isinstance(code, int) and matches(code):
            return True
        return any(isinstance(r.get("code"), int) and matches(r["code"]) for r in record.get("recipients") or ())

    return test


def seconds(arg: str, position: int) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(ms|s)?", arg.lower())
    if not match:
        raise FilterError(f"a time is like 2, 0.5s or 500ms, not {arg!r}", position)
    return float(match[1]) / (1000 if match[2] == "ms" else 1)


def _slow(arg: str, position: int) -> Test:
    limit = seconds(arg, position)
    return lambda record: (record.get("upstream_wait") or 0) >= limit


def _tls(_arg: str, _position: int) -> Test:
    return lambda record: bool(record.get("tls"))


# name: (takes an argument, builder, what the help says)
OPERATORS: dict[str, tuple[bool, Callable[[str, int], Test], str]] = {
    "from": (True, _field_matches("sender"), "the sender matches RE"),
    "to": (True, _to, "any recipient matches RE"),
    "client": (True, _client, "the client is in CIDR (or is that address), else matches RE"),
    "helo": (True, _field_matches("helo"), "the client's EHLO/HELO name matches RE"),
    "session": (True, _session, "the session id starts with ID"),
    "code": (True, _code, "the final reply's code or any recipient's: 550, 55x, 5xx"),
    "outcome": (True, _field_matches("outcome"), "the outcome matches RE, e.g. refused, accepted"),
    "slow": (True, _slow, "waited at least SECONDS on the upstream: 2, 0.5s, 500ms"),
    "tls": (False, _tls, "TLS details were logged"),
}


# -- the parser ------------------------------------------------------------------------

class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.position = 0

    def skip(self) -> str:
        """Skip spaces; the next character ('' at the end)."""
        while self.position < len(self.text) and self.text[self.position].isspace():
            self.position += 1
        return self.text[self.position] if self.position < len(self.text) else ""

    def parse(self) -> Node:
        if not self.skip():
            raise FilterError("empty filter", self.position)
        node = self.either()
        if char := self.skip():
            if char == ")":
                raise FilterError("')' closes no '('", self.position)
            raise FilterError(f"expected '&', '|' or the end, not {char!r}", self.position)
        return node

    def either(self) -> Node:
        node = self.both()
        while self.skip() == "|":
            self.position += 1
            node = Or(node, self.both())
        return node

    def both(self) -> Node:
        node = self.negation()
        while True:
            char = self.skip()
            if char == "&":
                self.position += 1
            elif char not in ("~", "!", "("):
                return node
            node = And(node, self.negation())

    def negation(self) -> Node:
        char = self.skip()
        if char == "!":
            self.position += 1
            return Not(self.negation())
        if char == "(":
            opened = self.position
            self.position += 1
            node = self.either()
            if self.skip() != ")":
                raise FilterError("'(' is never closed", opened)
            self.position += 1
            return node
        if char == "~":
            return self.term()
        if not char:
            raise FilterError("expected a term (~from, ~to, ...), '!' or '(' at the end", self.position)
        raise FilterError(f"expected a term (~from, ~to, ...), '!' or '(', not {char!r}", self.position)

    def term(self) -> Term:
        start = self.position
        self.position += 1
        match = re.compile(r"[a-z]*").match(self.text, self.position)
        assert match is not None
        name = match[0]
        self.position = match.end()
        if name not in OPERATORS:
            known = " ".join(f"~{op}" for op in OPERATORS)
            raise FilterError(f"unknown term ~{name} (known: {known})", start)
        takes_arg, build, _ = OPERATORS[name]
        if not takes_arg:
            return Term(name, None, build("", start))
        had_space = self.skip() != "" and self.position > match.end()
        if not had_space:
            what = "the end" if self.position >= len(self.text) else repr(self.text[self.position])
            raise FilterError(f"~{name} needs an argument after a space, not {what}", self.position)
        arg_position = self.position
        arg = self.argument()
        return Term(name, arg, build(arg, arg_position))

    def argument(self) -> str:
        quote_char = self.text[self.position]
        if quote_char not in "\"'":
            end = _bare_end(self.text, self.position)
            if end == self.position:
                raise FilterError(f"expected an argument, not {quote_char!r}", self.position)
            arg, self.position = self.text[self.position:end], end
            return arg
        start = self.position
        chars = []
        position = start + 1
        while position < len(self.text):
            char = self.text[position]
            if char == "\\" and position + 1 < len(self.text) and self.text[position + 1] in (quote_char, "\\"):
                chars.append(self.text[position + 1])
                position += 2
            elif char == quote_char:
                self.position = position + 1
                return "".join(chars)
            else:
                chars.append(char)
                position += 1
        raise FilterError(f"the quote {quote_char} is never closed", start)


def parse(text: str) -> Node:
    """The filter ``text`` as a tree that can be called on a record; FilterError if it is bad."""
    return _Parser(text).parse()
