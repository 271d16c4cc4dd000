"""The ``pipeproxy`` command: one parser, four subcommands.

``pipeproxy [serve] [OPTIONS]`` runs the proxy (serve is the default, so ``pipeproxy
--upstream X`` works); ``pipeproxy demo`` shows it working with no MTA; ``pipeproxy
health`` asks a running proxy's health endpoint. Their options come from Config's
settings (options.py), and each is given a Config. ``pipeproxy inspect`` reads logs and
has options of its own (inspect/command.py). This module only parses and dispatches;
the work is in shell/, demo/ and inspect/.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import version
from typing import NamedTuple, NoReturn

from ..core.config import Config, settings
from ..demo import run as demo
from ..inspect import command as inspect
from ..shell import health, runner
from . import options

ENVIRONMENT = "Each option can also be set by the environment variable named beside it; a flag wins."


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line, no usage block and no traceback: operators read logs.
        self.exit(2, f"{self.prog}: error: {message}\n")


class Command(NamedTuple):
    help: str
    description: str
    settings: tuple[str, ...]  # names of the Config fields it takes
    run: Callable[[Config], int]
    usage: str = "[OPTIONS]"  # after "pipeproxy NAME", in the top-level usage


def _health(config: Config) -> int:
    assert config.health_listen is not None, "parse requires it"
    return health.probe(config.health_listen)


COMMANDS = {
    "serve": Command(
        "run the proxy (the default command)",
        "Run the proxy: clients pipeline, the upstream sees one command at a time. SIGTERM or SIGINT "
        "drains it and it exits 0.",
        tuple(settings()),
        runner.main,
    ),
    "demo": Command(
        "show pipeproxy working, with no MTA needed",
        "Start a strict legacy MTA and pipeproxy in front of it, both on 127.0.0.1, send one pipelined "
        "message to ten recipients straight at the MTA and then through pipeproxy, and show what happened.",
        ("log_format", "log_level"),
        demo.main,
    ),
    "health": Command(
        "ask a running pipeproxy's health endpoint",
        "Ask a running pipeproxy's health endpoint (--health-listen); exit 0 if it is healthy, 1 if not.",
        ("health_listen",),
        _health,
        "[--address HOST:PORT]",
    ),
}


def build_parser() -> _Parser:
    # One usage line per command, so a new command shows up here by being in COMMANDS.
    usage = "\n       ".join(
        [f"%(prog)s {'[serve]' if name == 'serve' else name} {command.usage}" for name, command in COMMANDS.items()]
        + [f"%(prog)s inspect {inspect.USAGE}"]
    )
    parser = _Parser(
        prog="pipeproxy",
        usage=usage,
        description="SMTP proxy that gives a legacy MTA PIPELINING: clients pipeline, the upstream sees one "
        "command at a time. Without a command it serves, with the options below.",
        epilog=ENVIRONMENT,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('pipeproxy')}")
    # Serving is the default, so its options are the top level's too.
    options.add_flags(parser, COMMANDS["serve"].settings)
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = commands.add_parser(
            name, prog=f"pipeproxy {name}", help=command.help, description=command.description, epilog=ENVIRONMENT
        )
        if name == "health":
            # The health_listen setting, under the flag name it has always had here.
            endpoint = settings()["health_listen"][0]
            sub.add_argument("--address", dest="health_listen", type=options.flag_type(endpoint),
                             metavar=options.metavar(endpoint), default=argparse.SUPPRESS,
                             help=f"the endpoint to ask (default: ${options.variable(endpoint)})")
        else:
            options.add_flags(sub, command.settings, in_subcommand=True)
    inspecting = commands.add_parser(
        "inspect", prog="pipeproxy inspect", help="show what happened, from pipeproxy's JSON logs",
        description=inspect.DESCRIPTION,
    )
    inspect.add_arguments(inspecting)
    return parser


def parse(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[str, Config]:
    """The command to run and its Config; exits with status 2 and one line if anything is bad."""
    parser = build_parser()
    return _config(parser, parser.parse_args(argv), environ)


def _config(parser: _Parser, args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[str, Config]:
    name = args.command or "serve"
    config = options.to_config(parser, args, environ, COMMANDS[name].settings)
    if name == "health" and config.health_listen is None:
        parser.error(f"give --address HOST:PORT or set {options.ENV_PREFIX}HEALTH_LISTEN")
    return name, config


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "inspect":
        # Its own options, no Config: it reads logs and serves nothing.
        inspect.check(parser, args)
        return inspect.run(args)
    name, config = _config(parser, args, os.environ)
    return COMMANDS[name].run(config)
