"""``pipeproxy inspect``: its options, and the run that wires input, filter and output."""

from __future__ import annotations

import argparse
import gzip
import os
import sys
from collections.abc import Iterator

from . import filters, outputs
from .reading import Grouper, follow_lines, read_lines

DESCRIPTION = (
    "Read pipeproxy's JSON log lines (files, plain or gzip, or standard input: '-' or no FILE) and show "
    "what happened: one line per mail transaction by default. Lines that are not pipeproxy's JSON are "
    "skipped and counted on standard error. Example: docker logs pipeproxy 2>&1 | pipeproxy inspect -f '~code 5xx'"
)

FILTER_HELP = "\n".join(
    [
        "filter expressions (-f):",
        *(f"  ~{name}{' ' + arg if arg else ''}  {text}" for name, arg, text in (
            (name, {"from": "RE", "to": "RE", "client": "CIDR|RE", "helo": "RE", "session": "ID", "code": "N",
                    "outcome": "RE", "slow": "SECONDS"}.get(name, ""), text)
            for name, (_, _, text) in filters.OPERATORS.items())),
        "  combined with ! (not), & (and), | (or) and parentheses; ! binds tightest, then &, then |;",
        "  two terms side by side mean &. Regular expressions are searched, ignoring case. An argument",
        "  runs to the next space (or a ')' it did not open); quote it (\"a b\") to hold spaces.",
        "  e.g.  -f '~to @example\\.com & ~code 5xx'   -f '~client 10.0.0.0/8 & !~outcome accepted'",
    ]
)

SUMMARY_HELP = (
    "counts instead of transactions: sessions and why they closed, transactions by outcome, reply codes, "
    "refused recipients by reason (addresses in the text shown as <…>), upstream wait p50/p99 (to within 1%%), "
    "and client round trips saved: over the transactions, the replies the client got minus the writes it sent "
    "them in (sum of groups minus their number), i.e. what one round trip per command would have cost more"
)


def _filter(text: str) -> filters.Node:
    try:
        return filters.parse(text)
    except filters.FilterError as error:
        raise argparse.ArgumentTypeError(f"bad filter {text!r} at {error}") from None


USAGE = "[-f EXPR] [--json | --session ID | --summary] [--follow] [FILE ...]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = FILTER_HELP
    parser.add_argument("files", nargs="*", metavar="FILE", help="log files, plain or gzip ('-': standard input)")
    parser.add_argument("-f", "--filter", type=_filter, metavar="EXPR", help="only the transactions it picks")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="one JSON object per transaction")
    shown.add_argument("--session", metavar="ID", help="that session (an id, or its start) as a timeline")
    shown.add_argument("--summary", action="store_true", help=SUMMARY_HELP)
    parser.add_argument("--follow", action="store_true",
                        help="keep reading one FILE (or standard input) as it grows, printing matches as they come")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour the text outputs: auto means on a terminal (default: auto)")
    parser.add_argument("--no-header", action="store_true", help="the table without its heading line")


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.follow and (args.summary or len(args.files) > 1):
        parser.error("--follow reads one FILE (or standard input) and prints the table, JSON or a session")
    for name in args.files:
        if name != "-":
            try:
                open(name, "rb").close()
            except OSError as error:
                parser.error(f"cannot read {name}: {error.strerror}")
    if args.session is not None and not (args.session and all(c in "0123456789abcdefABCDEF" for c in args.session)):
        parser.error(f"--session: a session id is hex digits, not {args.session!r}")


def run(args: argparse.Namespace) -> int:
    names = args.files or ["-"]
    stdout = sys.stdout
    color = args.color == "always" or (args.color == "auto" and stdout.isatty())
    flush = args.follow
    writer = outputs.Writer(stdout, color, flush=flush)
    output: outputs.Table | outputs.Json | outputs.Timeline | outputs.Summary
    keep = None
    if args.json:
        output = outputs.Json(stdout, flush=flush)
    elif args.session is not None:
        prefix = args.session.lower()
        output = outputs.Timeline(writer)
        keep = lambda session_id: session_id.startswith(prefix)  # noqa: E731
    elif args.summary:
        output = outputs.Summary(writer, filtered=args.filter is not None)
    else:
        output = outputs.Table(writer, header=not args.no_header)
    picks = args.filter
    transaction = output.transaction
    on_transaction = transaction if picks is None else lambda line, session: picks(line) and transaction(line, session)
    grouper = Grouper(on_transaction, output.session, keep)
    lines: Iterator[bytes] = follow_lines(names[0]) if args.follow else read_lines(names)
    status = 0
    try:
        grouper.feed_all(lines)
    except KeyboardInterrupt:
        status = 130
    except OSError as error:
        if isinstance(error, BrokenPipeError):
            _quiet_stdout()
            return 0
        print(f"pipeproxy inspect: error: {error}", file=sys.stderr)
        status = 1
    except (EOFError, gzip.BadGzipFile) as error:
        print(f"pipeproxy inspect: error: a gzip input is cut short or corrupt: {error}", file=sys.stderr)
        status = 1
    try:
        grouper.finish()
        if isinstance(output, outputs.Summary):
            output.events = grouper.counts.events
        output.finish()
        stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
        return status
    counts = grouper.counts
    if counts.skipped:
        print(f"pipeproxy inspect: skipped {counts.skipped} of {counts.lines} lines that are not pipeproxy's "
              f"JSON log lines (the first: line {counts.first_skipped})", file=sys.stderr)
    if isinstance(output, outputs.Timeline) and not output.shown and status == 0:
        print(f"pipeproxy inspect: no session {args.session} in the input", file=sys.stderr)
        status = 1
    return status


def _quiet_stdout() -> None:
    """After a reader such as ``head`` left: no second error when Python flushes stdout at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
