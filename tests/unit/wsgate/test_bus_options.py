"""NATS credentials and TLS settings: their checks at start, and the nats-py options
``wsgate.bus`` makes of them (the connections themselves: test_nats_permissions.py)."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import pytest

from tests.certs import Pki
from tests.nats_jwt import account_jwt, creds, mistyped, new_nkey, user_jwt
from wsgate.bus import connect_options, is_permission_violation
from wsgate.cli import build_parser
from wsgate.config import BusConfig, GatewayConfig, StateConfig, WorkerConfig, nkeys_available
from wsgate.errors import ConfigError
from wsgate.nats_permissions import permissions

FILE_SETTINGS = {
    "nats_nkey_seed": "WSGATE_NATS_NKEY_SEED",
    "nats_creds": "WSGATE_NATS_CREDS",
    "nats_tls_ca": "WSGATE_NATS_TLS_CA",
    "nats_tls_cert": "WSGATE_NATS_TLS_CERT",
    "nats_tls_key": "WSGATE_NATS_TLS_KEY",
}


#: A user of an account, its JWT allowed a gateway's subjects: the parts of a .creds file.
ACCOUNT, USER = new_nkey("account"), new_nkey("user")
USER_JWT = user_jwt(ACCOUNT, USER, "gateway", permissions("gateway", "wsgate", "gateway"))


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """A user's seed file and .creds file (test_nats_nkeys.py logs in with such files)."""
    seed = tmp_path / "gateway.nk"
    seed.write_text(USER.seed + "\n")
    creds_file = tmp_path / "gateway.creds"
    creds_file.write_text(creds(USER_JWT, USER))
    return {"seed": str(seed), "creds": str(creds_file)}


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


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("", "holds no NATS user nkey seed"),
        ("SUAPLACEHOLDERSEED\n", "holds no NATS user nkey seed"),
        (mistyped(USER.seed), "holds no NATS user nkey seed"),
        (new_nkey("account").seed, r"SU\): the seed of an nkey that is not a user's"),
        (USER.public, "holds no NATS user nkey seed"),
        (f"# a comment\n{USER.seed}\n", "holds no NATS user nkey seed"),
        (creds(USER_JWT, USER), "holds no NATS user nkey seed"),
    ],
    ids=[
        "empty",
        "a placeholder",
        "mistyped",
        "an account's seed",
        "a public key",
        "a comment first",
        "a .creds file",
    ],
)
def test_a_file_without_a_user_seed_is_a_config_error(
    content: str, error: str, tmp_path: Path
) -> None:
    path = tmp_path / "seed.nk"
    path.write_text(content)
    with pytest.raises(ConfigError, match=rf"WSGATE_NATS_NKEY_SEED.*{error}") as caught:
        BusConfig(nats_nkey_seed=str(path))
    assert USER.seed not in str(caught.value)


def test_a_seed_with_spaces_around_it_is_a_seed(tmp_path: Path) -> None:
    path = tmp_path / "seed.nk"
    path.write_text(f"  {USER.seed}\n\n")
    assert BusConfig(nats_nkey_seed=str(path)).nats_nkey_seed == str(path)


@pytest.mark.parametrize("setting", ["nats_nkey_seed", "nats_creds"])
def test_an_unreadable_file_is_a_config_error(setting: str, files: dict[str, str]) -> None:
    path = files["seed" if setting == "nats_nkey_seed" else "creds"]
    os.chmod(path, 0)
    if os.access(path, os.R_OK):
        # Root reads a file without permissions; nobody reads this one (EIO at offset 0).
        path = "/proc/self/mem"
    with pytest.raises(ConfigError, match=rf"{FILE_SETTINGS[setting]}\): cannot read '{path}'"):
        BusConfig(**{setting: path})


def test_a_file_of_binary_bytes_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "seed.nk"
    path.write_bytes(b"\xff\xfe" + USER.seed.encode())
    for setting in ("nats_nkey_seed", "nats_creds"):
        with pytest.raises(ConfigError, match=rf"{FILE_SETTINGS[setting]}\): .*not a text file"):
            BusConfig(**{setting: str(path)})


def _without(text: str, marker: str) -> str:
    """``text`` without the line holding ``marker`` and the one after it."""
    lines = text.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if marker in line)
    return "".join(lines[:at] + lines[at + 2 :])


@pytest.mark.parametrize(
    ("content", "error"),
    [
        # nats-py would look for the JWT forever.
        (USER.seed + "\n", r"not a \.creds file: no line -----BEGIN NATS USER JWT"),
        (_without(creds(USER_JWT, USER), "BEGIN NATS USER JWT"), "not a .creds file"),
        (_without(creds(USER_JWT, USER), "BEGIN USER NKEY SEED"), "has no user nkey seed"),
        (
            creds(USER_JWT, USER).replace(USER.seed, mistyped(USER.seed)),
            "the line after BEGIN USER NKEY SEED is not a NATS nkey seed",
        ),
        (
            creds(USER_JWT, USER).replace(USER.seed, new_nkey("account").seed),
            "the line after BEGIN USER NKEY SEED is the seed of an nkey that is not a user",
        ),
        (
            creds(USER_JWT, USER).replace(USER_JWT, "not.a.jwt"),
            "the line after BEGIN NATS USER JWT is not a NATS user JWT",
        ),
        (
            creds(account_jwt(new_nkey("operator"), ACCOUNT), USER),
            "the line after BEGIN NATS USER JWT is not a NATS user JWT",
        ),
        (
            creds(USER_JWT, new_nkey("user")),
            "its JWT is for the user 'U.*', its seed is the user 'U.*': the server would",
        ),
        # nats-py reads each part as the line after its marker, without its last character.
        (creds(USER_JWT, USER).replace("\n", "\r\n"), "is not a NATS nkey seed"),
    ],
    ids=[
        "a seed alone",
        "no JWT",
        "no seed",
        "a mistyped seed",
        "an account's seed",
        "not a JWT",
        "an account's JWT",
        "another user's seed",
        "CRLF",
    ],
)
def test_a_creds_file_without_a_user_jwt_and_its_seed_is_a_config_error(
    content: str, error: str, tmp_path: Path
) -> None:
    path = tmp_path / "user.creds"
    path.write_text(content)
    with pytest.raises(ConfigError, match=rf"WSGATE_NATS_CREDS.*{error}") as caught:
        BusConfig(nats_creds=str(path))
    assert USER.seed not in str(caught.value)


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
