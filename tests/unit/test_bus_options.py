"""NATS credentials and TLS settings: their checks at start, and the nats-py options
``wsgate.bus`` makes of them (the connections themselves: test_nats_permissions.py)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

from tests.certs import Pki
from wsgate.bus import connect_options, is_permission_violation
from wsgate.cli import build_parser
from wsgate.config import BusConfig, GatewayConfig, StateConfig, WorkerConfig, nkeys_available
from wsgate.errors import ConfigError

FILE_SETTINGS = {
    "nats_nkey_seed": "WSGATE_NATS_NKEY_SEED",
    "nats_creds": "WSGATE_NATS_CREDS",
    "nats_tls_ca": "WSGATE_NATS_TLS_CA",
    "nats_tls_cert": "WSGATE_NATS_TLS_CERT",
    "nats_tls_key": "WSGATE_NATS_TLS_KEY",
}


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """Stand-ins for a seed and a .creds file (nats-py reads them only when connecting)."""
    seed = tmp_path / "gateway.nk"
    seed.write_text("SUAPLACEHOLDERSEED\n")
    creds = tmp_path / "gateway.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\n")
    return {"seed": str(seed), "creds": str(creds)}


def test_without_settings_nothing_is_sent_but_the_identitys_inbox() -> None:
    config = BusConfig(node_name="edge-1")
    options = connect_options(config, "gateway")
    assert options == {
        "servers": ["nats://127.0.0.1:4222"],
        "inbox_prefix": "wsgate.inbox.gateway.edge-1",
    }
    assert not config.nats_tls


def test_each_kind_of_credential_becomes_its_option(files: dict[str, str]) -> None:
    by_password = connect_options(BusConfig(nats_user="gw", nats_password="pw"), "worker")
    assert (by_password["user"], by_password["password"]) == ("gw", "pw")
    if not nkeys_available():
        # nats-py signs with the nkeys package: without it, a clear error at start.
        for settings in ({"nats_nkey_seed": files["seed"]}, {"nats_creds": files["creds"]}):
            with pytest.raises(ConfigError, match=r"nkeys package.*nats-py\[nkeys\]"):
                BusConfig(**settings)
        return
    by_seed = connect_options(BusConfig(nats_nkey_seed=files["seed"]), "worker")
    assert by_seed["nkeys_seed"] == files["seed"]
    assert "user" not in by_seed
    by_creds = connect_options(BusConfig(nats_creds=files["creds"]), "state")
    assert by_creds["user_credentials"] == files["creds"]
    assert by_creds["inbox_prefix"].startswith("wsgate.inbox.state.")


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"nats_user": "a", "nats_password": "b", "nats_nkey_seed": "seed"}, "NKEY_SEED"),
        ({"nats_nkey_seed": "seed", "nats_creds": "creds"}, "WSGATE_NATS_CREDS"),
        ({"nats_user": "a", "nats_password": "b", "nats_url": "nats://u:p@h:4222"}, "in WSGATE"),
    ],
)
def test_two_kinds_of_credentials_are_a_config_error(
    settings: dict[str, str], named: str, files: dict[str, str]
) -> None:
    real = {k: files["seed"] if v == "seed" else files["creds"] if v == "creds" else v
            for k, v in settings.items()}  # fmt: skip
    with pytest.raises(ConfigError, match=rf"one kind at most.*{named}"):
        BusConfig(**real)


@pytest.mark.parametrize("given", ["nats_user", "nats_password"])
def test_a_user_without_a_password_and_the_reverse_are_config_errors(given: str) -> None:
    with pytest.raises(ConfigError, match=r"WSGATE_NATS_USER.*WSGATE_NATS_PASSWORD"):
        BusConfig(**{given: "x"})


@pytest.mark.parametrize("name", sorted(FILE_SETTINGS))
def test_a_missing_file_is_a_config_error_naming_its_variable(name: str, tmp_path: Path) -> None:
    settings: dict[str, Any] = {name: str(tmp_path / "missing.pem")}
    if name == "nats_tls_cert":
        settings["nats_tls_key"] = __file__
    elif name == "nats_tls_key":
        settings["nats_tls_cert"] = __file__
    with pytest.raises(ConfigError, match=rf"{FILE_SETTINGS[name]}.*no such file"):
        BusConfig(**settings)


@pytest.mark.parametrize("given", ["nats_tls_cert", "nats_tls_key"])
def test_a_client_certificate_without_its_key_and_the_reverse_are_config_errors(
    given: str,
) -> None:
    with pytest.raises(ConfigError, match=r"WSGATE_NATS_TLS_CERT.*WSGATE_NATS_TLS_KEY.*both"):
        BusConfig(**{given: __file__})


def test_tls_trusts_the_ca_and_starts_before_the_server_speaks(pki: Pki) -> None:
    config = BusConfig(nats_tls_ca=str(pki.ca))
    options = connect_options(config, "gateway")
    context = options["tls"]
    assert isinstance(context, ssl.SSLContext)
    assert options["tls_handshake_first"] is True
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [
        c["subject"] for c in ssl.create_default_context(cafile=str(pki.ca)).get_ca_certs()
    ]


def test_a_client_certificate_alone_turns_tls_on_with_the_systems_cas(pki: Pki) -> None:
    client = pki.client("gateway")
    config = BusConfig(nats_tls_cert=str(client.cert), nats_tls_key=str(client.key))
    assert config.nats_tls
    context = connect_options(config, "gateway")["tls"]
    assert context.verify_mode is ssl.CERT_REQUIRED


def test_a_key_that_is_not_the_certificates_fails_at_connect_options(pki: Pki) -> None:
    one, other = pki.client("one"), pki.client("other")
    config = BusConfig(nats_tls_cert=str(one.cert), nats_tls_key=str(other.key))
    with pytest.raises(ssl.SSLError):
        connect_options(config, "gateway")


@pytest.mark.parametrize("node", ["Edge", "a.b", "-a", "a" * 41])
def test_an_unusable_node_name_is_a_config_error(node: str) -> None:
    with pytest.raises(ConfigError, match="WSGATE_NODE_NAME"):
        WorkerConfig(node_name=node)


def test_every_role_takes_the_settings_from_flags_and_the_environment(pki: Pki) -> None:
    client = pki.client("any")
    env = {
        "WSGATE_NATS_USER": "u",
        "WSGATE_NATS_PASSWORD": "p",
        "WSGATE_NATS_TLS_CA": str(pki.ca),
        "WSGATE_NATS_TLS_CERT": str(client.cert),
        "WSGATE_NATS_TLS_KEY": str(client.key),
        "WSGATE_NODE_NAME": "edge-1",
    }
    for role, config_type in (
        ("gateway", GatewayConfig),
        ("worker", WorkerConfig),
        ("state", StateConfig),
    ):
        args = build_parser(env).parse_args([role, "--nats-user", "flagged"])
        fields = {name: getattr(args, name) for name in BusConfig.__dataclass_fields__}
        config = config_type(**fields)
        assert (config.nats_user, config.nats_password, config.node) == ("flagged", "p", "edge-1")
        assert config.nats_tls_cert == str(client.cert)


def test_a_permission_violation_is_told_apart_from_other_errors() -> None:
    assert is_permission_violation(
        Exception('nats: permissions violation for publish to "wsgate.gw.a.a-abcdefgh"')
    )
    assert not is_permission_violation(Exception("nats: authorization violation"))


def test_wsgate_dev_starts_its_children_without_nats_security_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The embedded nats-server is plaintext and open: a deployment's credentials or CA
    in the environment must not reach the dev children."""
    from wsgate import dev

    for env in (*FILE_SETTINGS.values(), "WSGATE_NATS_USER", "WSGATE_NATS_PASSWORD"):
        monkeypatch.setenv(env, "/deployed/value")
    monkeypatch.setenv("WSGATE_PREFIX", "kept")
    children = dev._children_env()
    assert not {k for k in children if k.startswith("WSGATE_NATS_")}
    assert children["WSGATE_PREFIX"] == "kept"
