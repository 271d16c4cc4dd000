"""Who may come in: the operator's allow and deny lists, decided per client address.

pipeproxy now knows the real client (its socket, or a PROXY header), so it is the place
to refuse one, before any upstream session is opened. Deny wins; with an allow list, only
its networks come in. An IPv4 client on a dual-stack socket (``::ffff:a.b.c.d``) is
judged by its IPv4 address, so one rule covers it however it arrived.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address to judge ``host`` by, or None if it is not an IP address."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # a scoped IPv6 address: drop the zone
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def refusal(host: str, allow: Sequence[Network], deny: Sequence[Network]) -> str | None:
    """Why ``host`` may not come in ("denied", "not allowed"), or None if it may."""
    ip = client_ip(host)
    if ip is not None and any(ip in network for network in deny):
        return "denied"
    if allow and (ip is None or not any(ip in network for network in allow)):
        return "not allowed"
    return None
