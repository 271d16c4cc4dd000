"""docker/compose.yaml, brought up for real with podman-compose (rootful podman, bridge networks).

Skips only where podman cannot run, podman-compose is missing, or no Debian 12 base image
exists for the sample Postfix (.ci/setup prepares podman and a local stand-in where the
machine provides a way to). The project gets a unique name and publishes pipeproxy on a
free port of 127.0.0.1 only; it is always taken down (volumes and images too), even when
the test fails.

A pipelined message from swaks goes through pipeproxy to the legacy Postfix (no PIPELINING,
``smtpd_forbid_unauth_pipelining = yes``) and is read back from its Maildir; Postfix's log
must show the delivery and no pipelining violation. A control session that pipelines
straight at Postfix, from inside the compose network, shows that the log check would catch one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers import LOCALHOST, unused_port
from test_container import podman_unavailable

pytestmark = pytest.mark.container
ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
MAILDIR = "/var/mail/legacy/catchall/new"
# Postfix's words when a client sends before its reply (smtpd_forbid_unauth_pipelining,
# reject_unauth_pipelining): "improper command pipelining after EHLO from ...".
VIOLATION = "improper command pipelining"
RECIPIENTS = [f"user{i}@legacy.test" for i in range(1, 6)]
# Postfix 3.7's own base; where no registry is reachable, prepare-podman's local Debian 12
DEBIAN_BASES = ["docker.io/library/debian:bookworm-slim", "localhost/debian-base:bookworm"]
UP_TIMEOUT = 900  # a cold build installs Postfix and pipeproxy's dependencies
READY_WITHIN = 90  # bounds the wait; nothing is asserted about how long it took


def podman_compose() -> str | None:
    return shutil.which("podman-compose") or next(
        (str(p) for p in [Path(sys.executable).parent / "podman-compose"] if p.exists()), None)


def run(*args: str, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None,
        input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, timeout=timeout, env=env, input=input, cwd=ROOT)
    out = subprocess.CompletedProcess(args, result.returncode, result.stdout.decode(errors="replace"),
                                      result.stderr.decode(errors="replace"))
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


@dataclass
class Project:
    name: str
    port: int
    compose: list[str]
    env: dict[str, str]

    def container(self, service: str) -> str:
        names = run("podman", "ps", "-a", "--format", "{{.Names}}",
                    "--filter", f"label=com.docker.compose.project={self.name}",
                    "--filter", f"label=com.docker.compose.service={service}").stdout.split()
        assert len(names) == 1, f"expected one container for {service}: {names}"
        return names[0]


def logs(container: str) -> str:
    result = run("podman", "logs", container)
    return result.stdout + result.stderr


def debian_base() -> str | None:
    return next((image for image in DEBIAN_BASES
                 if run("podman", "image", "exists", image, check=False).returncode == 0), None)


@pytest.fixture
def project() -> Iterator[Project]:
    if reason := podman_unavailable():
        pytest.skip(reason)
    if (tool := podman_compose()) is None:
        pytest.skip("podman-compose is not installed (pip install -e '.[test]' installs it)")
    if (base := debian_base()) is None:
        pytest.skip(f"no Debian 12 image for the sample Postfix: none of {DEBIAN_BASES} "
                    "(../shared/container/prepare-podman builds the local one)")
    name = f"pptest{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "PIPEPROXY_PUBLISH": f"{LOCALHOST}:{unused_port()}",
        "LEGACY_POSTFIX_BASE": base,
        # podman builds OCI images unless told, and OCI has no HEALTHCHECK
        "BUILDAH_FORMAT": "docker",
    }
    compose = [tool, "-p", name, "-f", str(COMPOSE_FILE)]
    p = Project(name, int(env["PIPEPROXY_PUBLISH"].rsplit(":", 1)[1]), compose, env)
    try:
        started = time.monotonic()
        run(*compose, "up", "-d", "--build", timeout=UP_TIMEOUT, env=env)
        print(f"compose up --build took {time.monotonic() - started:.1f}s")
        yield p
    finally:
        run(*compose, "down", "-v", "-t", "40", timeout=180, env=env, check=False)
        images = run("podman", "images", "-q", "--filter", f"reference=localhost/{name}_*",
                     check=False).stdout.split()
        for image in images:  # a tag on layers the build cache keeps anyway
            run("podman", "rmi", "-f", image, check=False)


READYZ = (
    "import urllib.request, urllib.error, os, sys\n"
    "url = 'http://' + os.environ['PIPEPROXY_HEALTH_LISTEN'] + '/readyz'\n"
    "try:\n"
    "    sys.exit(0 if urllib.request.urlopen(url, timeout=5).status == 200 else 1)\n"
    "except (urllib.error.URLError, OSError):\n"
    "    sys.exit(1)\n"
)

# Pipelines straight at Postfix, as the clients pipeproxy protects it from would.
PIPELINER = (
    "import socket\n"
    "s = socket.create_connection(('mta', 25), timeout=10)\n"
    "f = s.makefile('rb')\n"
    "assert f.readline().startswith(b'220')\n"
    "s.sendall(b'EHLO early.test\\r\\nMAIL FROM:<early@client.test>\\r\\nRCPT TO:<user1@legacy.test>\\r\\n')\n"
    "print(f.read1(4096))\n"
)


def test_compose_delivers_a_pipelined_message_to_the_legacy_postfix(project):
    pipeproxy, mta = project.container("pipeproxy"), project.container("mta")
    deadline = time.monotonic() + READY_WITHIN
    # ready: pipeproxy serves and Postfix greeted it (the MTA's start is not instant)
    while run("podman", "exec", pipeproxy, "python", "-c", READYZ, check=False).returncode != 0:
        assert time.monotonic() < deadline, "pipeproxy's /readyz never said ready: " + logs(pipeproxy)[-2000:]
        time.sleep(0.5)
    assert run("podman", "healthcheck", "run", pipeproxy, check=False).returncode == 0, \
        "the image's HEALTHCHECK did not pass (built without --format docker?)"

    subject = f"compose {uuid.uuid4().hex}"
    swaks = run("swaks", "--server", LOCALHOST, "--port", str(project.port), "--pipeline",
                "--helo", "client.test", "--from", "sender@client.test", "--to", ",".join(RECIPIENTS),
                "--header", f"Subject: {subject}", input=b"", check=False)
    assert swaks.returncode == 0, swaks.stdout + swaks.stderr
    assert "<** " not in swaks.stdout, swaks.stdout  # swaks marks rejections so

    # Postfix's virtual agent writes one file per recipient; read them back
    delivered: list[str] = []
    while len(delivered) < len(RECIPIENTS):
        assert time.monotonic() < deadline, f"{len(delivered)} of {len(RECIPIENTS)} delivered"
        listing = run("podman", "exec", mta, "find", MAILDIR, "-type", "f", check=False).stdout.split()
        delivered = [run("podman", "exec", mta, "cat", path).stdout for path in listing]
        time.sleep(0.2)
    assert len(delivered) == len(RECIPIENTS)
    for message in delivered:
        assert f"Subject: {subject}" in message and "From: sender@client.test" in message

    log = logs(mta)
    assert "discarding EHLO keywords: PIPELINING" in log, "not the legacy Postfix: " + log[-2000:]
    assert log.count("status=sent (delivered to maildir)") == len(RECIPIENTS), log[-3000:]
    assert VIOLATION not in log, log[-3000:]

    transactions = [json.loads(line) for line in run("podman", "logs", pipeproxy).stdout.splitlines()
                    if '"transaction"' in line]
    assert [t["outcome"] for t in transactions] == ["message accepted"]
    assert transactions[0]["recipients_accepted"] == len(RECIPIENTS)

    # the control: the same Postfix, pipelined at directly, does log the violation
    control = run("podman", "exec", pipeproxy, "python", "-c", PIPELINER, check=False)
    assert control.returncode == 0, control.stderr
    while VIOLATION not in (log := logs(mta)):
        assert time.monotonic() < deadline, "Postfix did not log the control session's pipelining: " + log[-2000:]
        time.sleep(0.2)

    # and pipeproxy stops cleanly inside compose's stop_grace_period
    run(*project.compose, "stop", "pipeproxy", timeout=120, env=project.env)
    state = json.loads(run("podman", "inspect", pipeproxy).stdout)[0]["State"]
    assert state["ExitCode"] == 0, state
