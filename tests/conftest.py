"""Shared test set-up: assertion rewriting for the helpers, hypothesis profiles, the
fixtures most socket tests need (a free port, a clean environment, pipeproxy processes),
and the private Postfix instances (session-wide: starting one takes a few seconds)."""

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import settings

# Before the helpers are imported, so that their asserts explain themselves too.
pytest.register_assert_rewrite("transcript", "peers")

from pipeproxy.core.config import Address  # noqa: E402

from peers import ProxyProcess, clean_environ, unused_port  # noqa: E402

# HYPOTHESIS_PROFILE=long for a deeper search than CI's default 100 examples per test.
settings.register_profile("long", max_examples=20_000, deadline=None)
settings.register_profile("default", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening on it."""
    return unused_port()


@pytest.fixture
def clean_env() -> dict[str, str]:
    """os.environ without PIPEPROXY_* variables: the caller's settings must not leak in."""
    return clean_environ()


StartProxyProcess = Callable[..., Awaitable[ProxyProcess]]


@pytest.fixture
async def pipeproxy_process() -> AsyncIterator[StartProxyProcess]:
    """Starts ``python -m pipeproxy`` processes: ``await pipeproxy_process(upstream, PIPEPROXY_X="…")``.

    Each listens on a free port of 127.0.0.1 and is configured by PIPEPROXY_* variables
    only; its JSON log is captured. Whatever the test leaves running is stopped here.
    """
    started: list[ProxyProcess] = []

    async def start(upstream: Address, new_session: bool = False, **variables: str) -> ProxyProcess:
        started.append(await ProxyProcess.start(upstream, new_session, **variables))
        return started[-1]

    yield start
    for process in started:
        await process.stop()


@pytest.fixture
def ca():
    """A test CA of trustme's, new for each test."""
    import trustme

    return trustme.CA()


@pytest.fixture
def tls_files(ca, tmp_path: Path) -> tuple[str, str]:
    """pipeproxy's certificate (for localhost, 127.0.0.1, mx.pipeproxy.test) and key."""
    issued = ca.issue_cert("localhost", "127.0.0.1", "mx.pipeproxy.test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    return str(cert), str(key)


@pytest.fixture(scope="session")
def postfix_esmtp():
    """A private Postfix as a legacy MTA: EHLO without PIPELINING, early input refused."""
    yield from _postfix(helo_only=False)


@pytest.fixture(scope="session")
def postfix_helo_only():
    """The same Postfix with EHLO turned off, so it checks for early input after every command."""
    yield from _postfix(helo_only=True)


@pytest.fixture(scope="session")
def postfix_front_door():
    """A Postfix that judges clients by address: only 127.0.0.1 may relay to other domains
    (127.0.0.2 is outside ``mynetworks``), only 127.0.0.1 may send XCLIENT, and a second
    listener (``proxy_port``) reads a PROXY header first and judges the client it names."""
    yield from _postfix(mynetworks="127.0.0.1/32", xclient_hosts="127.0.0.1", proxy_protocol=True)


@pytest.fixture(scope="session")
def postfix_tls():
    """The legacy Postfix offering STARTTLS with a trustme certificate for localhost and
    legacy.test (not 127.0.0.1: an upstream given by address fails --upstream-tls verify
    on the name); ``ca_file`` is the CA that issued it."""
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "legacy.test")
    folder = Path(tempfile.mkdtemp(prefix="pipeproxy-postfix-tls-"))
    folder.chmod(0o755)
    cert, key, ca_file = folder / "cert.pem", folder / "key.pem", folder / "ca.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    for path in (cert, key, ca_file):
        path.chmod(0o644)
    for instance in _postfix(tls=(str(cert), str(key))):
        instance.ca = ca
        instance.ca_file = str(ca_file)
        yield instance
    shutil.rmtree(folder, ignore_errors=True)


def _postfix(**options):
    from postfix import PrivatePostfix

    # Not pytest's tmp_path: that is private to root, and Postfix's own users must reach it.
    root = Path(tempfile.mkdtemp(prefix="pipeproxy-postfix-"))
    root.chmod(0o755)
    instance = PrivatePostfix(root, **options)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(root, ignore_errors=True)
