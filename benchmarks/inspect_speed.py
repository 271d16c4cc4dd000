"""How fast ``pipeproxy inspect`` reads a big log, and how much memory it takes.

Writes a generated log of N lines (default 1,000,000) in pipeproxy's JSON format:
sessions of open, greeting, EHLO, one to three transactions (recipients with their
codes, some refused), and close, 64 of them open at any moment and their lines
interleaved, as a busy proxy writes them. Then runs ``python -m pipeproxy inspect``
over it in each mode, output to /dev/null, and prints wall time and peak resident
memory (the child's ru_maxrss) for each, as a Markdown table.

    .venv/bin/python benchmarks/inspect_speed.py               # 1,000,000 lines
    .venv/bin/python benchmarks/inspect_speed.py --lines 200000 --keep /tmp/big.log
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

START = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
OPEN_AT_ONCE = 64


def session_lines(rng: random.Random, number: int) -> list[dict[str, Any]]:
    """One session's lines (without timestamps), in order."""
    session = f"{number:012x}"
    context = {"session": session, "client": f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}:"
               f"{rng.randrange(1024, 65536)}", "upstream": "127.0.0.1:25"}
    helo = f"mail{rng.randrange(1000)}.client.example"
    lines: list[dict[str, Any]] = [
        {**context, "server": "127.0.0.1:2525", "event": "session open", "level": "info"},
        {**context, "code": 220, "event": "upstream greeting", "level": "info"},
        {**context, "removed": [], "event": "ehlo rewritten", "level": "info"},
    ]
    for _ in range(rng.choice((1, 1, 2, 3))):
        recipients = []
        for index in range(rng.choice((1, 1, 2, 5, 10))):
            address = f"user{rng.randrange(10000)}@dest{index % 7}.example"
            if rng.random() < 0.05:
                recipients.append({"address": address, "code": 550,
                                   "reply": f"5.1.1 <{address}>: Recipient address rejected: User unknown"})
            else:
                recipients.append({"address": address, "code": 250})
        accepted = sum(r["code"] == 250 for r in recipients)
        queue = f"{rng.getrandbits(40):010X}"
        lines.append({
            **context, "helo": helo, "sender": f"sender{rng.randrange(500)}@client.example",
            "recipients": recipients, "recipients_accepted": accepted,
            "recipients_rejected": len(recipients) - accepted, "size": rng.randrange(500, 200_000),
            "message_id": f"<{rng.getrandbits(64):x}@client.example>", "queue_id": queue if accepted else None,
            "reply_code": 250 if accepted else 554, "reply": f"2.0.0 Ok: queued as {queue}" if accepted
            else "5.5.1 Error: no valid recipients",
            "outcome": "message accepted" if accepted else "DATA refused",
            "upstream_wait": round(rng.expovariate(1 / 0.02), 6), "groups": [len(recipients) + 2, 1],
            "event": "transaction", "level": "info",
        })
    lines.append({**context, "reason": "client quit", "duration": round(rng.uniform(0.01, 2), 6),
                  "commands": 8, "messages": len(lines) - 3, "event": "session closed", "level": "info"})
    return lines


def generate(count: int, seed: int = 11) -> Iterator[str]:
    """``count`` lines, sessions interleaved ``OPEN_AT_ONCE`` at a time."""
    rng = random.Random(seed)
    active: list[list[dict]] = []
    number = 0
    clock = START
    written = 0
    while written < count:
        while len(active) < OPEN_AT_ONCE:
            number += 1
            active.append(session_lines(rng, number)[::-1])
        lines = active[rng.randrange(len(active))]
        line = lines.pop()
        if not lines:
            active.remove(lines)
        clock += timedelta(microseconds=rng.randrange(50, 500))
        line["timestamp"] = clock.isoformat().replace("+00:00", "Z")
        yield json.dumps(line)
        written += 1


def measure(args: list[str], log: str) -> tuple[float, int, int]:
    """Wall seconds, peak RSS in kB, and exit status of ``pipeproxy inspect ARGS LOG``."""
    with open(os.devnull, "w") as devnull:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "pipeproxy", "inspect", *args, log], stdout=devnull)
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return elapsed, usage.ru_maxrss, process.returncode


MODES = [
    ("table, every transaction", []),
    ("table, -f '~to @dest3 & ~code 5xx'", ["-f", "~to @dest3 & ~code 5xx"]),
    ("table, -f '~client 10.1.0.0/16 | ~slow 100ms'", ["-f", "~client 10.1.0.0/16 | ~slow 100ms"]),
    ("--json", ["--json"]),
    ("--summary", ["--summary"]),
    ("--session 0000000003e8", ["--session", "0000000003e8"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--keep", metavar="PATH", help="write the log here and leave it")
    parser.add_argument("--gzip", action="store_true", help="measure the gzip-compressed log too")
    options = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="inspect-speed-")
    log = options.keep or os.path.join(directory, "pipeproxy.log")
    started = time.perf_counter()
    with open(log, "w") as out:
        for line in generate(options.lines):
            out.write(line + "\n")
    size = os.path.getsize(log)
    print(f"generated {options.lines:,} lines, {size / 1e6:.0f} MB, in {time.perf_counter() - started:.1f} s\n")
    inputs = [("plain", log)]
    if options.gzip:
        with open(log, "rb") as plain, gzip.open(log + ".gz", "wb", compresslevel=6) as packed:
            packed.writelines(plain)
        inputs.append(("gzip", log + ".gz"))
    print("| input | mode | seconds | lines/s | peak RSS |")
    print("| --- | --- | ---: | ---: | ---: |")
    for kind, path in inputs:
        for name, args in MODES:
            elapsed, peak, status = measure(args, path)
            assert status == 0, f"{name}: exit status {status}"
            shown = name.replace("|", "\\|")  # a | inside a Markdown cell
            print(f"| {kind} | {shown} | {elapsed:.1f} | {options.lines / elapsed:,.0f} | {peak / 1024:.0f} MB |",
                  flush=True)
    if not options.keep:
        for path in (log, log + ".gz"):
            if os.path.exists(path):
                os.remove(path)
        os.rmdir(directory)


if __name__ == "__main__":
    main()
