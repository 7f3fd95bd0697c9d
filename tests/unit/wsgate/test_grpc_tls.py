"""The state gRPC's TLS settings: what is refused at start, and what a client says about a
failed connection (wsgate/grpc_tls.py). The handshakes themselves are in
tests/integration/test_state_tls.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from tests.certs import Pki
from wsgate.cli import build_parser
from wsgate.config import BusConfig, StateConfig, WorkerConfig
from wsgate.dev import GRPC_TLS_VARIABLES, plaintext_env
from wsgate.errors import ConfigError
from wsgate.grpc_tls import ClientTls, ServerTls, explain_connect_failure, server_tls


def test_the_settings_are_read_from_their_variables(pki: Pki) -> None:
    server = pki.server("tls-unit-server")
    client = pki.client("tls-unit-client")
    env = {
        "WSGATE_TLS_CERT": str(server.cert),
        "WSGATE_TLS_KEY": str(server.key),
        "WSGATE_TLS_CLIENT_CA": str(pki.ca),
        "WSGATE_STATE_TLS_CA": str(pki.ca),
        "WSGATE_STATE_TLS_CERT": str(client.cert),
        "WSGATE_STATE_TLS_KEY": str(client.key),
        "WSGATE_STATE_TLS_SERVER_NAME": "state.example",
    }
    parser = build_parser(env)
    state = StateConfig(**_fields(StateConfig, parser.parse_args(["state"])))
    worker = WorkerConfig(**_fields(WorkerConfig, parser.parse_args(["worker"])))
    assert (state.tls_cert, state.tls_key, state.tls_client_ca) == (
        str(server.cert),
        str(server.key),
        str(pki.ca),
    )
    assert (worker.state_tls_ca, worker.state_tls_server_name) == (str(pki.ca), "state.example")
    tls = server_tls(state)
    assert tls is not None
    assert tls.mutual
    assert server_tls(StateConfig()) is None  # the default: plaintext


def _fields(kind: type, args: object) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(kind)}


@pytest.mark.parametrize(
    ("settings", "names"),
    [
        ({"tls_client_ca": "ca"}, "WSGATE_TLS_CLIENT_CA"),
        ({"tls_cert": "cert"}, "WSGATE_TLS_KEY"),
        ({"tls_key": "key"}, "WSGATE_TLS_CERT"),
        (
            {"tls_cert": "cert", "tls_key": "key", "tls_client_ca": "missing"},
            "WSGATE_TLS_CLIENT_CA",
        ),
        ({"tls_cert": "missing", "tls_key": "key"}, "WSGATE_TLS_CERT"),
    ],
)
def test_bad_server_settings_are_config_errors(
    pki: Pki, settings: dict[str, str], names: str
) -> None:
    files = pki.server("tls-unit-server")
    with pytest.raises(ConfigError, match=names):
        StateConfig(**_paths(pki, files.cert, files.key, settings))


@pytest.mark.parametrize(
    ("settings", "names"),
    [
        ({"state_tls_cert": "cert", "state_tls_key": "key"}, "needs state_tls_ca"),
        ({"state_tls_server_name": "state"}, "needs state_tls_ca"),
        ({"state_tls_ca": "ca", "state_tls_cert": "cert"}, "WSGATE_STATE_TLS_KEY"),
        ({"state_tls_ca": "ca", "state_tls_key": "key"}, "WSGATE_STATE_TLS_CERT"),
        ({"state_tls_ca": "missing"}, "WSGATE_STATE_TLS_CA"),
    ],
)
def test_bad_client_settings_are_config_errors(
    pki: Pki, settings: dict[str, str], names: str
) -> None:
    files = pki.client("tls-unit-client")
    with pytest.raises(ConfigError, match=names):
        WorkerConfig(**_paths(pki, files.cert, files.key, settings))


def _paths(pki: Pki, cert: Path, key: Path, settings: dict[str, str]) -> dict[str, Any]:
    """``settings`` with "ca", "cert" and "key" replaced by real files, "missing" by a path
    to nothing; anything else kept."""
    files = {"ca": str(pki.ca), "cert": str(cert), "key": str(key), "missing": "/nonexistent"}
    return {name: files.get(value, value) for name, value in settings.items()}


def test_a_client_ca_without_a_certificate_stops_the_state_command(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    from wsgate.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["state", "--tls-client-ca", str(pki.ca)])
    assert exited.value.code == 2
    assert "WSGATE_TLS_CLIENT_CA" in capsys.readouterr().err


def test_unusable_files_are_config_errors_naming_the_variable(pki: Pki, tmp_path: Path) -> None:
    server = pki.server("tls-unit-server")
    other = pki.client("tls-unit-other")
    with pytest.raises(ConfigError, match=r"WSGATE_TLS_CERT.*WSGATE_TLS_KEY.*private key"):
        ServerTls.load(server.cert, other.key)  # a key that is not the certificate's
    with pytest.raises(ConfigError, match=r"WSGATE_TLS_CLIENT_CA.*no usable PEM certificate"):
        ServerTls.load(server.cert, server.key, server.key)
    not_a_certificate = tmp_path / "not-a-certificate.pem"
    not_a_certificate.write_text("hello\n")
    with pytest.raises(ConfigError, match=r"WSGATE_STATE_TLS_CA.*no usable PEM certificate"):
        ClientTls.load(not_a_certificate)
    # gRPC cannot decrypt a key, and OpenSSL would prompt on the terminal for it.
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(server.key.read_bytes(), password=None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match=r"WSGATE_STATE_TLS_KEY.*encrypted"):
        ClientTls.load(pki.ca, server.cert, encrypted)


@pytest.mark.parametrize(
    ("details", "has_certificate", "hint"),
    [
        (
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.5:7070: Tls "
            "handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL "
            "routines:OPENSSL_internal:WRONG_VERSION_NUMBER",
            True,
            "does not speak TLS",
        ),
        (
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.5:7070: Custom "
            "verification check failed with error: UNAUTHENTICATED: Hostname Verification "
            "Check failed.",
            True,
            "WSGATE_STATE_TLS_SERVER_NAME",
        ),
        (
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.5:7070: "
            "Failed to connect to remote host: Connection refused",
            False,
            "Connection refused",
        ),
    ],
)
def test_a_failed_connection_is_explained(
    pki: Pki, details: str, has_certificate: bool, hint: str
) -> None:
    files = pki.client("tls-unit-client")
    tls = ClientTls.load(pki.ca, files.cert, files.key) if has_certificate else None
    explained = explain_connect_failure(details, tls)
    assert hint in explained
    assert "failed to connect to all addresses" not in explained  # the reason, not the noise


def test_dev_keeps_the_grpc_tls_settings_from_its_roles() -> None:
    environ = {"WSGATE_TLS_CERT": "/x.crt", "WSGATE_STATE_TLS_CA": "/ca.pem", "PATH": "/bin"}
    assert plaintext_env(environ) == {"PATH": "/bin"}
    # Every TLS setting of the state service and of its clients is in the list (NATS' own,
    # on BusConfig, are dev's other filter: tests/unit/wsgate/test_bus_options.py).
    nats_fields = {f.name for f in dataclasses.fields(BusConfig)}
    tls_fields = [
        f.metadata["env"]
        for kind in (StateConfig, WorkerConfig)
        for f in dataclasses.fields(kind)
        if "tls" in f.name and f.name not in nats_fields
    ]
    assert set(tls_fields) == GRPC_TLS_VARIABLES
