"""docker/kubernetes/: valid against the Kubernetes schemas (kubernetes-validate ships them,
no cluster and no network), and the sidecar's fields fit pipeproxy's own settings."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pipeproxy.cli.main import parse
from pipeproxy.core.config import Address

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "docker" / "kubernetes").glob("*.yaml"))
# the oldest Kubernetes still supported upstream when this was written, and the newest schemas
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
MARGIN = 5  # seconds the grace period keeps beyond preStop and drain, for the exit itself


def documents() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def pod_spec() -> dict[str, Any]:
    [deployment] = [doc for doc in documents() if doc["kind"] == "Deployment"]
    return deployment["spec"]["template"]["spec"]


def container(name: str) -> dict[str, Any]:
    [found] = [c for c in pod_spec()["containers"] if c["name"] == name]
    return found


def environment(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return number


def prestop_seconds(c: dict[str, Any]) -> int:
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return int(command[1])


def test_there_is_an_example():
    assert MANIFESTS, "no manifests in docker/kubernetes/"
    assert {doc["kind"] for doc in documents()} >= {"Deployment", "Service"}


@pytest.mark.parametrize("version", VERSIONS)
def test_the_manifests_are_valid_kubernetes(version):
    for doc in documents():
        # strict: unknown fields (a misspelt key Kubernetes would drop silently) are errors
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validation_catches_a_misspelt_field():
    spec = copy.deepcopy([doc for doc in documents() if doc["kind"] == "Deployment"][0])
    probe = spec["spec"]["template"]["spec"]["containers"][1]["readinessProbe"]
    probe["httpGet"]["paht"] = probe["httpGet"].pop("path")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(spec, VERSIONS[-1], strict=True)


def test_the_settings_are_ones_pipeproxy_accepts():
    command, config = parse(["serve"], environment(container("pipeproxy")))
    assert command == "serve" and config.health_listen is not None


def test_the_probes_ask_the_health_listener():
    sidecar = container("pipeproxy")
    _, config = parse(["serve"], environment(sidecar))
    health = config.health_listen
    assert health is not None
    # The manifest's setting, not a bind of ours: the kubelet probes the pod IP.
    assert health.host in ("0.0.0.0", "::"), "the probes would not reach a loopback-only endpoint"  # not a bind
    for kind, path in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz")]:
        get = sidecar[kind]["httpGet"]
        assert get["path"] == path, kind
        assert port_number(sidecar, get["port"]) == health.port, kind
        assert get.get("scheme", "HTTP") == "HTTP", kind


def test_the_grace_period_covers_the_prestop_and_the_drain():
    sidecar = container("pipeproxy")
    _, config = parse(["serve"], environment(sidecar))
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert grace >= prestop_seconds(sidecar) + config.grace_period + MARGIN


def test_the_mta_outlives_the_drain():
    # its preStop waits for the health port to close, i.e. for pipeproxy to exit
    _, config = parse(["serve"], environment(container("pipeproxy")))
    assert config.health_listen is not None
    wait = " ".join(container("mta")["lifecycle"]["preStop"]["exec"]["command"])
    assert f"/dev/tcp/127.0.0.1/{config.health_listen.port}" in wait


def test_pipeproxy_fronts_the_mta_and_the_service_fronts_pipeproxy():
    sidecar = container("pipeproxy")
    _, config = parse(["serve"], environment(sidecar))
    assert config.upstream == Address("127.0.0.1", 25), "the MTA in the same pod, over loopback"
    assert "loopback-only" in " ".join(container("mta")["command"]), "the MTA is reachable around pipeproxy"
    [service] = [doc for doc in documents() if doc["kind"] == "Service"]
    [smtp] = service["spec"]["ports"]
    assert port_number(sidecar, smtp["targetPort"]) == config.listen.port


def test_pipeproxy_runs_unprivileged():
    context = container("pipeproxy")["securityContext"]
    user = re.search(r"^USER (\d+)$", (ROOT / "docker" / "Dockerfile").read_text(), re.M)
    assert user, "docker/Dockerfile names no numeric USER"
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == int(user[1])
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"] and "add" not in context["capabilities"]
    mounts = {m["mountPath"] for m in container("pipeproxy")["volumeMounts"]}
    assert "/tmp" in mounts, "--workers needs a writable temporary directory"
