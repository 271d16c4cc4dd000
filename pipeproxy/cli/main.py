"""The ``pipeproxy`` command: flags and ``PIPEPROXY_*`` variables to a Config, then run.

``pipeproxy [OPTIONS]`` runs the proxy; ``pipeproxy demo`` shows it working with no MTA;
``pipeproxy health`` asks a running proxy's health endpoint.
Every option can come from an environment variable; a flag given on the command line
wins. Any bad value ends the program with one line on stderr and status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ..demo import run as demo
from ..shell import logging_setup as logs
from ..core.ehlo import normalise_keywords
from ..core.config import Address, BareLineEndings, Config, Timeouts
from ..shell import runner
from ..shell.health import check

ENV_PREFIX = "PIPEPROXY_"
TIMEOUT_NAMES = [f.name for f in dataclasses.fields(Timeouts)]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line, no usage block and no traceback: operators read logs.
        self.exit(2, f"{self.prog}: error: {message}\n")


def address(text: str) -> Address:
    try:
        parsed = Address.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    # A host that looks like an IP address must be one; other names are resolved later.
    if re.fullmatch(r"[0-9.]+|.*:.*", parsed.host):
        try:
            ipaddress.ip_address(parsed.host)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: {parsed.host!r} is not an IP address") from None
    return parsed


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def non_negative_int(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (0 or more)")
    return int(text)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def timeout(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    name = name.strip().lower().replace("-", "_")
    if name not in TIMEOUT_NAMES:
        raise argparse.ArgumentTypeError(f"{text!r}: timeout name must be one of {', '.join(TIMEOUT_NAMES)}")
    try:
        value = float(seconds)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=SECONDS with a positive number of seconds")
    return name, value


# (flag, environment suffix, type, repeatable, help). Help strings say the default.
OPTIONS: list[tuple[str, str, Callable[[str], Any], bool, dict[str, Any]]] = [
    ("--listen", "LISTEN", address, False,
     dict(metavar="HOST:PORT", help="where clients connect; [IPV6]:PORT for IPv6 (default 127.0.0.1:2525)")),
    ("--upstream", "UPSTREAM", address, False,
     dict(metavar="HOST:PORT", help="the legacy MTA to relay to (required)")),
    ("--log-format", "LOG_FORMAT", str, False,
     dict(choices=logs.FORMATS, help="json lines, or console for people (default console on a terminal, json otherwise)")),
    ("--log-level", "LOG_LEVEL", str.lower, False,
     dict(choices=logs.LEVELS, help="debug adds a line per command (default info)")),
    ("--discard-ehlo-keyword", "DISCARD_EHLO_KEYWORDS", str, True,
     dict(metavar="KEYWORD", help="an EHLO keyword to hide from clients, like Postfix's smtpd_discard_ehlo_keywords; "
          "repeat for more (variable: comma- or space-separated list)")),
    ("--max-line-length", "MAX_LINE_LENGTH", positive_int, False,
     dict(metavar="OCTETS", help="longest command line accepted, CRLF included; longer gets 500 (default 512, RFC 5321)")),
    ("--max-pipeline-bytes", "MAX_PIPELINE_BYTES", positive_int, False,
     dict(metavar="OCTETS", help="pipelined client input held while the upstream answers; "
          "beyond it pipeproxy stops reading (default 262144)")),
    ("--max-recipients", "MAX_RECIPIENTS", positive_int, False,
     dict(metavar="COUNT", help="RCPT commands per message; more get 452 (default 1000)")),
    ("--max-message-size", "MAX_MESSAGE_SIZE", non_negative_int, False,
     dict(metavar="OCTETS", help="pipeproxy's own message size limit: advertised in SIZE, larger messages get 552; "
          "0 leaves it to the upstream (default 0)")),
    ("--max-reply-size", "MAX_REPLY_SIZE", positive_int, False,
     dict(metavar="OCTETS", help="longest reply accepted from the upstream, all lines together; "
          "longer is a broken upstream and ends the session with 421 (default 16384)")),
    ("--max-sessions", "MAX_SESSIONS", positive_int, False,
     dict(metavar="COUNT", help="concurrent client sessions; beyond it a new client gets 421 at once (default 1000)")),
    ("--min-data-rate", "MIN_DATA_RATE", non_negative_int, False,
     dict(metavar="OCTETS_PER_SECOND", help="slowest message content accepted, averaged over the message, "
          "like Postfix's smtpd_min_data_rate; 0 turns it off (default 500)")),
    ("--proxy-protocol", "PROXY_PROTOCOL", str.lower, False,
     dict(choices=["off", "on"], help="on: every connection starts with a PROXY protocol v1 or v2 header (HAProxy, "
          "cloud load balancers) giving the real client, which the logs show; without one it is closed (default off)")),
    ("--health-listen", "HEALTH_LISTEN", address, False,
     dict(metavar="HOST:PORT", help="serve an HTTP health endpoint there (GET /health: 200 while serving, "
          "503 while draining); 'pipeproxy health' asks it (default: none)")),
    ("--workers", "WORKERS", positive_int, False,
     dict(metavar="COUNT", help="processes sharing the listening port with SO_REUSEPORT, to use more cores (default 1)")),
    ("--grace-period", "GRACE_PERIOD", seconds, False,
     dict(metavar="SECONDS", help="on SIGTERM or SIGINT, how long transactions in flight get to finish before "
          "the remaining sessions get 421 (default 30); a second signal ends it at once")),
    ("--bare-line-endings", "BARE_LINE_ENDINGS", str.lower, False,
     dict(choices=[policy.value for policy in BareLineEndings],
          help="bare CR, bare LF or NUL in message content: neutralise turns CR and LF into CRLF and drops NUL "
          "(default); reject refuses the message with 550")),
    ("--timeout", "TIMEOUTS", timeout, True,
     dict(metavar="NAME=SECONDS", help=f"override one timeout; NAME is one of {', '.join(TIMEOUT_NAMES)} "
          "(defaults from RFC 5321 4.5.3.2); repeat for more (variable: comma-separated list)")),
]


def build_parser() -> _Parser:
    parser = _Parser(
        prog="pipeproxy",
        description="SMTP proxy that gives a legacy MTA PIPELINING: clients pipeline, the upstream sees one "
        "command at a time. 'pipeproxy demo' shows it working with no MTA.",
        epilog="Each option can also be set by the environment variable named beside it; a flag wins.",
    )
    for flag, env, kind, repeatable, extra in OPTIONS:
        extra = dict(extra, help=f"{extra['help']} [${ENV_PREFIX}{env}]")
        parser.add_argument(flag, type=kind, action="append" if repeatable else "store", **extra)
    return parser


def from_environment(parser: _Parser, args: argparse.Namespace, environ: dict[str, str]) -> None:
    """Fill each option not given as a flag from its PIPEPROXY_ variable."""
    for flag, env, kind, repeatable, extra in OPTIONS:
        dest = flag.removeprefix("--").replace("-", "_")
        raw = environ.get(ENV_PREFIX + env, "").strip()
        if getattr(args, dest) is not None or not raw:
            continue
        values = [v for v in re.split(r"[,\s]+", raw) if v] if repeatable else [raw]
        try:
            converted = [kind(v) for v in values]
        except argparse.ArgumentTypeError as error:
            parser.error(f"{ENV_PREFIX}{env}: {error}")
        if "choices" in extra and any(v not in extra["choices"] for v in converted):
            parser.error(f"{ENV_PREFIX}{env}: {raw!r} is not one of {', '.join(extra['choices'])}")
        setattr(args, dest, converted if repeatable else converted[0])


def parse_config(argv: Sequence[str], environ: dict[str, str]) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)
    from_environment(parser, args, environ)
    if args.upstream is None:
        parser.error(f"--upstream HOST:PORT (or {ENV_PREFIX}UPSTREAM) is required")
    # Options named like Config's fields pass straight through when given.
    given = {
        name: value
        for name in ("listen", "upstream", "log_level", "max_line_length", "max_pipeline_bytes", "max_recipients",
                     "max_message_size", "max_reply_size", "max_sessions", "min_data_rate", "workers",
                     "grace_period", "health_listen")
        if (value := getattr(args, name)) is not None
    }
    if args.proxy_protocol is not None:
        given["proxy_protocol"] = args.proxy_protocol == "on"
    if args.bare_line_endings is not None:
        given["bare_line_endings"] = BareLineEndings(args.bare_line_endings)
    return Config(
        **given,
        log_format=args.log_format or logs.default_format(sys.stdout),
        discard_ehlo_keywords=normalise_keywords(args.discard_ehlo_keyword or ()),
        timeouts=dataclasses.replace(Timeouts(), **dict(args.timeout or ())),
    )


def parse_demo(argv: Sequence[str], environ: dict[str, str]) -> argparse.Namespace:
    parser = _Parser(prog="pipeproxy demo", description=demo.__doc__.splitlines()[0])
    for flag, env, kind, _, extra in OPTIONS:
        if flag in ("--log-format", "--log-level"):
            parser.add_argument(flag, type=kind, **dict(extra, help=f"{extra['help']} [${ENV_PREFIX}{env}]"))
    args = parser.parse_args(argv)
    args.log_format = args.log_format or environ.get(ENV_PREFIX + "LOG_FORMAT") or None
    args.log_level = args.log_level or environ.get(ENV_PREFIX + "LOG_LEVEL", "info").lower()
    if args.log_format not in (None, *logs.FORMATS) or args.log_level not in logs.LEVELS:
        parser.error("PIPEPROXY_LOG_FORMAT or PIPEPROXY_LOG_LEVEL has a value pipeproxy does not know")
    return args


def health_main(argv: Sequence[str], environ: dict[str, str]) -> int:
    parser = _Parser(prog="pipeproxy health", description="Ask a running pipeproxy's health endpoint; exit 0 if healthy.")
    parser.add_argument("--address", type=address, metavar="HOST:PORT",
                        help=f"the endpoint (default: ${ENV_PREFIX}HEALTH_LISTEN)")
    args = parser.parse_args(argv)
    target = args.address
    if target is None:
        try:
            target = address(environ.get(ENV_PREFIX + "HEALTH_LISTEN", ""))
        except argparse.ArgumentTypeError:
            parser.error(f"give --address HOST:PORT or set {ENV_PREFIX}HEALTH_LISTEN")
    if target.host in ("0.0.0.0", "::"):
        target = Address("127.0.0.1" if target.host == "0.0.0.0" else "::1", target.port)
    healthy, said = check(target)
    print(said)
    return 0 if healthy else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    environ = dict(os.environ)
    if argv[:1] == ["health"]:
        return health_main(argv[1:], environ)
    if argv[:1] == ["demo"]:
        args = parse_demo(argv[1:], environ)
        return demo.main(args.log_format, args.log_level)
    return runner.main(parse_config(argv, environ))
