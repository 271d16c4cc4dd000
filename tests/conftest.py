"""Shared test set-up: assertion rewriting for the helpers, hypothesis profiles, and
the private Postfix instances (session-wide: starting one takes a few seconds)."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

pytest.register_assert_rewrite("transcript", "peers")

# HYPOTHESIS_PROFILE=long for a deeper search than CI's default 100 examples per test.
settings.register_profile("long", max_examples=20_000, deadline=None)
settings.register_profile("default", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def postfix_esmtp():
    """A private Postfix as a legacy MTA: EHLO without PIPELINING, early input refused."""
    yield from _postfix(helo_only=False)


@pytest.fixture(scope="session")
def postfix_helo_only():
    """The same Postfix with EHLO turned off, so it checks for early input after every command."""
    yield from _postfix(helo_only=True)


def _postfix(helo_only: bool):
    from postfix import PrivatePostfix

    # Not pytest's tmp_path: that is private to root, and Postfix's own users must reach it.
    root = Path(tempfile.mkdtemp(prefix="pipeproxy-postfix-"))
    root.chmod(0o755)
    instance = PrivatePostfix(root, helo_only=helo_only)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(root, ignore_errors=True)
