"""The command line as an operator meets it: flags, variables, errors, logs, the demo."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys

import pytest
import trio

from pipeproxy.cli import options
from pipeproxy.cli.main import parse
from pipeproxy.core.config import Address, BareLineEndings, settings
from pipeproxy.core.wire import DEFAULT_MAX_COMMAND_LINE
from pipeproxy.demo.legacy_mta import LegacyMTA

from peers import JsonLog, start_legacy

PIPEPROXY = [sys.executable, "-m", "pipeproxy"]


UPSTREAM = {"PIPEPROXY_UPSTREAM": "127.0.0.1:25"}
WITH_UPSTREAM = ["--upstream", "127.0.0.1:25"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PIPEPROXY_")}
    environ.update(env or {})
    return subprocess.run([*PIPEPROXY, *args], capture_output=True, text=True, timeout=60, env=environ)


def test_help_explains_every_flag_and_its_variable():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag, variable in [
        ("--listen", "PIPEPROXY_LISTEN"),
        ("--upstream", "PIPEPROXY_UPSTREAM"),
        ("--log-format", "PIPEPROXY_LOG_FORMAT"),
        ("--log-level", "PIPEPROXY_LOG_LEVEL"),
        ("--discard-ehlo-keyword", "PIPEPROXY_DISCARD_EHLO_KEYWORDS"),
        ("--max-line-length", "PIPEPROXY_MAX_LINE_LENGTH"),
        ("--bare-line-endings", "PIPEPROXY_BARE_LINE_ENDINGS"),
        ("--timeout", "PIPEPROXY_TIMEOUTS"),
    ]:
        assert flag in result.stdout and variable in result.stdout


def test_help_shows_every_setting_with_its_variable_and_the_configs_own_default():
    """Defaults in the help come from Config, so they cannot go stale (512 once did)."""
    result = run_cli("--help")
    text = " ".join(result.stdout.split())  # argparse wraps lines anywhere
    for setting, default in settings().values():
        shown = "(required)" if setting.required else f"(default: {options.default_text(setting, default)})"
        assert f"{setting.flag} " in text and f"[${options.variable(setting)}]" in text and shown in text
    assert "(default: 2048)" in text and "--hold-time SECONDS" in text


def test_help_lists_the_subcommands_and_version_comes_from_the_package():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("serve", "demo", "health", "inspect"):
        assert f"\n    {command} " in result.stdout
    version = run_cli("--version")
    assert (version.returncode, version.stdout) == (0, f"pipeproxy {importlib.metadata.version('pipeproxy')}\n")


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--bogus"], {}, "unrecognized arguments: --bogus"),
        (["--upstream", "mx.example"], {}, "is not HOST:PORT"),
        (["--upstream", "127.0.0.1:99999"], {}, "port must be a number"),
        (["--upstream", "999.1.1.1:25"], {}, "is not an IP address"),
        (["--upstream", "::1:25"], {}, "write an IPv6 address in brackets"),
        ([], {}, "--upstream HOST:PORT (or PIPEPROXY_UPSTREAM) is required"),
        ([*WITH_UPSTREAM, "--log-level", "loud"], {}, "invalid choice: 'loud'"),
        ([*WITH_UPSTREAM, "--timeout", "forever=1"], {}, "timeout name must be one of"),
        ([*WITH_UPSTREAM, "--timeout", "rcpt=soon"], {}, "positive number of seconds"),
        ([], {**UPSTREAM, "PIPEPROXY_MAX_LINE_LENGTH": "big"}, "PIPEPROXY_MAX_LINE_LENGTH:"),
        ([], {**UPSTREAM, "PIPEPROXY_LOG_FORMAT": "xml"}, "PIPEPROXY_LOG_FORMAT:"),
        # '²'.isdigit() is True but int('²') fails: a traceback, once, from the variables.
        ([], {**UPSTREAM, "PIPEPROXY_MAX_SESSIONS": "²"},
         "PIPEPROXY_MAX_SESSIONS: '²' is not a positive whole number"),
        ([*WITH_UPSTREAM, "--max-sessions", "²"], {}, "argument --max-sessions: '²' is not a positive whole number"),
        (["--upstream", "127.0.0.1:²"], {}, "port must be a number"),
        ([], {**UPSTREAM, "PIPEPROXY_GRACE_PERIOD": "nan"}, "PIPEPROXY_GRACE_PERIOD: 'nan' is not a number of seconds"),
        ([*WITH_UPSTREAM, "--grace-period", "-1"], {}, "argument --grace-period: '-1' is not a number of seconds"),
        ([], {**UPSTREAM, "PIPEPROXY_HOLD_TIME": "soon"}, "PIPEPROXY_HOLD_TIME: 'soon' is not a number of seconds"),
        ([], {**UPSTREAM, "PIPEPROXY_PROXY_PROTOCOL": "maybe"}, "PIPEPROXY_PROXY_PROTOCOL: invalid choice: 'maybe'"),
        ([*WITH_UPSTREAM, "--proxy-protocol", "maybe"], {}, "argument --proxy-protocol: invalid choice: 'maybe'"),
        ([], {**UPSTREAM, "PIPEPROXY_TIMEOUTS": "rcpt=60,mail=soon"}, "PIPEPROXY_TIMEOUTS: 'mail=soon'"),
        (["demo"], {"PIPEPROXY_LOG_LEVEL": "loud"}, "PIPEPROXY_LOG_LEVEL: invalid choice: 'loud'"),
        (["health"], {}, "give --address HOST:PORT or set PIPEPROXY_HEALTH_LISTEN"),
        (["bogus"], {}, "invalid choice: 'bogus'"),
    ],
)
def test_bad_flags_and_variables_give_one_line_and_status_2(args, env, says):
    """A variable is checked exactly as its flag is: one line on stderr, status 2, no traceback."""
    result = run_cli(*args, env=env)
    assert "Traceback" not in result.stderr
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("pipeproxy: error: ")
    assert says in result.stderr


def test_an_address_already_in_use_gives_one_line_and_status_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("--listen", f"127.0.0.1:{port}", "--upstream", "127.0.0.1:25")
    assert result.returncode == 2
    assert result.stderr.startswith(f"pipeproxy: error: cannot listen on 127.0.0.1:{port}: ")
    assert "Traceback" not in result.stderr


def parse_config(argv: list[str], environ: dict[str, str]):
    command, config = parse(argv, environ)
    assert command == "serve"
    return config


def test_variables_configure_everything_and_flags_win():
    env = {
        "PIPEPROXY_LISTEN": "[::1]:2600",
        "PIPEPROXY_UPSTREAM": "mta.internal:2525",
        "PIPEPROXY_LOG_LEVEL": "DEBUG",
        "PIPEPROXY_DISCARD_EHLO_KEYWORDS": "dsn, etrn vrfy",
        "PIPEPROXY_BARE_LINE_ENDINGS": "reject",
        "PIPEPROXY_TIMEOUTS": "data_end=900,rcpt=60",
    }
    config = parse_config([], env)
    assert config.listen == Address("::1", 2600)
    assert config.upstream == Address("mta.internal", 2525)
    assert config.log_level == "debug"
    assert config.discard_ehlo_keywords == {"DSN", "ETRN", "VRFY"}
    assert config.bare_line_endings is BareLineEndings.REJECT
    assert (config.timeouts.data_end, config.timeouts.rcpt, config.timeouts.mail) == (900, 60, 300)
    flagged = parse_config(["--listen", "127.0.0.1:2601", "--discard-ehlo-keyword", "size"], env)
    assert flagged.listen == Address("127.0.0.1", 2601)
    assert flagged.discard_ehlo_keywords == {"SIZE"}


def test_hold_time_and_line_length_reach_the_config():
    config = parse_config(["--upstream", "127.0.0.1:25"], {})
    assert (config.max_line_length, config.hold_time) == (DEFAULT_MAX_COMMAND_LINE, 1.0)
    flagged = parse_config([*WITH_UPSTREAM, "--hold-time", "0.25", "--max-line-length", "512"], {})
    assert (flagged.max_line_length, flagged.hold_time) == (512, 0.25)
    from_env = parse_config([], {**UPSTREAM, "PIPEPROXY_HOLD_TIME": "2"})
    assert from_env.hold_time == 2.0


def test_serve_is_the_default_command_and_options_may_come_before_it():
    env = {"PIPEPROXY_UPSTREAM": "127.0.0.1:25"}
    assert parse(["--listen", "127.0.0.1:2601"], env) == parse(["serve", "--listen", "127.0.0.1:2601"], env)
    command, config = parse(["--listen", "127.0.0.1:2601", "serve", "--workers", "2"], env)
    assert (command, config.listen, config.workers) == ("serve", Address("127.0.0.1", 2601), 2)


def send_over_ipv6(port: int) -> dict:
    with smtplib.SMTP("::1", port, local_hostname="client.test") as smtp:
        return smtp.sendmail("s@client.test", ["a@legacy.test", "reject@legacy.test"], b"Subject: v6\r\n\r\nhi\r\n")


async def test_the_proxy_process_serves_ipv6_logs_json_and_stops_on_sigterm(nursery):
    """A real `python -m pipeproxy` on [::1]: mail flows, every log line is JSON, SIGTERM ends it."""
    mta = LegacyMTA(reply_delay=0.002)
    upstream = await start_legacy(nursery, mta)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PIPEPROXY_")}
    environ.update(PIPEPROXY_LISTEN="[::1]:0", PIPEPROXY_UPSTREAM=str(upstream))
    process = await trio.lowlevel.open_process(PIPEPROXY, stdout=subprocess.PIPE, env=environ)
    log = JsonLog(process.stdout)
    try:
        listening = await log.until("listening")
        [address] = listening["addresses"]
        port = Address.parse(address).port
        refused = await trio.to_thread.run_sync(send_over_ipv6, port)
        assert list(refused) == ["reject@legacy.test"]
        session_closed = await log.until("session closed")
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            status = await process.wait()
    assert status == 0
    assert mta.messages[0].recipients == ["a@legacy.test"] and mta.violations == []
    [transaction] = log.events("transaction")
    assert transaction["sender"] == "s@client.test"
    assert (transaction["recipients_accepted"], transaction["recipients_rejected"]) == (1, 1)
    assert transaction["reply_code"] == 250 and transaction["size"] == len(b"Subject: v6\r\n\r\nhi\r\n")
    assert session_closed["client"].startswith("[::1]:") and session_closed["messages"] == 1
    assert {"session", "duration", "commands", "timestamp", "level"} <= set(session_closed)


def logged(code: str) -> list[dict]:
    """The JSON lines a fresh process writes running ``code`` (``logging_setup`` imported;
    a process of its own, since structlog's configuration is process-wide)."""
    result = subprocess.run(
        [sys.executable, "-c", f"import logging, structlog; from pipeproxy.shell import logging_setup; {code}"],
        capture_output=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_stdlib_log_records_come_out_as_json():
    """trio's and other libraries' logging records share the JSON format."""
    [line] = logged("logging_setup.configure('json', 'info'); logging.getLogger('trio').warning('from stdlib')")
    assert (line["event"], line["level"]) == ("from stdlib", "warning")


def test_json_lines_carry_what_orjson_refuses():
    """A client's bytes that are not UTF-8 (lone surrogates once decoded), a key that is
    not a str, an int beyond 64 bits: orjson refuses them, and the line is still written."""
    fields = {"helo": "\udcff\udcfe", "keys": {1: "one"}, "big": 2**70, "sender": "é@x.test", "tls": None}
    refused, written = logged(
        "logging_setup.configure('json', 'info'); "
        f"log = structlog.get_logger('t').bind(session='s'); log.info('refused', **{fields!r}); "
        f"log.info('written', sender={fields['sender']!r}, size=5)"
    )
    assert refused == {"session": "s", **fields, "keys": {"1": "one"}, "event": "refused", "level": "info",
                       "timestamp": refused["timestamp"]}
    assert (written["sender"], written["size"], written["event"]) == ("é@x.test", 5, "written")


@pytest.mark.parametrize(
    ("clock", "expected"),
    [
        # within a second, then across one, a day, backwards, and before 1970
        ([1764410429_500000000, 1764410429_750000999], ["2025-11-29T10:00:29.500000Z", "2025-11-29T10:00:29.750000Z"]),
        ([1764410429_500000000, 1764410430_000001000], ["2025-11-29T10:00:29.500000Z", "2025-11-29T10:00:30.000001Z"]),
        ([1764460799_875000000, 1764460800_000000000], ["2025-11-29T23:59:59.875000Z", "2025-11-30T00:00:00.000000Z"]),
        ([1764410430_250000000, 1764410429_999999999], ["2025-11-29T10:00:30.250000Z", "2025-11-29T10:00:29.999999Z"]),
        ([-250000000, -1_500000000], ["1969-12-31T23:59:59.750000Z", "1969-12-31T23:59:58.500000Z"]),
    ],
)
def test_the_timestamp_is_iso_utc_to_the_microsecond_within_a_second_and_across_one(monkeypatch, clock, expected):
    """The date and time are formatted once a second: the next line in the same second
    reuses them, one in another second (or day) gets its own; the nanoseconds are floored."""
    from pipeproxy.shell import logging_setup

    stamp, times = logging_setup.Timestamp(), iter(clock)
    monkeypatch.setattr(logging_setup.time, "time_ns", lambda: next(times))
    assert [stamp(None, "info", {})["timestamp"] for _ in clock] == expected


def test_a_workers_lines_carry_its_index():
    [line] = logged("logging_setup.configure('json', 'info', worker=3); structlog.get_logger().info('from a worker')")
    assert (line["event"], line["worker"]) == ("from a worker", 3)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line["timestamp"])


def test_demo_shows_the_refusal_the_delivery_and_the_round_trips_saved():
    """`pipeproxy demo` needs no MTA: it runs its own, and says what pipeproxy saved."""
    result = run_cli("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "554 5.5.0 SMTP synchronization error" in out
    assert "10 of 10 recipients accepted; message: 250" in out
    assert "counted 0 synchronization errors from pipeproxy" in out
    assert "client round trips: 5 through pipeproxy, instead of 16 lock-step" in out
    events = [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]
    assert {"listening", "session open", "transaction", "session closed"} <= set(events)


@pytest.mark.parametrize(("args", "env"), [(["--log-level", "debug"], {}), ([], {"PIPEPROXY_LOG_LEVEL": "debug"})])
def test_demo_at_debug_shows_a_line_per_command(args, env):
    """The demo's proxy once ran with a fresh Config at info, whatever level was asked for."""
    result = run_cli("demo", "--log-format", "json", *args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    commands = [line for line in lines if (line["level"], line["event"]) == ("debug", "command")]
    assert [line["verb"] for line in commands][:3] == ["EHLO", "MAIL", "RCPT"]


def readme_options() -> dict[str, list[str]]:
    """README's options table: each row's cells, by the flag the row starts with."""
    with open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md"), encoding="utf-8") as readme:
        section = readme.read().split("## Options\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `--"):
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[cells[0].strip("`").split(" ")[0]] = cells
    return rows


def test_readme_options_table_matches_the_settings():
    """Every setting has a row with its flag, its variable and Config's default, and no row is stale."""
    rows = readme_options()
    table = settings().values()
    assert sorted(rows) == sorted(setting.flag for setting, _ in table)
    for setting, default in table:
        flag, env, shown, _ = rows[setting.flag]
        value = setting.metavar or "\\|".join(setting.choices)
        assert flag == f"`{setting.flag} {value}`" + (" (repeatable)" if setting.gather else "")
        assert env.startswith(f"`{options.variable(setting)}`")
        text = options.default_text(setting, default)
        assert shown == text if setting.required else shown == ", ".join(f"`{part}`" for part in text.split(", "))


def test_every_subcommand_has_plain_help_and_a_usage_line():
    """Each command in COMMANDS (a new one included) is in the top-level usage and the
    command list, and answers --help with plain text: no colour codes, exit 0."""
    from pipeproxy.cli.main import COMMANDS

    top = run_cli("--help").stdout
    for name in COMMANDS:
        assert f"pipeproxy {'[serve]' if name == 'serve' else name} " in top and f"\n    {name} " in top
        result = run_cli(name, "--help")
        assert result.returncode == 0 and result.stderr == ""
        assert result.stdout.startswith(f"usage: pipeproxy {name} ") and "\x1b" not in result.stdout
