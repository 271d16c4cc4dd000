"""TLS toward clients: the server context, built from the operator's files, and reloaded
in place (certificate rotation) without touching sessions already running. TLS toward
the upstream (``--upstream-tls``): the client context, built once per process.

Defaults follow the ``ssl`` module's secure choices (``create_default_context``), with
TLS 1.2 as the oldest version unless the operator says otherwise, no compression (CRIME)
and no renegotiation. The server name a client asks for (SNI) is remembered on its
connection for the logs.
"""

from __future__ import annotations

import ssl
from typing import Any

from ..core.config import Config

VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}


def _remember_sni(connection: Any, name: str | None, context: ssl.SSLContext) -> None:
    connection.sni = name


class ServerTls:
    """The context new TLS sessions use; ``reload`` swaps it for a freshly loaded one."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.context = self._load()

    def _load(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        except (OSError, ssl.SSLError) as error:
            raise ValueError(f"cannot load --tls-cert/--tls-key: {error}") from None
        context.minimum_version = VERSIONS[self.config.tls_min_version]
        if context.minimum_version < ssl.TLSVersion.TLSv1_2:
            # OpenSSL's default security level refuses TLS 1.0/1.1 outright.
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        context.sni_callback = _remember_sni
        return context

    def reload(self) -> str | None:
        """Load the files again; why not, if they are bad (the old context stays)."""
        try:
            self.context = self._load()
        except ValueError as error:
            return str(error)
        return None


def upstream_context(config: Config) -> ssl.SSLContext | None:
    """The context for STARTTLS with the upstream; None with --upstream-tls none.

    may and encrypt check nothing (opportunistic TLS, as Postfix's may and encrypt: a
    self-signed legacy MTA still gets encrypted); verify checks the chain against
    --upstream-tls-ca (or the system store) and the --upstream host name or address.
    ValueError if the CA file cannot be loaded.
    """
    if config.upstream_tls == "none":
        return None
    try:
        context = ssl.create_default_context(cafile=config.upstream_tls_ca or None)
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"cannot load --upstream-tls-ca: {error}") from None
    if config.upstream_tls != "verify":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.minimum_version = VERSIONS[config.upstream_tls_min_version]
    if context.minimum_version < ssl.TLSVersion.TLSv1_2:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # what TLS 1.0/1.1 MTAs still have
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context
