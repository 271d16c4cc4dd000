"""ruff and mypy over the whole repository, as part of the one test command.

Settings are in pyproject.toml: ruff's rule set, and mypy with the protocol core
(``pipeproxy.core.*``) checked as strictly as ``--strict``. Each tool runs once; its
findings are reported by file.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# ruff: "path:line:col: CODE message"; mypy: "path:line: error: message  [code]".
FINDING = re.compile(r"^(?P<path>[^:\s]+\.py):\d+:")

def run(*command: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    # Both exit 1 for findings; anything else means the tool itself failed.
    assert result.returncode in (0, 1), f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def findings() -> dict[str, list[str]]:
    """Every finding of ruff and mypy, by the file it is in (relative to the repository)."""
    output = run("ruff", "check", "--output-format", "concise", "--no-cache", ".") + run("mypy")
    by_file: dict[str, list[str]] = defaultdict(list)
    for line in output.splitlines():
        if match := FINDING.match(line):
            by_file[match["path"]].append(line)
    return by_file


def test_the_repository_is_lint_and_type_clean(findings):
    """No ruff finding and no mypy error, in any file."""
    assert not findings, "\n".join(line for lines in findings.values() for line in lines)
