"""A private Postfix instance configured as a legacy MTA, for tests on 127.0.0.1.

It has its own config, queue, data and mail directories under one temporary folder and
listens on a free port; nothing touches the system instance or port 25. It hides
PIPELINING (``smtpd_discard_ehlo_keywords``) and refuses early input
(``reject_unauth_pipelining`` in every restriction list, and
``smtpd_forbid_unauth_pipelining``). Every recipient in legacy.test is delivered to one
Maildir, so a test can read what really arrived; mail for any other domain (relayed for
a client Postfix trusts) is discarded, never sent out.

Postfix only looks for early input after EHLO, HELO, DATA, NOOP and VRFY in an ESMTP
session, but after every command in a HELO session (seen with Postfix 3.7.11; postconf(5)
on ``reject_unauth_pipelining`` describes the check). ``helo_only=True`` turns EHLO into
an unknown verb with ``smtpd_command_filter``, so clients fall back to HELO and every
command is checked.

The keyword options make a front door to test who Postfix thinks the client is:
``mynetworks`` (who may relay to other domains; ``127.0.0.1/32`` leaves 127.0.0.2
outside), ``xclient_hosts`` (``smtpd_authorized_xclient_hosts``: who may send XCLIENT)
and ``proxy_protocol`` (a second listener, on ``proxy_port``, that expects a PROXY v1 or
v2 header first: ``smtpd_upstream_proxy_protocol = haproxy``, with XCLIENT not offered
there). Client ports are logged, so the maillog tells one 127.0.0.1 client from another.

``tls=(cert_file, key_file)`` offers STARTTLS with that certificate
(``smtpd_tls_security_level = may``) and logs each TLS session; it needs the ``tlsmgr``
service (without it Postfix answers STARTTLS with ``454 4.7.0 TLS not available due to
local problem``). ``relay_to`` makes a sender: mail for other domains goes out through
that relay host (``relayhost``) with ``smtp_tls_security_level = encrypt``, trusting
``smtp_ca``; mail is injected with ``send``.
"""

from __future__ import annotations

import email
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

from peers import unused_port

MASTER_CF = """\
{listen} inet n - n - - smtpd
{proxy_listen}pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n -  - trivial-rewrite
bounce    unix  - - n -  0 bounce
defer     unix  - - n -  0 bounce
trace     unix  - - n -  0 bounce
verify    unix  - - n -  1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -  - proxymap
smtp      unix  - - n -  - smtp
relay     unix  - - n -  - smtp
showq     unix  n - n -  - showq
error     unix  - - n -  - error
retry     unix  - - n -  - error
discard   unix  - - n -  - discard
virtual   unix  - n n -  - virtual
anvil     unix  - - n -  1 anvil
tlsmgr    unix  - - n 1000? 1 tlsmgr
scache    unix  - - n -  1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = legacy.test
mydestination =
mynetworks = {mynetworks}
alias_maps =
alias_database =
virtual_mailbox_domains = legacy.test
virtual_mailbox_base = {root}/mail
virtual_mailbox_maps = static:catchall/
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
biff = no
default_transport = discard
smtpd_peername_lookup = no
smtpd_client_port_logging = yes
smtpd_discard_ehlo_keywords = pipelining
smtpd_forbid_unauth_pipelining = yes
smtpd_helo_restrictions = reject_unauth_pipelining
smtpd_sender_restrictions = reject_unauth_pipelining
smtpd_recipient_restrictions = reject_unauth_pipelining, permit_mynetworks, reject_unauth_destination
smtpd_data_restrictions = reject_unauth_pipelining
"""


class PrivatePostfix:
    def __init__(
        self, root: Path, *, helo_only: bool = False, mynetworks: str = "127.0.0.0/8", xclient_hosts: str = "",
        proxy_protocol: bool = False, tls: tuple[str, str] | None = None, relay_to: str = "", smtp_ca: str = "",
    ) -> None:
        self.root = root
        self.config_dir = root / "etc"
        self.port = unused_port()
        self.helo_only = helo_only
        self.mynetworks = mynetworks
        self.xclient_hosts = xclient_hosts
        # The listener that wants a PROXY header first; None without one.
        self.proxy_port = unused_port() if proxy_protocol else None
        self.tls = tls
        self.relay_to = relay_to
        self.smtp_ca = smtp_ca

    @property
    def maillog(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("a private Postfix needs root to start (as in CI)")
        if shutil.which("postfix") is None:
            raise RuntimeError("postfix is not installed: run .ci/setup")
        nobody = pwd.getpwnam("nobody")
        for name in ("etc", "queue", "data", "mail"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        shutil.chown(self.root / "data", "postfix")
        os.chown(self.root / "mail", nobody.pw_uid, nobody.pw_gid)
        main_cf = MAIN_CF.format(root=self.root, uid=nobody.pw_uid, gid=nobody.pw_gid, mynetworks=self.mynetworks)
        if self.xclient_hosts:
            main_cf += f"smtpd_authorized_xclient_hosts = {self.xclient_hosts}\n"
        if self.tls is not None:
            main_cf += (
                f"smtpd_tls_security_level = may\nsmtpd_tls_cert_file = {self.tls[0]}\n"
                f"smtpd_tls_key_file = {self.tls[1]}\nsmtpd_tls_loglevel = 1\n"
            )
        if self.relay_to:
            # A sender: everything not for legacy.test goes to the relay host, over TLS only.
            main_cf = main_cf.replace("default_transport = discard\n", "")
            main_cf += (
                f"relayhost = {self.relay_to}\nsmtp_tls_security_level = encrypt\nsmtp_tls_loglevel = 1\n"
                "smtp_dns_support_level = disabled\nmyorigin = sender.test\nmyhostname = sender.test\n"
            )
            if self.smtp_ca:
                main_cf += f"smtp_tls_CAfile = {self.smtp_ca}\n"
        if self.helo_only:
            (self.config_dir / "command_filter").write_text("/^[Ee][Hh][Ll][Oo]( .*)?$/ XEHLO$1\n")
            main_cf += f"smtpd_command_filter = regexp:{self.config_dir}/command_filter\n"
        (self.config_dir / "main.cf").write_text(main_cf)
        proxy_listen = ""
        if self.proxy_port is not None:
            # The real client is the one in the header; XCLIENT is for the other listener.
            proxy_listen = (
                f"127.0.0.1:{self.proxy_port} inet n - n - - smtpd\n"
                "  -o smtpd_upstream_proxy_protocol=haproxy\n  -o smtpd_authorized_xclient_hosts=\n"
            )
        master_cf = MASTER_CF.format(listen=f"127.0.0.1:{self.port}", proxy_listen=proxy_listen)
        (self.config_dir / "master.cf").write_text(master_cf)
        # postfix(1) prints its errors only to a terminal: script(1) gives it one.
        result = subprocess.run(
            ["script", "-qec", f"postfix -c {self.config_dir} start", "/dev/null"],
            capture_output=True, text=True, timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"postfix did not start: {result.stdout}{result.stderr}{self.maillog}")
        self._wait_listening(self.port)
        if self.proxy_port is not None:
            self._wait_listening(self.proxy_port, b"PROXY TCP4 127.0.0.1 127.0.0.1 1 %d\r\n" % self.proxy_port)

    def _wait_listening(self, port: int, header: bytes = b"", limit: float = 30.0) -> None:
        deadline = time.monotonic() + limit
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    sock.sendall(header)
                    if not sock.recv(512).startswith(b"220"):
                        raise OSError("no greeting yet")
                    sock.sendall(b"QUIT\r\n")
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postfix is not listening on {port}:\n{self.maillog}") from None
                time.sleep(0.1)

    def send(self, sender: str, recipients: list[str], message: bytes) -> None:
        """Inject a message with this instance's sendmail(1)."""
        subprocess.run(
            ["sendmail", "-C", str(self.config_dir), "-f", sender, "--", *recipients],
            input=message, check=True, capture_output=True, timeout=60,
        )

    def queue_empty(self, limit: float = 60.0) -> bool:
        """Wait (bounded) until the queue is empty; whether it is."""
        deadline = time.monotonic() + limit
        while True:
            queued = [path for name in ("incoming", "active", "deferred", "maildrop")
                      for path in (self.root / "queue" / name).rglob("*") if path.is_file()]
            if not queued or time.monotonic() > deadline:
                return not queued
            time.sleep(0.2)

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.config_dir), "abort"], capture_output=True, timeout=60)

    def delivered(self) -> list[email.message.Message]:
        """Every message in the catch-all Maildir, one per delivered recipient."""
        new = self.root / "mail" / "catchall" / "new"
        if not new.exists():
            return []
        return [email.message_from_bytes(path.read_bytes()) for path in sorted(new.iterdir())]

    def wait_delivered(self, subject: str, count: int, limit: float = 60.0) -> list[email.message.Message]:
        """The copies of the message with ``subject``, once ``count`` have arrived."""
        deadline = time.monotonic() + limit
        while True:
            found = [m for m in self.delivered() if m["Subject"] == subject]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.1)
