"""Who the client really is, told to an upstream that trusts pipeproxy: XCLIENT and XFORWARD.

Behind pipeproxy every session comes from pipeproxy's own address, so an MTA's rules by
client address (a relay permitted to ``mynetworks``) would judge pipeproxy, not the
client. Postfix's XCLIENT (also Exim 4.98 and later) lets a trusted client replace the
session's client attributes: the server then answers with a new ``220`` and the session
starts again. XFORWARD only changes what the MTA logs (content filter set-ups). Both
take ``NAME=VALUE`` attributes with values in xtext (RFC 3461 §4), and only the
attributes the server listed after the keyword in its EHLO reply may be sent.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

from .config import Address

UNAVAILABLE: Final = b"[UNAVAILABLE]"
# Postfix reads XCLIENT and XFORWARD as ordinary command lines; staying within RFC 5321's
# 512 octets keeps any MTA's line limit happy. The HELO name is what may be long.
MAX_LINE: Final = 512


def xtext(value: bytes) -> bytes:
    """RFC 3461 §4: printable ASCII but "+" and "=" as is, every other octet as +XX."""
    return b"".join(
        bytes([octet]) if 0x21 <= octet <= 0x7E and octet not in b"+=" else b"+%02X" % octet for octet in value
    )


def offered_attributes(parameters: str) -> frozenset[str]:
    """The attribute names an EHLO line such as ``XCLIENT NAME ADDR PORT`` lists."""
    return frozenset(name.upper() for name in parameters.split())


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    address: Address  # the real client: from a PROXY header, or the connection's peer
    server: Address | None  # where the client connected to, when known
    helo: bytes  # the client's own EHLO or HELO argument, as it sent it
    esmtp: bool  # it said EHLO (not HELO)
    session: str  # pipeproxy's id for the session, for IDENT

    def _addr(self, address: Address) -> bytes:
        try:
            ip = ipaddress.ip_address(address.host)
        except ValueError:
            return UNAVAILABLE
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped  # an IPv4 client on a dual-stack socket
        # Postfix writes IPv6 addresses with an "IPV6:" prefix, as in address literals.
        return f"IPV6:{ip}".encode() if ip.version == 6 else str(ip).encode()

    def _attributes(self) -> list[tuple[str, bytes]]:
        attributes = [
            ("NAME", UNAVAILABLE),  # pipeproxy does no reverse lookup of its own
            ("ADDR", self._addr(self.address)),
            ("PORT", str(self.address.port).encode()),
            ("PROTO", b"ESMTP" if self.esmtp else b"SMTP"),
            ("HELO", xtext(self.helo) if self.helo else UNAVAILABLE),
            ("IDENT", xtext(self.session.encode())),
            ("SOURCE", b"REMOTE"),
        ]
        if self.server is not None:
            attributes += [("DESTADDR", self._addr(self.server)), ("DESTPORT", str(self.server.port).encode())]
        return attributes


def command_line(verb: bytes, identity: ClientIdentity, offered: frozenset[str]) -> bytes:
    """``XCLIENT`` or ``XFORWARD`` with each attribute the server offered, within MAX_LINE.

    XCLIENT takes NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT; XFORWARD takes NAME
    ADDR PORT PROTO HELO IDENT SOURCE. LOGIN is never sent: pipeproxy authenticates no one.
    If the line would be too long, the HELO name is left out (the MTA learns it from the
    EHLO that follows an XCLIENT anyway).
    """
    parts = [b"%s=%s" % (name.encode(), value) for name, value in identity._attributes() if name in offered]
    line = b" ".join([verb, *parts])
    if len(line) + 2 > MAX_LINE:
        line = b" ".join([verb, *(part for part in parts if not part.startswith(b"HELO="))])
    return line
