"""The EHLO reply a client sees: the upstream's, rewritten for what pipeproxy relays.

A pure function of (upstream reply, policy). The first line of an EHLO reply is the
server's greeting text and is kept; each further line is one extension keyword with its
parameters (RFC 5321 §4.1.1.1). Keywords are compared case-insensitively and order is
kept; PIPELINING is added because pipeproxy itself implements it (RFC 2920), and the
extensions a line-oriented proxy cannot relay are removed:

* CHUNKING, BINARYMIME: BDAT chunks are octet-counted and not dot-stuffed (RFC 3030);
  a proxy that advertised them without parsing BDAT lost mail (Mailu#1766).
* PIPE_CONNECT, X_PIPE_CONNECT: the client would send before the greeting.
* STARTTLS: the upstream's is never relayed (pipeproxy would go blind inside it);
  pipeproxy offers its own when it has a certificate, and terminates TLS itself.
* XCLIENT, XFORWARD: an MTA offers them to pipeproxy because it trusts pipeproxy; a
  client must never get to say who it is in pipeproxy's name.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from .wire import Reply

PIPELINING: Final = "PIPELINING"
NOT_RELAYABLE: Final = frozenset(
    {"CHUNKING", "BINARYMIME", "PIPE_CONNECT", "X_PIPE_CONNECT", "STARTTLS", "XCLIENT", "XFORWARD"}
)


def keyword(line: str) -> str:
    """The extension keyword of one EHLO line, upper-cased."""
    return line.split(" ", 1)[0].upper()


def offered(upstream: Reply) -> dict[str, str]:
    """The keywords of an EHLO reply, upper-cased, each with its parameters."""
    return {keyword(line): line.partition(" ")[2] for line in upstream.lines[1:]}


def normalise_keywords(words: Iterable[str]) -> frozenset[str]:
    """Operator-given keywords (any case, blanks ignored) as a set to compare against."""
    return frozenset(word.strip().upper() for word in words if word.strip())


def rewrite_ehlo(
    upstream: Reply, discard: frozenset[str] = frozenset(), max_size: int = 0, added: tuple[str, ...] = ()
) -> tuple[Reply, tuple[str, ...]]:
    """The client's EHLO reply, and the keywords removed from the upstream's.

    ``discard`` holds extra keywords to drop, upper-cased; PIPELINING is never dropped,
    since pipeproxy provides it whatever the upstream does. ``max_size``, if set, is
    pipeproxy's own message size limit: the advertised SIZE becomes the smaller of the
    two (RFC 1870 §4; SIZE 0 or no number means no limit). ``added``: keywords pipeproxy
    offers itself (STARTTLS, when it terminates TLS), put before PIPELINING.
    """
    greeting, *extensions = upstream.lines
    removed = NOT_RELAYABLE | (discard - {PIPELINING})
    kept = [line for line in extensions if keyword(line) not in removed]
    dropped = tuple(keyword(line) for line in extensions if keyword(line) in removed)
    if max_size:
        sizes = [i for i, line in enumerate(kept) if keyword(line) == "SIZE"]
        if not sizes:
            kept.append(f"SIZE {max_size}")
        for i in sizes:
            limit = kept[i].partition(" ")[2].strip()
            if not limit.isdigit() or int(limit) == 0 or int(limit) > max_size:
                kept[i] = f"SIZE {max_size}"
    kept += added
    if not any(keyword(line) == PIPELINING for line in kept):
        kept.append(PIPELINING)
    return Reply(upstream.code, (greeting, *kept)), dropped


def ehlo_from_helo(helo: Reply, max_size: int = 0, added: tuple[str, ...] = ()) -> Reply:
    """A valid EHLO reply for a client whose upstream only speaks HELO (RFC 5321 §4.1.1.1),
    with pipeproxy's own SIZE limit when it has one and the keywords it offers itself."""
    return Reply(helo.code, (helo.lines[0], *((f"SIZE {max_size}",) if max_size else ()), *added, PIPELINING))
