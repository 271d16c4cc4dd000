"""``pipeproxy demo``: see pipeproxy work on a fresh machine, no MTA needed.

Starts the bundled strict legacy MTA (no PIPELINING, refuses early input) and pipeproxy
in front of it, both on 127.0.0.1, then sends one pipelined message to ten recipients
twice: straight at the legacy MTA, which refuses it, and through pipeproxy, which
delivers it. It prints pipeproxy's own log lines and the round trips saved.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TextIO

import trio

from ..core.config import Address, Config
from ..shell import logging_setup as logs
from ..shell.server import serve
from .client import SMTPClient, envelope_lines
from .legacy_mta import LegacyMTA

RECIPIENTS = [f"user{i}@legacy.test" for i in range(1, 11)]
SENDER = "demo@client.test"
CONTENT = b"From: demo@client.test\r\nSubject: pipeproxy demo\r\n\r\nHello through pipeproxy.\r\n"
ASSUMED_RTT = 0.1  # seconds: a client 100 ms away, for the worked example


async def run_demo(config: Config, out: TextIO) -> int:
    say = lambda text="": print(text, file=out, flush=True)  # noqa: E731
    mta = LegacyMTA(reply_delay=0.002)
    async with trio.open_nursery() as nursery:
        [mta_listener] = await nursery.start(mta.serve, "127.0.0.1", 0)
        mta_address = Address(*mta_listener.socket.getsockname()[:2])
        # The given Config, not a fresh one: the session reads log_level to log commands.
        config = dataclasses.replace(config, listen=Address("127.0.0.1", 0), upstream=mta_address)
        [proxy_listener] = await nursery.start(serve, config)
        proxy_address = Address(*proxy_listener.socket.getsockname()[:2])

        say(f"\n== 1. A pipelining client straight at the legacy MTA ({mta_address})")
        direct = await SMTPClient.connect(*mta_address)
        await direct.read_reply()
        await direct.exchange(b"EHLO client.test\r\n")
        [answer] = await direct.exchange(*envelope_lines(SENDER, RECIPIENTS), replies=1)
        await direct.aclose()
        say(f"   MAIL, {len(RECIPIENTS)} RCPT and DATA in one write: the legacy MTA answered "
            f"'{answer.code} {answer.text}' and hung up ({', '.join(mta.violations)})")

        say(f"\n== 2. The same client through pipeproxy ({proxy_address} -> {mta_address})")
        commands_before, violations_before = len(mta.commands), len(mta.violations)
        client = await SMTPClient.connect(*proxy_address)
        await client.read_reply()
        [ehlo] = await client.exchange(b"EHLO client.test\r\n")
        replies = await client.send_mail(SENDER, RECIPIENTS, CONTENT, pipelining=True)
        await client.exchange(b"QUIT\r\n")
        await client.aclose()
        nursery.cancel_scope.cancel()

    final = replies[-1]
    accepted = sum(reply.code == 250 for reply in replies[1:-2])
    lockstep = 1 + 1 + len(RECIPIENTS) + 2 + 1 + 1  # greeting, EHLO, MAIL+RCPTs+DATA, dot, QUIT
    say("\n== What happened")
    say(f"   EHLO through pipeproxy offered: {', '.join(ehlo.lines[1:])}")
    say(f"   {accepted} of {len(RECIPIENTS)} recipients accepted; message: {final.code} {final.text}")
    say(f"   the legacy MTA got {len(mta.commands) - commands_before} commands one at a time, "
        f"and counted {len(mta.violations) - violations_before} synchronization errors from pipeproxy")
    say(f"   client round trips: {client.round_trips} through pipeproxy, instead of {lockstep} lock-step")
    say(f"   with the client {ASSUMED_RTT * 1000:.0f} ms away: about {client.round_trips * ASSUMED_RTT:.1f} s "
        f"instead of {lockstep * ASSUMED_RTT:.1f} s of waiting")
    delivered = final.code == 250 and len(mta.messages) == 1 and len(mta.violations) == violations_before
    return 0 if delivered else 1


def main(config: Config, out: TextIO = sys.stdout) -> int:
    """Run the demo with ``config``'s logging; 0 if the message was delivered as it should be."""
    logs.configure(config.log_format, config.log_level, out)
    return trio.run(run_demo, config, out)
