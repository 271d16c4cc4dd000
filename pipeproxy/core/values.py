"""Setting values from text, and defaults back to text: the parsers Config's settings name.

Pure functions shared by flags and ``PIPEPROXY_*`` variables, so both accept and refuse
exactly the same text. A parser returns the value or raises ValueError with a reason an
operator can act on. Nothing here knows about argparse.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from collections.abc import Callable, Sequence
from typing import Any


def _whole(text: str) -> int | None:
    text = text.strip()
    # isdigit() admits '²', which int() refuses; ASCII decimal digits are what we mean.
    if not (text.isascii() and text.isdecimal()):
        return None
    try:
        return int(text)
    except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
        return None


def positive_int(text: str) -> int:
    value = _whole(text)
    if value is None or value <= 0:
        raise ValueError(f"{text!r} is not a positive whole number")
    return value


def non_negative_int(text: str) -> int:
    value = _whole(text)
    if value is None:
        raise ValueError(f"{text!r} is not a whole number (0 or more)")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def seconds(text: str) -> float:
    value = _number(text)
    if not 0 <= value < math.inf:
        raise ValueError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def timeout(names: Sequence[str]) -> Callable[[str], tuple[str, float]]:
    """A parser of ``NAME=SECONDS`` for the timeouts called ``names``."""

    def parse(text: str) -> tuple[str, float]:
        name, _, number = text.partition("=")
        name = name.strip().lower().replace("-", "_")
        if name not in names:
            raise ValueError(f"{text!r}: timeout name must be one of {', '.join(names)}")
        value = _number(number)
        if not 0 < value < math.inf:
            raise ValueError(f"{text!r}: give NAME=SECONDS with a positive number of seconds")
        return name, value

    return parse


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise ValueError(f"{text!r} is not on or off")
    return text == "on"


def network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR block (``192.0.2.0/24``, ``2001:db8::/32``) or one address (a /32 or /128)."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or CIDR block") from None


def show(value: Any) -> str:
    """A default as an operator would write it: 30 not 30.0, none for nothing."""
    if value is None or value == frozenset() or value == () or value == "":
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if dataclasses.is_dataclass(value):
        return ", ".join(f"{f.name}={show(getattr(value, f.name))}" for f in dataclasses.fields(value))
    return str(value)
