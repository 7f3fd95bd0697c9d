"""Certificates made at test time (trustme) for the TLS and mTLS tests.

One :class:`Pki` holds a CA that the roles trust, plus a second CA that nobody trusts, so a
test can show a refusal of a certificate that is well formed but not ours. Every file is
PEM on disk, because the roles take paths (flags and ``WSGATE_*`` variables), as deployed.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

#: Names every server certificate made here is valid for: the tests run on loopback.
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class CertFiles:
    """A certificate (with its chain) and its private key, as PEM files."""

    cert: Path
    key: Path


class Pki:
    """A trusted CA and an untrusted one, writing the certificates it issues under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._ca = trustme.CA(organization_name="wsgate test CA")
        self._stranger = trustme.CA(organization_name="untrusted test CA")
        self.ca = root / "ca.pem"
        self._ca.cert_pem.write_to_path(str(self.ca))
        self.untrusted_ca = root / "untrusted-ca.pem"
        self._stranger.cert_pem.write_to_path(str(self.untrusted_ca))

    def server(self, name: str = "server", *hostnames: str) -> CertFiles:
        """A server certificate for ``hostnames`` (loopback by default), signed by the CA."""
        return self._issue(self._ca, name, hostnames or LOOPBACK_NAMES)

    def client(self, name: str = "client") -> CertFiles:
        """A client certificate (common name ``name``) signed by the trusted CA."""
        return self._issue(self._ca, name, (f"{name}.wsgate.test",), common_name=name)

    def untrusted_client(self, name: str = "intruder") -> CertFiles:
        """A well-formed client certificate signed by the CA nobody trusts."""
        return self._issue(self._stranger, name, (f"{name}.wsgate.test",), common_name=name)

    def untrusted_server(self, name: str = "impostor") -> CertFiles:
        """A loopback server certificate signed by the CA nobody trusts."""
        return self._issue(self._stranger, name, LOOPBACK_NAMES)

    def client_context(self) -> ssl.SSLContext:
        """A client-side SSL context that trusts the CA (for aiohttp, websockets, nats-py)."""
        return ssl.create_default_context(cafile=str(self.ca))

    def _issue(
        self,
        ca: trustme.CA,
        name: str,
        hostnames: tuple[str, ...],
        *,
        common_name: str | None = None,
    ) -> CertFiles:
        issued = ca.issue_cert(*hostnames, common_name=common_name)
        files = CertFiles(cert=self.root / f"{name}.crt", key=self.root / f"{name}.key")
        # The chain: the leaf first, then any intermediates (none here).
        files.cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        issued.private_key_pem.write_to_path(str(files.key))
        files.key.chmod(0o600)
        return files
