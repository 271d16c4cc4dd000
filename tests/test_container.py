"""The sidecar image, built and run for real with podman (rootful, --network=host).

Skips only where podman cannot run at all (.ci/setup prepares it where the machine
provides a way to). The image is built from docker/Dockerfile, started
in front of the strict legacy MTA on 127.0.0.1, sent a pipelined message by swaks,
health-checked with `podman healthcheck run`, and stopped with `podman stop`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio

from pipeproxy.demo.legacy_mta import LegacyMTA

from peers import LOCALHOST, start_legacy, unused_port

pytestmark = pytest.mark.container
ROOT = Path(__file__).resolve().parent.parent
IMAGE = "localhost/pipeproxy:test"
RECIPIENTS = [f"user{i}@legacy.test" for i in range(1, 11)]


def podman_unavailable() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed (.ci/setup installs it where the machine can run it)"
    info = subprocess.run(["podman", "info"], capture_output=True, text=True, timeout=120)
    if info.returncode != 0:
        return f"podman cannot run here: {info.stderr.strip().splitlines()[-1:]}"
    return None


@pytest.fixture(scope="module")
def image() -> str:
    if reason := podman_unavailable():
        pytest.skip(reason)
    subprocess.run(
        ["podman", "build", "--format", "docker", "-q", "-f", "docker/Dockerfile", "-t", IMAGE, "."],
        cwd=ROOT, check=True, capture_output=True, timeout=900,
    )
    return IMAGE


async def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return await trio.run_process(["podman", *args], capture_stdout=True, capture_stderr=True, check=check)


async def test_the_image_proxies_checks_health_and_drains_on_stop(nursery, image):
    mta = LegacyMTA(reply_delay=0.002)
    upstream = await start_legacy(nursery, mta)
    port, health = unused_port(), unused_port()
    name = f"pipeproxy-test-{uuid.uuid4().hex[:8]}"
    await podman(
        "run", "-d", "--name", name, "--network=host",
        "-e", f"PIPEPROXY_LISTEN={LOCALHOST}:{port}", "-e", f"PIPEPROXY_UPSTREAM={upstream}",
        "-e", f"PIPEPROXY_HEALTH_LISTEN={LOCALHOST}:{health}", "-e", "PIPEPROXY_GRACE_PERIOD=20",
        image,
    )
    try:
        with trio.fail_after(60):  # the container starts, then its health check passes
            while (await podman("healthcheck", "run", name, check=False)).returncode != 0:
                await trio.sleep(0.2)
        assert mta.connections == 0, "health checks opened an upstream session"

        swaks = await trio.run_process(
            ["swaks", "--server", LOCALHOST, "--port", str(port), "--pipeline", "--helo", "client.test",
             "--from", "sender@client.test", "--to", ",".join(RECIPIENTS)],
            stdin=b"", capture_stdout=True, check=False,
        )
        assert swaks.returncode == 0, swaks.stdout.decode()
        assert [m.recipients for m in mta.messages] == [RECIPIENTS] and mta.violations == []

        user = (await podman("exec", name, "id", "-u")).stdout.decode().strip()
        assert user != "0", "pipeproxy runs as root in the image"
        core = await podman("exec", name, "python", "-c", "import pipeproxy.core.session as s; print(s.__file__)")
        assert core.stdout.decode().strip().endswith(".so"), "the image runs the core as pure Python (setup.py)"

        await podman("stop", "-t", "60", name)
        state = json.loads((await podman("inspect", name)).stdout)[0]["State"]
        assert state["ExitCode"] == 0, "not a clean exit: SIGTERM was not handled, or the drain failed"
        logs = (await podman("logs", name)).stdout.decode().splitlines()
        events = [json.loads(line)["event"] for line in logs]
        assert {"listening", "session open", "transaction", "stopping", "draining", "stopped"} <= set(events)
    finally:
        await podman("rm", "-f", "-t", "0", name, check=False)


def test_the_dockerfiles_are_hadolint_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "docker/Dockerfile", "docker/legacy-postfix/Dockerfile"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
