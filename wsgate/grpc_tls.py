"""TLS on the state service's gRPC: the server's credentials and every client's channel,
built from the settings here and nowhere else.

Server (:class:`~wsgate.config.StateConfig`):

- ``WSGATE_TLS_CERT`` and ``WSGATE_TLS_KEY`` (both or neither): the gRPC port speaks TLS
  only, with this certificate. Neither: plaintext (``wsgate dev``, tests, a trusted
  network).
- ``WSGATE_TLS_CLIENT_CA``: a client must present a certificate this CA signed, or its
  handshake is refused (mTLS). Without it the port is TLS with server authentication only:
  allowed (a step of a rollout, or a mesh that authenticates clients itself), and warned
  about at start, because then anyone who reaches the port is served.

Clients (:class:`~wsgate.config.WorkerConfig`, and whoever else makes a
:class:`~wsgate.worker.state_client.StateClient`):

- ``WSGATE_STATE_TLS_CA``: speak TLS, and trust only a server certificate this CA signed.
  Empty: plaintext.
- ``WSGATE_STATE_TLS_CERT`` and ``WSGATE_STATE_TLS_KEY`` (both or neither, and only with
  the CA): the certificate this client presents (mTLS).
- ``WSGATE_STATE_TLS_SERVER_NAME``: the name the server's certificate must carry. By
  default it is the host of the address dialled, but a worker dials whatever address a
  replica advertises (its pod IP over PostgreSQL), so one name shared by every replica's
  certificate (the Service's, say) is checked instead (``grpc.ssl_target_name_override``).

Files are PEM and read once, when the role starts; each is parsed with :mod:`ssl` then, so
a wrong file, a key that does not match its certificate or an encrypted key stops the start
with a ConfigError naming its variable, not every handshake later. Certificates rotated on
disk take effect at the next restart.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from wsgate.config import StateConfig, WorkerConfig
from wsgate.errors import ConfigError

#: gRPC's channel option that sets the name checked in the server's certificate.
SERVER_NAME_OPTION = "grpc.ssl_target_name_override"


@dataclass(frozen=True)
class ServerTls:
    """The state service's TLS: its gRPC port's credentials."""

    credentials: grpc.ServerCredentials
    #: A client certificate signed by the client CA is required (mTLS).
    mutual: bool

    @classmethod
    def load(cls, cert: str | Path, key: str | Path, client_ca: str | Path = "") -> ServerTls:
        """Read and check the files; ConfigError (naming the variable) if one is unusable."""
        cert_pem, key_pem = _load_pair(
            cert, key, "tls_cert (WSGATE_TLS_CERT)", "tls_key (WSGATE_TLS_KEY)"
        )
        ca_pem = _load_ca(client_ca, "tls_client_ca (WSGATE_TLS_CLIENT_CA)") if client_ca else None
        credentials = grpc.ssl_server_credentials(
            [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=ca_pem is not None
        )
        return cls(credentials, mutual=ca_pem is not None)

    def describe(self) -> str:
        """How the port is secured, for the start-up log line."""
        return "mTLS" if self.mutual else "TLS without client certificates"


@dataclass(frozen=True)
class ClientTls:
    """A state client's TLS: the credentials of its channels and the name it checks."""

    credentials: grpc.ChannelCredentials
    #: The name the server's certificate must carry; "" for the host of the address.
    server_name: str
    #: This client presents a certificate (mTLS).
    has_certificate: bool

    @classmethod
    def load(
        cls, ca: str | Path, cert: str | Path = "", key: str | Path = "", server_name: str = ""
    ) -> ClientTls:
        """Read and check the files; ConfigError (naming the variable) if one is unusable.
        ``cert`` and ``key`` are both given or both empty."""
        ca_pem = _load_ca(ca, "state_tls_ca (WSGATE_STATE_TLS_CA)")
        cert_pem: bytes | None = None
        key_pem: bytes | None = None
        if cert or key:
            cert_pem, key_pem = _load_pair(
                cert,
                key,
                "state_tls_cert (WSGATE_STATE_TLS_CERT)",
                "state_tls_key (WSGATE_STATE_TLS_KEY)",
            )
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
        )
        return cls(credentials, server_name=server_name, has_certificate=cert_pem is not None)

    def describe(self) -> str:
        """How this client connects, for log lines."""
        kind = "mTLS" if self.has_certificate else "TLS without a client certificate"
        return f"{kind}, expecting {self.server_name!r}" if self.server_name else kind


def server_tls(config: StateConfig) -> ServerTls | None:
    """The state service's TLS as ``config`` sets it; None for plaintext."""
    if not config.tls_cert:
        return None
    return ServerTls.load(config.tls_cert, config.tls_key, config.tls_client_ca)


def client_tls(config: WorkerConfig) -> ClientTls | None:
    """A worker's TLS to the state service as ``config`` sets it; None for plaintext."""
    if not config.state_tls_ca:
        return None
    return ClientTls.load(
        config.state_tls_ca,
        config.state_tls_cert,
        config.state_tls_key,
        config.state_tls_server_name,
    )


def add_port(server: Any, target: str, tls: ServerTls | None) -> int:
    """Listen on ``target`` with ``tls`` (plaintext for None); the port bound.

    ``server`` is a ``grpc.aio.Server``. Raises RuntimeError if gRPC cannot bind.
    """
    if tls is None:
        return int(server.add_insecure_port(target))
    return int(server.add_secure_port(target, tls.credentials))


def open_channel(
    address: str, tls: ClientTls | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address`` (``host:port``): over TLS with ``tls``, plaintext
    for None. It connects on its first call."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    if tls.server_name:
        options = [*options, (SERVER_NAME_OPTION, tls.server_name)]
    return grpc.aio.secure_channel(address, tls.credentials, options=list(options))


def explain_connect_failure(details: str, tls: ClientTls | None) -> str:
    """What a failed connection's gRPC ``details`` (its "last error") most likely mean,
    with the setting to look at. gRPC reports every refusal by the server (no client
    certificate, one the server's CA did not sign, plaintext to a TLS port) as the same
    "Socket closed", so that hint names the possible causes."""
    reason = details.split("last error: ", 1)[-1].strip()
    if "Hostname Verification" in details or "No match found for server name" in details:
        hint = (
            "the state service's certificate does not carry the name this client checks "
            "(the address's host, or WSGATE_STATE_TLS_SERVER_NAME when set)"
        )
    elif "CERTIFICATE_VERIFY_FAILED" in details or "certificate verify failed" in details:
        hint = "the state service's certificate is not signed by WSGATE_STATE_TLS_CA"
    elif "WRONG_VERSION_NUMBER" in details and tls is not None:
        hint = "the state service does not speak TLS (WSGATE_TLS_CERT unset there)"
    elif "Socket closed" in details and tls is not None:
        hint = (
            "the state service closed the connection during the handshake: most likely it "
            "requires a client certificate signed by its WSGATE_TLS_CLIENT_CA, and this "
            "client has "
            + (
                "one it refused (WSGATE_STATE_TLS_CERT)"
                if tls.has_certificate
                else "none (WSGATE_STATE_TLS_CERT, WSGATE_STATE_TLS_KEY)"
            )
        )
    elif "Socket closed" in details:
        hint = (
            "the state service closed the connection: it may require TLS "
            "(set WSGATE_STATE_TLS_CA and, for mTLS, WSGATE_STATE_TLS_CERT and _KEY)"
        )
    else:
        return reason
    return f"{hint} [{reason}]"


# -- loading -------------------------------------------------------------------------------


def _load_ca(path: str | Path, name: str) -> bytes:
    pem = _read(path, name)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=pem.decode("ascii"))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{name}: {path} holds no usable PEM certificate: {exc}") from exc
    return pem


def _load_pair(
    cert: str | Path, key: str | Path, cert_name: str, key_name: str
) -> tuple[bytes, bytes]:
    if not cert or not key:
        raise ConfigError(f"{cert_name} and {key_name} are set together or not at all")
    cert_pem = _read(cert, cert_name)
    key_pem = _read(key, key_name)

    def encrypted() -> bytes:
        # gRPC takes the key as it is and cannot decrypt it; without this, OpenSSL would
        # prompt on the terminal for a passphrase.
        raise ConfigError(f"{key_name}: {key} is encrypted; give the key unencrypted (PEM)")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert), str(key), password=encrypted)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{cert_name} and {key_name}: {cert} and {key} are not a PEM certificate and its "
            f"private key: {exc}"
        ) from exc
    return cert_pem, key_pem


def _read(path: str | Path, name: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror or exc}") from exc
