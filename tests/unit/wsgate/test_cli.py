"""Flags, WSGATE_* variables and the config dataclasses behind them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from wsgate.cli import build_parser
from wsgate.config import (
    MAX_PRESENCE_INTERVAL_S,
    MAX_REPLICA_TIMEOUT_S,
    DevConfig,
    GatewayConfig,
    StateConfig,
    WorkerConfig,
    env_variables,
)
from wsgate.errors import ConfigError


def _config(role: str, argv: list[str], env: dict[str, str]) -> object:
    args = build_parser(env).parse_args([role, *argv])
    kind = {
        "gateway": GatewayConfig,
        "worker": WorkerConfig,
        "state": StateConfig,
        "dev": DevConfig,
    }[role]
    return kind(**{f.name: getattr(args, f.name) for f in dataclasses.fields(kind)})


def test_environment_sets_defaults_and_flags_win() -> None:
    env = {
        "WSGATE_NATS_URL": "nats://10.0.0.1:4222",
        "WSGATE_GATEWAY_PORT": "9000",
        "WSGATE_PREFIX": "acme.ws",
    }
    config = _config("gateway", [], env)
    assert isinstance(config, GatewayConfig)
    assert (config.nats_url, config.port, config.prefix) == (
        "nats://10.0.0.1:4222",
        9000,
        "acme.ws",
    )
    config = _config("gateway", ["--port", "9001"], env)
    assert isinstance(config, GatewayConfig)
    assert config.port == 9001


def test_state_settings() -> None:
    config = _config("state", [], {"WSGATE_STATE_DB": "/data/s.db", "WSGATE_STATE_PORT": "0"})
    assert config == StateConfig(db_path=Path("/data/s.db"), port=0)


def test_a_malformed_variable_is_reported_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser({"WSGATE_GATEWAY_PORT": "eighty"})
    assert exited.value.code == 2
    assert "WSGATE_GATEWAY_PORT" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [
        (GatewayConfig, {"port": 65536}),
        (GatewayConfig, {"port": -1}),
        (GatewayConfig, {"prefix": "a.*"}),
        (GatewayConfig, {"nats_url": " "}),
        (GatewayConfig, {"ack_timeout_s": 0}),
        (GatewayConfig, {"max_message_bytes": 32 * 1024 * 1024 + 1}),
        (GatewayConfig, {"max_message_bytes": 0}),
        (GatewayConfig, {"auto_responses": "{not json"}),
        (GatewayConfig, {"auto_responses": '["a"]'}),
        (GatewayConfig, {"max_connections": 0}),
        (WorkerConfig, {"app": "no-colon"}),
        (WorkerConfig, {"state_address": "no-port"}),
        # fullmatch: "$" would have taken a trailing newline.
        (WorkerConfig, {"state_address": "127.0.0.1:7070\n"}),
        (WorkerConfig, {"state_address": "127.0.0.1:7070 "}),
        (WorkerConfig, {"state_address": "[::1]:7070\n"}),
        (StateConfig, {"advertise": "10.0.0.1:7070\n"}),
        (StateConfig, {"advertise": "10.0.0.1"}),
        (StateConfig, {"replica_id": "state-1\n"}),
        (StateConfig, {"replica_id": "-state"}),
        (StateConfig, {"replica_id": "a" * 129}),
        (WorkerConfig, {"max_concurrent_events": 0}),
        (DevConfig, {"nats_port": 70000}),
    ],
)
def test_bad_settings_are_config_errors(kind: type, kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        kind(**kwargs)


def test_addresses_and_replica_ids_that_are_taken() -> None:
    assert WorkerConfig(state_address="[::1]:7070").state_address == "[::1]:7070"
    assert StateConfig(advertise="10.0.0.1:7070").advertise == "10.0.0.1:7070"
    assert StateConfig(replica_id="a" * 128).replica_id == "a" * 128
    assert StateConfig(replica_id="state-0.web_1").replica_id == "state-0.web_1"


def test_the_presence_interval_at_and_over_its_limit() -> None:
    # Its lease (5 intervals) is the longest a state service takes (wsgate/envelopes.py).
    assert GatewayConfig(presence_interval_s=MAX_PRESENCE_INTERVAL_S).presence_interval_s == 720
    with pytest.raises(ConfigError, match="WSGATE_PRESENCE_INTERVAL_S"):
        GatewayConfig(presence_interval_s=MAX_PRESENCE_INTERVAL_S + 0.001)


def test_the_replica_timeout_at_and_over_its_limit() -> None:
    assert StateConfig(replica_timeout_s=MAX_REPLICA_TIMEOUT_S).replica_timeout_s == 600
    with pytest.raises(ConfigError, match="WSGATE_STATE_REPLICA_TIMEOUT_S"):
        StateConfig(replica_timeout_s=MAX_REPLICA_TIMEOUT_S + 0.001)


def test_ports_at_the_edges_of_their_range() -> None:
    assert GatewayConfig(port=0).port == 0
    assert GatewayConfig(port=65535).port == 65535


def test_every_setting_has_a_wsgate_variable() -> None:
    for kind in (GatewayConfig, WorkerConfig, StateConfig, DevConfig):
        for name, env in env_variables(kind).items():
            assert env.startswith("WSGATE_"), (kind, name)
