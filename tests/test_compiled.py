"""The core as users install it: compiled by mypyc (setup.py), run through the core's tests.

The rest of the suite runs the sources, which an editable install leaves as they are.
``pip install .`` compiles ``pipeproxy/core``; compiled code can differ (a variable keeps
one type, a class cannot be subclassed from interpreted code), so this builds the package
as that does, from a copy of the sources, and runs the tests that drive the Session, the
wire, the shell around them and the worker processes against the compiled modules, in a
process of their own.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
CORE_TESTS = [
    "test_session.py",
    "test_session_events.py",
    "test_fuzz.py",
    "test_wire.py",
    "test_smuggling.py",
    "test_limits.py",
    "test_identity.py",
    "test_proxy_protocol.py",
    "test_tls_session.py",
    "test_upstream_tls_session.py",
    "test_connection.py",
    "test_proxy.py",
    "test_faults.py",
    "test_tls.py",
    "test_process.py",  # workers get the Config pickled: compiled classes must survive that
]
# This injects a bug by subclassing Session, which a compiled class does not allow; the
# code it checks, the same in both, is checked by the main run.
SUBCLASS_SESSION = ["test_a_bug_never_lets_queued_upstream_io_happen"]


def test_the_compiled_core_passes_the_core_tests(tmp_path: Path, clean_env: dict[str, str]) -> None:
    source, site = tmp_path / "source", tmp_path / "site"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(ROOT / "pipeproxy", source / "pipeproxy", ignore=shutil.ignore_patterns("__pycache__"))
    # As `pip install .` builds it: in an isolated environment, with the mypy pyproject.toml pins.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, source],
        check=True, timeout=600,
    )
    compiled = sorted(path.name.split(".")[0] for path in (site / "pipeproxy" / "core").glob("*.so"))
    expected = sorted(
        path.stem
        for path in (ROOT / "pipeproxy" / "core").glob("*.py")
        if path.stem not in ("__init__", "config", "values")  # as setup.py says
    )
    assert compiled == expected, "setup.py fell back to pure Python: is a C compiler installed (.ci/setup)?"

    environment = {**clean_env, "PYTHONPATH": str(site)}
    check = "import pipeproxy.core.session as s, sys; sys.exit(not s.__file__.endswith('.so'))"
    subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=environment, check=True)
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={ROOT}",
            *(str(TESTS / name) for name in CORE_TESTS),
            "-k", " and ".join(f"not {name}" for name in SUBCLASS_SESSION),
        ],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=1200, check=False,
    )
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
