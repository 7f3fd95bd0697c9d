"""One frozen configuration dataclass per role.

Every field declares, in its metadata, the environment variable that sets it and a help
text; :mod:`wsgate.cli` turns those into flags (``--nats-url``, ...) whose defaults come
from the environment. The environment is read only there, at the entry point. Units are
in the field names (``_s`` seconds, ``_bytes``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsgate.errors import ConfigError

DEFAULT_PREFIX = "wsgate"
DEFAULT_APP_NAME = "main"
DEFAULT_GATEWAY_PORT = 8080
DEFAULT_STATE_PORT = 7070
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_APP = "examples.app:app"


def setting(default: Any, env: str, help: str) -> Any:
    """A config field with its environment variable and help text."""
    return field(default=default, metadata={"env": env, "help": help})


@dataclass(frozen=True, kw_only=True)
class BusConfig:
    """What every role on the NATS bus shares."""

    nats_url: str = setting(
        DEFAULT_NATS_URL, "WSGATE_NATS_URL", "NATS server URL(s), comma-separated"
    )
    prefix: str = setting(DEFAULT_PREFIX, "WSGATE_PREFIX", "subject prefix (dot-separated tokens)")
    app_name: str = setting(DEFAULT_APP_NAME, "WSGATE_APP_NAME", "the app's name in subjects")

    def __post_init__(self) -> None:
        # Checked here rather than on use so a bad setting stops the process at start.
        from wsgate.subjects import validate_prefix

        validate_prefix(self.prefix)
        if not self.nats_url.strip():
            raise ConfigError("nats_url (WSGATE_NATS_URL) must not be empty")

    @property
    def nats_servers(self) -> list[str]:
        """``nats_url`` split into the list nats-py takes."""
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]


@dataclass(frozen=True, kw_only=True)
class GatewayConfig(BusConfig):
    """The gateway: terminates WebSockets, forwards events, applies commands."""

    host: str = setting("127.0.0.1", "WSGATE_HOST", "address to listen on")
    port: int = setting(DEFAULT_GATEWAY_PORT, "WSGATE_GATEWAY_PORT", "HTTP port (0: any free port)")
    node_name: str = setting(
        "", "WSGATE_NODE_NAME", "this gateway's name, part of its id (default: the host name)"
    )
    connect_timeout_s: float = setting(
        5.0, "WSGATE_CONNECT_TIMEOUT_S", "how long the app may take to decide on an upgrade"
    )
    event_timeout_s: float = setting(
        10.0, "WSGATE_EVENT_TIMEOUT_S", "how long a worker may take to acknowledge an event"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_port("port (WSGATE_GATEWAY_PORT)", self.port)
        _check_positive("connect_timeout_s (WSGATE_CONNECT_TIMEOUT_S)", self.connect_timeout_s)
        _check_positive("event_timeout_s (WSGATE_EVENT_TIMEOUT_S)", self.event_timeout_s)


@dataclass(frozen=True, kw_only=True)
class WorkerConfig(BusConfig):
    """The worker: runs the app's handlers for events taken from NATS."""

    app: str = setting(DEFAULT_APP, "WSGATE_APP", "the app to serve, as module:attribute")
    state_address: str = setting(
        f"127.0.0.1:{DEFAULT_STATE_PORT}", "WSGATE_STATE_ADDRESS", "the state service, host:port"
    )
    max_concurrent_events: int = setting(
        1024, "WSGATE_MAX_CONCURRENT_EVENTS", "events handled at once by this worker"
    )
    state_timeout_s: float = setting(5.0, "WSGATE_STATE_TIMEOUT_S", "deadline of one state call")

    def __post_init__(self) -> None:
        super().__post_init__()
        if ":" not in self.app:
            raise ConfigError(f"app (WSGATE_APP) must be module:attribute, got {self.app!r}")
        if not _HOST_PORT.match(self.state_address):
            raise ConfigError(
                "state_address (WSGATE_STATE_ADDRESS) must be host:port, "
                f"got {self.state_address!r}"
            )
        if self.max_concurrent_events < 1:
            raise ConfigError("max_concurrent_events (WSGATE_MAX_CONCURRENT_EVENTS) must be >= 1")
        _check_positive("state_timeout_s (WSGATE_STATE_TIMEOUT_S)", self.state_timeout_s)


@dataclass(frozen=True, kw_only=True)
class StateConfig:
    """The state service: durable objects over gRPC, stored in SQLite."""

    host: str = setting("127.0.0.1", "WSGATE_HOST", "address to listen on")
    port: int = setting(DEFAULT_STATE_PORT, "WSGATE_STATE_PORT", "gRPC port (0: any free port)")
    db_path: Path = setting(
        Path("wsgate-state.sqlite3"), "WSGATE_STATE_DB", "the SQLite file (created if missing)"
    )

    def __post_init__(self) -> None:
        _check_port("port (WSGATE_STATE_PORT)", self.port)


@dataclass(frozen=True, kw_only=True)
class DevConfig:
    """``wsgate dev``: every role on one machine with an embedded NATS."""

    host: str = setting("127.0.0.1", "WSGATE_HOST", "address the gateway listens on")
    port: int = setting(DEFAULT_GATEWAY_PORT, "WSGATE_GATEWAY_PORT", "the gateway's HTTP port")
    app: str = setting(DEFAULT_APP, "WSGATE_APP", "the app to serve, as module:attribute")
    data_dir: Path = setting(
        Path(".wsgate"), "WSGATE_DATA_DIR", "where the state service keeps its SQLite file"
    )
    nats_port: int = setting(0, "WSGATE_NATS_PORT", "the embedded NATS port (0: any free port)")
    prefix: str = setting(DEFAULT_PREFIX, "WSGATE_PREFIX", "subject prefix")

    def __post_init__(self) -> None:
        from wsgate.subjects import validate_prefix

        _check_port("port (WSGATE_GATEWAY_PORT)", self.port)
        _check_port("nats_port (WSGATE_NATS_PORT)", self.nats_port)
        validate_prefix(self.prefix)


_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^:\s]+):\d{1,5}$")


def _check_port(name: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name} must be in 0..65535, got {port}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def env_variables(config_type: type) -> dict[str, str]:
    """Map each field of ``config_type`` to the environment variable that sets it."""
    return {f.name: f.metadata["env"] for f in dataclasses.fields(config_type)}
