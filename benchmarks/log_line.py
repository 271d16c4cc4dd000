"""What one ``transaction`` log line costs: rendering and writing it, and the metrics it feeds.

The line goes the way a session's lines go (``shell/connection.py``): a logger bound to
the session's context, called at the event's level with the Session's fields, its
output to /dev/null; then ``Metrics.observe`` with the same fields. Prints the best of
several runs, in microseconds a line.

    .venv/bin/python benchmarks/log_line.py
    .venv/bin/python benchmarks/log_line.py --multiprocess   # a worker's metrics (files)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import timeit
from pathlib import Path
from typing import Any

# The checkout's pipeproxy, not whichever the interpreter has installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FIELDS: dict[str, Any] = {
    "helo": "mail17.client.example",
    "sender": "sender42@client.example",
    "recipients": [{"address": f"user{n}@dest{n}.example", "code": 250} for n in range(5)],
    "recipients_accepted": 5,
    "recipients_rejected": 0,
    "size": 48_213,
    "message_id": "<8f3a2c1d9e7b6a5f@client.example>",
    "queue_id": "4F3A1B2C9D",
    "reply_code": 250,
    "reply": "2.0.0 Ok: queued as 4F3A1B2C9D",
    "outcome": "message accepted",
    "upstream_wait": 0.012345,
    "tls": None,
    "groups": [1, 7, 1],
}


def best(statement: Any, number: int, repeat: int) -> float:
    """Microseconds a call, the best of ``repeat`` runs of ``number`` calls."""
    return min(timeit.repeat(statement, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--number", type=int, default=20_000, help="calls a run (default 20,000)")
    parser.add_argument("--repeat", type=int, default=7, help="runs; the best counts (default 7)")
    parser.add_argument("--multiprocess", action="store_true", help="metrics as a worker keeps them, in files")
    args = parser.parse_args()
    if args.multiprocess:  # before prometheus_client is imported: it picks its storage then
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="pipeproxy-bench-")

    import structlog
    from prometheus_client import CollectorRegistry

    from pipeproxy.core import logschema as L
    from pipeproxy.core.actions import Log
    from pipeproxy.shell import logging_setup, metrics

    with open(os.devnull, "w") as devnull:
        logging_setup.configure("json", "info", devnull)
        log = structlog.get_logger("pipeproxy.session").bind(
            session="3f2a9c1b7d0e", client="10.1.2.3:40000", upstream="127.0.0.1:25"
        )
        action = Log(L.TRANSACTION.level, L.TRANSACTION.name, FIELDS)
        counted = metrics.Metrics(None if args.multiprocess else CollectorRegistry())

        def line() -> None:
            getattr(log, action.level)(action.event, **action.fields)

        def observe() -> None:
            counted.observe(action.event, action.fields)

        line_us = best(line, args.number, args.repeat)
        observe_us = best(observe, args.number, args.repeat)
    print(f"python {sys.version.split()[0]}, structlog {structlog.__version__}")
    print(f"transaction line, rendered and written: {line_us:.2f} µs")
    print(f"Metrics.observe ({'multiprocess' if args.multiprocess else 'single process'}): {observe_us:.2f} µs")


if __name__ == "__main__":
    main()
