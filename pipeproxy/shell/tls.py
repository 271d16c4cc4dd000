"""TLS toward clients: the server context, built from the operator's files, and reloaded
in place (certificate rotation) without touching sessions already running.

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
