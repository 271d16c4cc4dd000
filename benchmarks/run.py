"""pipeproxy's benchmarks, side by side, every ratio measured in the same run.

    bash .ci/setup && .venv/bin/python benchmarks/run.py [--quick] [--only SECTION ...]

0. floor: 20 persistent sessions on loopback in front of smtp-sink -p, a lock-step client
   (smtp-source -d) and a pipelining one (load.py), through socat, a bare trio byte relay
   (trio_relay.py: the floor for anything on trio), pipeproxy (also --xclient off,
   --workers 2, and as pure Python); messages a second, each relay's CPU, and pipeproxy
   over the trio relay.
1. latency: a client 100 ms round trip away (delay_relay.py), messages to 1, 10 and 50
   recipients: (a) straight at a legacy MTA (smtp-sink -p: no PIPELINING), (b) through
   pipeproxy in front of it, (c) straight at an MTA that pipelines (smtp-sink). Clients:
   swaks --pipeline (one message a run) and a trio client sending 5 messages a session.
2. throughput: many sessions on loopback, 5 recipients a message, persistent sessions and
   a connection a message: straight to smtp-sink, through pipeproxy, through socat.
3. memory: resident memory per idle session at 1,000 and 10,000 sessions, and growth
   while one 50 MB message streams through.

pipeproxy is measured as users install it: the run first builds it as ``pip install .``
does, its core compiled by mypyc (setup.py), into a temporary folder. Everything listens
on 127.0.0.1 and stops when the run ends. Medians of repeated runs; the machine is
shared, so read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from pipeproxy.demo.client import SMTPClient, envelope_lines

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parent
ONE_WAY_DELAY = 0.05
CONTENT = b"From: bench@client.test\r\nSubject: bench\r\n\r\n" + b"A line of a benchmark message body.\r\n" * 50


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.05)


def install_compiled(directory: Path) -> Path:
    """pipeproxy built as ``pip install .`` builds it (its core compiled), installed into
    ``directory``; the folder to run it from."""
    source, site = directory / "source", directory / "site"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPOSITORY / name, source)
    shutil.copytree(REPOSITORY / "pipeproxy", source / "pipeproxy", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, source], check=True)
    if not list((site / "pipeproxy" / "core").glob("session*.so")):
        sys.exit("the core was not compiled (is a C compiler installed? .ci/setup installs gcc)")
    return site


class Services(contextlib.ExitStack):
    """Background processes, each stopped when the benchmark leaves the block."""

    # Where ``pipeproxy`` runs from unless a call says otherwise: the compiled build.
    pipeproxy_source: Path | None = None

    def start(self, command: list[str], source: Path | None = None) -> subprocess.Popen:
        env = None if source is None else {**os.environ, "PYTHONPATH": str(source)}
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=source
        )

        def stop() -> None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()

        self.callback(stop)
        return process

    def smtp_sink(self, pipelining: bool) -> int:
        port = free_port()
        # -u: smtp-sink will not run as root; 1024: its listen backlog. -C -F: offer
        # neither XCLIENT nor XFORWARD, as an MTA that does not trust pipeproxy: smtp-sink
        # answers XCLIENT with 250 where Postfix's smtpd restarts the session with 220,
        # so pipeproxy (--xclient auto) would fail closed, and XFORWARD would cost a
        # round trip a message that a real deployment chooses to pay.
        self.start([
            "smtp-sink", "-u", "nobody", "-C", "-F", *([] if pipelining else ["-p"]), f"127.0.0.1:{port}", "1024",
        ])
        wait_listening(port)
        return port

    def pipeproxy(
        self, upstream: int, workers: int = 1, *options: str, source: Path | None = None
    ) -> tuple[int, subprocess.Popen]:
        """pipeproxy as deployed: default (info) logging, as JSON, to a discarded stdout;
        ``source``: a directory holding another version's ``pipeproxy`` package."""
        source = source or self.pipeproxy_source
        port = free_port()
        process = self.start([
            sys.executable, "-m", "pipeproxy", "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{upstream}",
            "--max-sessions", "20000", "--workers", str(workers), *options,
        ], source)
        wait_listening(port)
        return port, process

    def legacy_mta(self) -> int:
        """pipeproxy's bundled strict legacy MTA: on trio, it holds 10,000 connections."""
        port = free_port()
        code = (
            "import sys, trio; from pipeproxy.demo.legacy_mta import LegacyMTA; "
            "trio.run(LegacyMTA().serve, '127.0.0.1', int(sys.argv[1]))"
        )
        self.start([sys.executable, "-c", code, str(port)])
        wait_listening(port)
        return port

    def socat(self, target: int) -> int:
        port = free_port()
        self.start(["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=256", f"TCP:127.0.0.1:{target}"])
        wait_listening(port)
        return port

    def trio_relay(self, target: int) -> tuple[int, subprocess.Popen]:
        """The floor for anything on trio: a bare byte relay, two tasks a connection."""
        port = free_port()
        process = self.start([
            sys.executable, str(HERE / "trio_relay.py"), "--listen", f"127.0.0.1:{port}",
            "--target", f"127.0.0.1:{target}",
        ])
        wait_listening(port)
        return port, process

    def slow_link(self, target: int) -> int:
        port = free_port()
        self.start([
            sys.executable, str(HERE / "delay_relay.py"), "--listen", f"127.0.0.1:{port}",
            "--target", f"127.0.0.1:{target}", "--delay", str(ONE_WAY_DELAY),
        ])
        wait_listening(port)
        return port


# -- 1. latency over a slow link ---------------------------------------------------


async def _noop_rtt(port: int, count: int = 15) -> float:
    client = await SMTPClient.connect("127.0.0.1", port)
    await client.read_reply()
    await client.exchange(b"EHLO bench.test\r\n")
    times = []
    for _ in range(count):
        started = time.perf_counter()
        await client.exchange(b"NOOP\r\n")
        times.append(time.perf_counter() - started)
    await client.exchange(b"QUIT\r\n")
    await client.aclose()
    return statistics.median(times)


async def _trio_session(port: int, recipients: list[str], messages: int) -> tuple[float, int]:
    """Seconds per message, and round trips per message, for one session."""
    started = time.perf_counter()
    client = await SMTPClient.connect("127.0.0.1", port)
    await client.read_reply()
    [ehlo] = await client.exchange(b"EHLO bench.test\r\n")
    pipelining = "PIPELINING" in ehlo.lines[1:]
    for _ in range(messages):
        replies = await client.send_mail("bench@client.test", recipients, CONTENT, pipelining=pipelining)
        assert replies[-1].code == 250, replies[-1]
    await client.exchange(b"QUIT\r\n")
    await client.aclose()
    return (time.perf_counter() - started) / messages, client.round_trips


def _swaks(port: int, recipients: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(port), "--pipeline", "--hide-all", "--helo", "bench.test",
         "--from", "bench@client.test", "--to", ",".join(recipients)],
        stdin=subprocess.DEVNULL, check=True,
    )
    return time.perf_counter() - started


def latency(runs: int) -> None:
    with Services() as services:
        legacy, native = services.smtp_sink(pipelining=False), services.smtp_sink(pipelining=True)
        proxy, _ = services.pipeproxy(legacy)
        links = {"a": services.slow_link(legacy), "b": services.slow_link(proxy), "c": services.slow_link(native)}
        rtt = statistics.median(trio.run(_noop_rtt, links["c"]) for _ in range(3))
        print(f"\n## 1. Latency over a slow link: one-way delay {ONE_WAY_DELAY * 1000:.0f} ms, "
              f"measured SMTP round trip {rtt * 1000:.1f} ms (NOOP ping-pong, median)")
        print("(a) straight at smtp-sink -p (legacy, no PIPELINING)  (b) through pipeproxy in front of it  "
              "(c) straight at smtp-sink (pipelines natively)")
        print(f"{'client':<22}{'rcpts':>6}{'(a) ms':>10}{'RT':>6}{'(b) ms':>10}{'RT':>6}{'(c) ms':>10}{'RT':>6}"
              f"{'a/b':>7}{'b/c':>7}")
        for client in ("trio, 5 msgs/session", "swaks --pipeline"):
            for count in (1, 10, 50):
                recipients = [f"r{i}@legacy.test" for i in range(count)]
                samples: dict[str, list[float]] = {case: [] for case in links}
                for _ in range(runs):
                    for case, port in links.items():
                        if client.startswith("trio"):
                            samples[case].append(trio.run(_trio_session, port, recipients, 5)[0])
                        else:
                            samples[case].append(_swaks(port, recipients))
                t = {case: statistics.median(values) for case, values in samples.items()}
                row = "".join(f"{t[case] * 1000:>10.0f}{t[case] / rtt:>6.1f}" for case in "abc")
                print(f"{client:<22}{count:>6}{row}{t['a'] / t['b']:>7.2f}{t['b'] / t['c']:>7.3f}")


# -- 2. throughput on loopback -----------------------------------------------------


def _load(port: int, concurrency: int, messages: int, persistent: bool) -> dict:
    command = [sys.executable, str(HERE / "load.py"), "--server", f"127.0.0.1:{port}",
               "--concurrency", str(concurrency), "--messages", str(messages), "--recipients", "5"]
    if not persistent:
        command.append("--per-message-connections")
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def throughput(runs: int, scale: float) -> None:
    with Services() as services:
        # The legacy MTA pipeproxy is for: straight or through socat the client goes
        # lock-step; through pipeproxy it pipelines and pipeproxy goes lock-step.
        sink = services.smtp_sink(pipelining=False)
        targets = {
            "direct": sink,
            "pipeproxy": services.pipeproxy(sink)[0],
            "pipeproxy×2": services.pipeproxy(sink, workers=2)[0],
            "socat": services.socat(sink),
        }
        print("\n## 2. Throughput on loopback: 5 recipients a message, upstream smtp-sink -p (no PIPELINING), "
              f"medians of {runs} runs; pipeproxy×2 is --workers 2")
        print(f"{'sessions':>8}  {'mode':<14}{'target':<13}{'msg/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'vs socat':>10}")
        for concurrency in (20, 200):
            for persistent in (True, False):
                messages = int((4000 if persistent else 1500) * scale)
                results: dict[str, list[dict]] = {name: [] for name in targets}
                for _ in range(runs):
                    for name, port in targets.items():
                        results[name].append(_load(port, concurrency, messages, persistent))
                medians = {
                    name: sorted(rs, key=lambda r: r["per_second"])[len(rs) // 2] for name, rs in results.items()
                }
                for name, result in medians.items():
                    ratio = result["per_second"] / medians["socat"]["per_second"]
                    mode = "persistent" if persistent else "conn/message"
                    print(f"{concurrency:>8}  {mode:<14}{name:<13}{result['per_second']:>8.0f}"
                          f"{result['p50_ms']:>9.1f}{result['p99_ms']:>9.1f}{ratio:>10.2f}")


# -- 0. the floor: pipeproxy against a bare trio relay -----------------------------

SINK_PAYLOAD = 1850  # octets of message body smtp-source sends: about load.py's CONTENT


def _smtp_source(port: int, sessions: int, messages: int) -> dict:
    """A lock-step client (smtp-source has no PIPELINING), persistent sessions (-d)."""
    command = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-r", "5", "-d", "-l", str(SINK_PAYLOAD),
               "-M", "client.test", "-f", "bench@client.test", "-t", "r@legacy.test", f"127.0.0.1:{port}"]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return {"per_second": messages / (time.perf_counter() - started)}


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (pipeproxy's workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(current := todo.pop())
        todo.extend(children.get(current, []))
    return found


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


# Identical processes of the trio relay, of pipeproxy (one worker and two) and of the
# baseline, measured each in turn: on this shared machine one process of the same code
# can run 10 to 20 % slower than another for its whole life (measured: 413 to 493 µs a
# lock-step message among four in one run), so the ratios compare medians of several.
INSTANCES = 3


def floor(runs: int, scale: float, sessions: int = 20, baseline: Path | None = None) -> None:
    """messages a second through each relay, for a lock-step and a pipelining client;
    ``baseline``: also another version of pipeproxy (a directory holding its package)."""
    with Services() as services:
        sink = services.smtp_sink(pipelining=False)
        targets: dict[str, list[tuple[int, subprocess.Popen | None]]] = {
            "direct": [(sink, None)],
            "socat": [(services.socat(sink), None)],
            "trio relay": [services.trio_relay(sink) for _ in range(INSTANCES)],
            "pipeproxy": [services.pipeproxy(sink) for _ in range(INSTANCES)],
            "pp xclient off": [services.pipeproxy(sink, 1, "--xclient", "off")],
            "pipeproxy×2": [services.pipeproxy(sink, 2) for _ in range(INSTANCES)],
            "pure Python": [services.pipeproxy(sink, source=REPOSITORY)],
        }
        if baseline is not None:
            targets["baseline"] = [services.pipeproxy(sink, source=baseline) for _ in range(INSTANCES)]
        time.sleep(1.0)  # the workers of pipeproxy×2 start after its port answers
        trees = {
            name: [_tree(process.pid) if process else [] for _, process in instances]
            for name, instances in targets.items()
        }
        clients = {
            "lock-step (smtp-source -d)": lambda port, n: _smtp_source(port, sessions, n),
            "pipelining (load.py)": lambda port, n: _load(port, sessions, n, persistent=True),
        }
        messages = int(4000 * scale)
        print(f"\n## 0. The floor: {sessions} persistent sessions, {messages} messages of 5 recipients a run, "
              f"upstream smtp-sink -p; medians of {runs} runs, interleaved; cpu: the relay's, % of one core; "
              f"ratios: medians of each run's; the trio relay, pipeproxy, ×2 and the baseline: {INSTANCES} "
              "processes each, a run's figures the medians of theirs")
        # (messages a second, share of a core, CPU seconds a message) a run
        results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        by_instance: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
        for _ in range(runs):
            for client, send in clients.items():
                for name, instances in targets.items():
                    for index, (port, _) in enumerate(instances):
                        before = _cpu_seconds(trees[name][index])
                        started = time.perf_counter()
                        rate = send(port, messages)["per_second"]
                        cpu = (_cpu_seconds(trees[name][index]) - before) / (time.perf_counter() - started)
                        by_instance.setdefault((client, name, index), []).append((rate, cpu))
                    measured = [by_instance[client, name, index][-1] for index in range(len(instances))]
                    results.setdefault((client, name), []).append((
                        statistics.median(r for r, _ in measured),
                        statistics.median(c for _, c in measured),
                        statistics.median(c / r for r, c in measured),  # each process's own
                    ))
        # Ratios: the median of each round's ratio, the two measured minutes apart at most,
        # so a shared machine's load swings (other work) cancel out of them.
        print(f"{'client':<28}" + "".join(f"{name:>16}" for name in targets) + f"{'pp/relay':>10}{'×2/×1':>8}")
        for client in clients:
            medians = {name: statistics.median(r for r, _, _ in results[client, name]) for name in targets}
            cpus = {name: statistics.median(c for _, c, _ in results[client, name]) for name in targets}
            cells = "".join(
                f"{f'{medians[name]:.0f}/s' + (f' {cpus[name] * 100:.0f}%' if trees[name][0] else ''):>16}"
                for name in targets
            )

            def ratio(a: str, b: str, client: str = client) -> float:
                pairs = zip(results[client, a], results[client, b], strict=True)
                return statistics.median(x[0] / y[0] for x, y in pairs)

            relay, workers = ratio("pipeproxy", "trio relay"), ratio("pipeproxy×2", "pipeproxy")
            print(f"{client:<28}{cells}{relay:>10.2f}{workers:>8.2f}"
                  + (f"  baseline/relay {ratio('baseline', 'trio relay'):.2f}" if baseline else ""))
            print(f"{'':<28}  each run: " + "; ".join(
                f"{name} " + "/".join(f"{r:.0f}" for r, _, _ in results[client, name]) for name in targets))
            # CPU a message (user + system) is steadier than messages a second when other
            # work shares the machine: a relay that uses a core fully is limited by it.
            print(f"{'':<28}  CPU a message: " + "; ".join(
                f"{name} {statistics.median(m for _, _, m in results[client, name]) * 1e6:.0f} µs"
                for name in targets if trees[name][0]))
            print(f"{'':<28}  each process, CPU a message: " + "; ".join(
                f"{name} " + "/".join(
                    f"{statistics.median(c / r for r, c in by_instance[client, name, index]) * 1e6:.0f}"
                    for index in range(len(targets[name]))
                ) + " µs"
                for name in targets if len(targets[name]) > 1))


# -- 3. memory and scale -----------------------------------------------------------


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


async def _hold_sessions(port: int, count: int, pid: int) -> float:
    baseline = _status_kb(pid, "VmRSS")
    clients: list[SMTPClient] = []
    limit = trio.CapacityLimiter(200)

    async def open_one() -> None:
        async with limit:
            client = await SMTPClient.connect("127.0.0.1", port)
            await client.read_reply()
            await client.exchange(b"EHLO bench.test\r\n")
            clients.append(client)

    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(open_one)
    await trio.sleep(0.5)
    per_session = (_status_kb(pid, "VmRSS") - baseline) / count
    for client in clients:
        await client.aclose()
    return per_session


async def _big_message(port: int, pid: int, megabytes: int) -> int:
    """How much the peak resident memory grew while the message streamed through."""
    client = await SMTPClient.connect("127.0.0.1", port)
    await client.read_reply()
    await client.exchange(b"EHLO bench.test\r\n")
    replies = await client.exchange(*envelope_lines("bench@client.test", ["big@legacy.test"]))
    assert replies[-1].code == 354
    before = _status_kb(pid, "VmHWM")
    block = (b"x" * 998 + b"\r\n") * 1000
    for _ in range(megabytes):
        await client.stream.send_all(block)
    [end] = await client.exchange(b".\r\n")
    assert end.code == 250, end
    await client.aclose()
    return _status_kb(pid, "VmHWM") - before


def memory(scale: float) -> None:
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))  # where root may raise it
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    # smtp-sink stops greeting at a few hundred connections; the bundled MTA does not.
    print("\n## 3. Memory: pipeproxy's resident memory, upstream: pipeproxy's bundled legacy MTA")
    with Services() as services:
        upstream = services.legacy_mta()
        for wanted in (1000, 10000):
            # pipeproxy needs two descriptors a session, under the limit it inherits.
            count = min(int(wanted * scale), (soft - 200) // 2)
            proxy, process = services.pipeproxy(upstream)
            per_session = trio.run(_hold_sessions, proxy, count, process.pid)
            limited = ""
            if count < wanted * scale:
                limited = f" (wanted {int(wanted * scale)}: the file descriptor limit here is {soft})"
            print(f"   {count:>6} idle sessions: {per_session:.1f} kB per session{limited}")
        proxy, process = services.pipeproxy(upstream)
        before = _status_kb(process.pid, "VmHWM")
        growth = trio.run(_big_message, proxy, process.pid, 50)
        print(f"   one 50 MB message: peak resident memory {before} kB before, grew by {growth} kB")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=["floor", "latency", "throughput", "memory"])
    parser.add_argument("--quick", action="store_true", help="fewer runs and smaller loads, for a first look")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="floor: also pipeproxy from DIR, its sources (git worktree add /tmp/before COMMIT) or "
                        "an install of them (pip install --no-deps --target DIR /tmp/before)")
    args = parser.parse_args()
    sections = args.only or ["floor", "latency", "throughput", "memory"]
    runs = 3 if args.quick else 5
    print(f"# pipeproxy benchmarks, {time.strftime('%Y-%m-%d')}, on {machine()}")
    build = tempfile.TemporaryDirectory(prefix="pipeproxy-build-")
    Services.pipeproxy_source = install_compiled(Path(build.name))
    if "floor" in sections:
        floor(runs=3 if args.quick else 5, scale=0.5 if args.quick else 1.0, baseline=args.baseline)
    if "latency" in sections:
        latency(runs)
    if "throughput" in sections:
        throughput(runs=3, scale=0.25 if args.quick else 1.0)
    if "memory" in sections:
        memory(scale=0.1 if args.quick else 1.0)


if __name__ == "__main__":
    main()
