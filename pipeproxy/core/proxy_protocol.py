"""The PROXY protocol header (HAProxy's spec, versions 1 and 2), read and written with no I/O.

A load balancer in front of pipeproxy opens each connection with one header saying who
the real client is. ``parse(data)`` returns ``None`` while the header is incomplete, or
``(client, consumed)``: the client's address (``None`` for a LOCAL or UNKNOWN header,
meaning "use the connection's own") and how many octets the header took. Anything else
raises ``ValueError``: pipeproxy then closes the connection, since a client that speaks
SMTP where a header must be is not behind the trusted balancer.

``header(version, client, server)`` writes one, for an upstream that expects pipeproxy to
say who the client is (Postfix ``smtpd_upstream_proxy_protocol = haproxy``, Exim
``proxy_protocol_hosts``).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final

from .config import Address

V1_PREFIX: Final = b"PROXY "
V1_MAX: Final = 107  # the spec's longest v1 line, CRLF included
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX_PAYLOAD: Final = 4096  # addresses plus TLVs; real headers are far smaller


def parse(data: bytes) -> tuple[Address | None, int] | None:
    if data.startswith(V2_SIGNATURE[: len(data)]) and len(data) < 16:
        return None
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if len(data) < len(V1_PREFIX) and V1_PREFIX.startswith(data):
        return None
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    raise ValueError("no PROXY protocol header")


def _parse_v1(data: bytes) -> tuple[Address | None, int] | None:
    end = data.find(b"\r\n")
    if end < 0:
        if len(data) >= V1_MAX:
            raise ValueError("PROXY v1 line too long")
        return None
    if end + 2 > V1_MAX:
        raise ValueError("PROXY v1 line too long")
    fields = data[:end].decode("ascii", "replace").split(" ")
    if fields[1:2] == ["UNKNOWN"]:
        return None, end + 2
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ValueError("malformed PROXY v1 line")
    _, family, source, _, source_port, _ = fields
    ip = ipaddress.ip_address(source)  # ValueError if it is not an address
    if (family == "TCP4") != (ip.version == 4) or not source_port.isdigit() or int(source_port) > 65535:
        raise ValueError("malformed PROXY v1 line")
    return Address(str(ip), int(source_port)), end + 2


def _parse_v2(data: bytes) -> tuple[Address | None, int] | None:
    version_command, family, length = struct.unpack("!BBH", data[12:16])
    if version_command >> 4 != 2 or version_command & 0x0F not in (0, 1):
        raise ValueError("bad PROXY v2 version or command")
    if length > V2_MAX_PAYLOAD:
        raise ValueError("PROXY v2 header too long")
    if len(data) < 16 + length:
        return None
    payload = data[16 : 16 + length]
    consumed = 16 + length
    if version_command & 0x0F == 0:  # LOCAL: a health check from the balancer itself
        return None, consumed
    if family == 0x11 and length >= 12:  # TCP over IPv4
        source, _, source_port, _ = struct.unpack("!4s4sHH", payload[:12])
        return Address(str(ipaddress.IPv4Address(source)), source_port), consumed
    if family == 0x21 and length >= 36:  # TCP over IPv6
        source, _, source_port, _ = struct.unpack("!16s16sHH", payload[:36])
        return Address(str(ipaddress.IPv6Address(source)), source_port), consumed
    if family == 0x00:  # UNSPEC
        return None, consumed
    raise ValueError("unsupported PROXY v2 address family")



def header(version: str, client: Address, server: Address) -> bytes:
    """The header pipeproxy writes first on an upstream connection: ``client`` connected to
    ``server`` (``version`` "v1" or "v2"). A client that is not an IP address (a stream
    with no socket) is sent as UNKNOWN in v1 and LOCAL in v2: the receiver then uses the
    connection's own address, as the spec says."""
    try:
        source, destination = ipaddress.ip_address(client.host), ipaddress.ip_address(server.host)
    except ValueError:
        return b"PROXY UNKNOWN\r\n" if version == "v1" else V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, 0)
    source, destination = _unmapped(source), _unmapped(destination)
    if source.version != destination.version:
        # The client's own family wins: an MTA judging 127.0.0.2 by its IPv4 rules must
        # not be shown ::ffff:127.0.0.2. The other end becomes the family's "any".
        destination = ipaddress.ip_address("0.0.0.0" if source.version == 4 else "::")
    if version == "v1":
        tcp = "TCP4" if source.version == 4 else "TCP6"
        return f"PROXY {tcp} {source} {destination} {client.port} {server.port}\r\n".encode()
    family, size = (0x11, 12) if source.version == 4 else (0x21, 36)
    addresses = source.packed + destination.packed + struct.pack("!HH", client.port, server.port)
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, size) + addresses


IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _unmapped(ip: IP) -> IP:
    """An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d: it is a.b.c.d."""
    return ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
