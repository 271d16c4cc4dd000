"""A real Postfix as the sender: the issue's first complaint. A private Postfix relays all
mail through pipeproxy (``relayhost = [127.0.0.1]:PORT``) and requires TLS for it
(``smtp_tls_security_level = encrypt``, trusting the trustme CA); pipeproxy offers
STARTTLS with its own certificate and passes the mail on, lock-step, to the strict
bundled legacy MTA, which has no TLS at all. Before pipeproxy had TLS, Postfix deferred
every message: "TLS is required, but was not offered".
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
import trio
from test_tls import start_tls_proxy

from pipeproxy.demo.legacy_mta import LegacyMTA

from postfix import PrivatePostfix

pytestmark = pytest.mark.peers


@pytest.fixture
def sender_root():
    # Not pytest's tmp_path: Postfix's own users must reach it.
    root = Path(tempfile.mkdtemp(prefix="pipeproxy-postfix-sender-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


async def test_a_postfix_requiring_tls_relays_through_pipeproxy_to_a_legacy_mta(nursery, ca, tls_files, sender_root):
    mta = LegacyMTA()
    starttls, _ = await start_tls_proxy(nursery, mta, tls_files)
    ca_file = sender_root / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca_file.chmod(0o644)
    sender = PrivatePostfix(sender_root, relay_to=f"[{starttls.host}]:{starttls.port}", smtp_ca=str(ca_file))
    await trio.to_thread.run_sync(sender.start)
    try:
        subject = f"from postfix {uuid.uuid4().hex}"
        recipients = ["r1@remote.test", "r2@remote.test"]
        message = f"Subject: {subject}\r\nFrom: s@sender.test\r\n\r\nrelayed over TLS\r\n".encode()
        await trio.to_thread.run_sync(sender.send, "s@sender.test", recipients, message)
        with trio.move_on_after(60):
            while not mta.messages:
                await trio.sleep(0.1)
        assert await trio.to_thread.run_sync(sender.queue_empty), "Postfix still has the message queued"
    finally:
        await trio.to_thread.run_sync(sender.stop)
    assert len(mta.messages) == 1, sender.maillog
    assert sorted(mta.messages[0].recipients) == recipients
    assert mta.violations == []
    # Postfix's smtp client says TLS was used toward pipeproxy (smtp_tls_loglevel = 1),
    # and that the relay delivered it (status=sent).
    assert "TLS connection established to" in sender.maillog
    assert "status=sent" in sender.maillog
