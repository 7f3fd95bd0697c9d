"""One frozen configuration dataclass per role.

Every field declares, in its metadata, the environment variable that sets it and a help
text; :mod:`wsgate.cli` turns those into flags (``--nats-url``, ...) whose defaults come
from the environment. The environment is read only there, at the entry point. Units are
in the field names (``_s`` seconds, ``_bytes``).
"""

from __future__ import annotations

import dataclasses
import json
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
DEFAULT_WORKER_PORT = 8081
DEFAULT_STATE_PROBE_PORT = 8082
#: The largest message size a gateway may be configured to accept (32 MiB).
MAX_MESSAGE_LIMIT = 32 * 1024 * 1024
#: Per-object quotas (see StateConfig): no cap in normal use, a bound on abuse.
DEFAULT_MAX_KEYS_PER_OBJECT = 10_000_000
DEFAULT_MAX_OBJECT_BYTES = 1024**3
#: DESIGN.md: no cap on members per object below 100,000.
DEFAULT_MAX_MEMBERS_PER_OBJECT = 100_000
DEFAULT_MIN_FREE_DISK_BYTES = 256 * 1024 * 1024


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
    ack_timeout_s: float = setting(
        5.0,
        "WSGATE_ACK_TIMEOUT_S",
        "resend an event (same sequence, marked redelivered) when no worker acknowledged it "
        "or reported progress within this time",
    )
    delivery_timeout_s: float = setting(
        30.0,
        "WSGATE_DELIVERY_TIMEOUT_S",
        "give up on an event after this long without a sign of a worker (NATS outages "
        "included) and close its connection with 1013",
    )
    max_message_bytes: int = setting(
        1024 * 1024,
        "WSGATE_MAX_MESSAGE_BYTES",
        f"largest message a client may send (close 1009 above), at most {MAX_MESSAGE_LIMIT}",
    )
    max_outbound_bytes: int = setting(
        4 * 1024 * 1024,
        "WSGATE_MAX_OUTBOUND_BYTES",
        "bytes waiting to be written to one client; a slower client is closed with 1008",
    )
    heartbeat_s: float = setting(
        30.0, "WSGATE_HEARTBEAT_S", "ping clients this often; no pong in half of it closes (0: off)"
    )
    idle_timeout_s: float = setting(
        0.0, "WSGATE_IDLE_TIMEOUT_S", "close with 1001 after this long without a message (0: off)"
    )
    max_connections: int = setting(
        10_000, "WSGATE_MAX_CONNECTIONS", "open connections; more upgrades are refused with 503"
    )
    allowed_origins: str = setting(
        "",
        "WSGATE_ALLOWED_ORIGINS",
        "comma-separated Origin values allowed to upgrade, '*' as a wildcard "
        "(e.g. https://*.example.com); empty: any. A request without Origin is allowed.",
    )
    auto_responses: str = setting(
        "",
        "WSGATE_AUTO_RESPONSES",
        'JSON object of text messages answered by the gateway itself, e.g. {"ping": "pong"}',
    )
    drain_timeout_s: float = setting(
        20.0,
        "WSGATE_DRAIN_TIMEOUT_S",
        "on SIGTERM: time for events in flight to finish and sockets to close (with 1001)",
    )
    presence_interval_s: float = setting(
        2.0,
        "WSGATE_PRESENCE_INTERVAL_S",
        "announce this gateway to the state service this often; its members leave every "
        "object when 5 intervals pass without an announcement (the gateway died)",
    )
    # A str, not Path | None: the CLI builds each flag from the field's type, which must
    # be callable on the flag's text; "" stands for none (see static_path).
    static_dir: str = setting(
        "",
        "WSGATE_STATIC_DIR",
        "serve this directory's files to plain GETs (/ is index.html) next to the "
        "WebSocket routes; empty: none",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_port("port (WSGATE_GATEWAY_PORT)", self.port)
        if self.static_path is not None and not self.static_path.is_dir():
            raise ConfigError(
                f"static_dir (WSGATE_STATIC_DIR) must be a directory, got {self.static_dir!r}"
            )
        _check_positive(
            "presence_interval_s (WSGATE_PRESENCE_INTERVAL_S)", self.presence_interval_s
        )
        _check_positive("connect_timeout_s (WSGATE_CONNECT_TIMEOUT_S)", self.connect_timeout_s)
        _check_positive("ack_timeout_s (WSGATE_ACK_TIMEOUT_S)", self.ack_timeout_s)
        _check_positive("delivery_timeout_s (WSGATE_DELIVERY_TIMEOUT_S)", self.delivery_timeout_s)
        _check_positive("drain_timeout_s (WSGATE_DRAIN_TIMEOUT_S)", self.drain_timeout_s)
        if not 1 <= self.max_message_bytes <= MAX_MESSAGE_LIMIT:
            raise ConfigError(
                f"max_message_bytes (WSGATE_MAX_MESSAGE_BYTES) must be in 1..{MAX_MESSAGE_LIMIT}, "
                f"got {self.max_message_bytes}"
            )
        if self.max_outbound_bytes < 1:
            raise ConfigError("max_outbound_bytes (WSGATE_MAX_OUTBOUND_BYTES) must be >= 1")
        if self.max_connections < 1:
            raise ConfigError("max_connections (WSGATE_MAX_CONNECTIONS) must be >= 1")
        if self.heartbeat_s < 0 or self.idle_timeout_s < 0:
            raise ConfigError("heartbeat_s and idle_timeout_s must be >= 0 (0: off)")
        self.auto_response_map  # noqa: B018 - parse now, so bad JSON stops the start

    @property
    def static_path(self) -> Path | None:
        """``static_dir`` as a path; None when no static files are served."""
        return Path(self.static_dir) if self.static_dir else None

    @property
    def origin_patterns(self) -> tuple[str, ...]:
        """``allowed_origins`` split; empty means any origin."""
        return tuple(o.strip() for o in self.allowed_origins.split(",") if o.strip())

    @property
    def auto_response_map(self) -> dict[str, str]:
        """``auto_responses`` parsed: request text → response text."""
        if not self.auto_responses.strip():
            return {}
        try:
            parsed = json.loads(self.auto_responses)
        except ValueError as exc:
            raise ConfigError(f"auto_responses (WSGATE_AUTO_RESPONSES) is not JSON: {exc}") from exc
        if not isinstance(parsed, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()
        ):
            raise ConfigError(
                "auto_responses (WSGATE_AUTO_RESPONSES) must be a JSON object of strings"
            )
        return parsed


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
    host: str = setting("127.0.0.1", "WSGATE_HOST", "address of /healthz, /readyz, /metrics")
    port: int = setting(
        DEFAULT_WORKER_PORT, "WSGATE_WORKER_PORT", "HTTP port of /healthz, /readyz, /metrics"
    )
    drain_timeout_s: float = setting(
        20.0, "WSGATE_DRAIN_TIMEOUT_S", "on SIGTERM: time for running handlers to finish"
    )
    turn_timeout_s: float = setting(
        30.0,
        "WSGATE_TURN_TIMEOUT_S",
        "a durable object's handler running longer is cancelled (its connection gets 1011) "
        "and the object goes on with its next event",
    )
    max_activations: int = setting(
        10_000,
        "WSGATE_MAX_ACTIVATIONS",
        "durable object activations held in memory at most; the least recently used idle "
        "ones are evicted beyond it (their connections stay open)",
    )
    activation_idle_s: float = setting(
        60.0,
        "WSGATE_ACTIVATION_IDLE_S",
        "an activation without events for this long is evicted (hibernation)",
    )
    commit_timeout_s: float = setting(
        30.0,
        "WSGATE_COMMIT_TIMEOUT_S",
        "how long an activation retries committing its turns while the state service "
        "cannot be reached (their events wait, kept alive by progress acks)",
    )
    intake_stall_s: float = setting(
        10.0,
        "WSGATE_INTAKE_STALL_S",
        "/readyz turns 503 when requests wait this long without the worker taking any",
    )
    failpoints: str = setting(
        "",
        "WSGATE_FAILPOINTS",
        "testing only: faults to inject, e.g. kill-after-commit=<message> (worker/failpoints.py)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_port("port (WSGATE_WORKER_PORT)", self.port)
        _check_positive("drain_timeout_s (WSGATE_DRAIN_TIMEOUT_S)", self.drain_timeout_s)
        _check_positive("turn_timeout_s (WSGATE_TURN_TIMEOUT_S)", self.turn_timeout_s)
        _check_positive("activation_idle_s (WSGATE_ACTIVATION_IDLE_S)", self.activation_idle_s)
        _check_positive("commit_timeout_s (WSGATE_COMMIT_TIMEOUT_S)", self.commit_timeout_s)
        _check_positive("intake_stall_s (WSGATE_INTAKE_STALL_S)", self.intake_stall_s)
        if self.max_activations < 1:
            raise ConfigError("max_activations (WSGATE_MAX_ACTIVATIONS) must be >= 1")
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
class StateConfig(BusConfig):
    """The state service: durable objects over gRPC, stored in SQLite (one replica) or in
    PostgreSQL (N replicas, objects placed by rendezvous hashing).

    It is on the bus too: it publishes broadcasts to gateways, hears gateways' presence
    (membership leases) and publishes alarm events to workers.
    """

    host: str = setting("127.0.0.1", "WSGATE_HOST", "address to listen on")
    port: int = setting(DEFAULT_STATE_PORT, "WSGATE_STATE_PORT", "gRPC port (0: any free port)")
    db_path: Path = setting(
        Path("wsgate-state.sqlite3"), "WSGATE_STATE_DB", "the SQLite file (created if missing)"
    )
    dsn: str = setting(
        "",
        "WSGATE_STATE_DSN",
        "PostgreSQL connection string (postgresql://user:pass@host/db): store objects there "
        "and serve as one of N replicas; empty: one replica on the SQLite file",
    )
    migrate: str = setting(
        "auto",
        "WSGATE_STATE_MIGRATE",
        "create or migrate the schema at start: yes, no, or auto (yes on SQLite, no on "
        "PostgreSQL, where `wsgate state migrate` does it)",
    )
    replica_id: str = setting(
        "", "WSGATE_STATE_REPLICA_ID", "this replica's id on the bus (empty: a new random one)"
    )
    advertise: str = setting(
        "",
        "WSGATE_STATE_ADVERTISE",
        "host:port other processes reach this replica's gRPC at (empty: the address bound)",
    )
    replica_timeout_s: float = setting(
        3.0,
        "WSGATE_STATE_REPLICA_TIMEOUT_S",
        "a replica not heard from for this long is dead and its objects move to the others",
    )
    probe_port: int = setting(
        DEFAULT_STATE_PROBE_PORT,
        "WSGATE_STATE_PROBE_PORT",
        "HTTP port of /healthz, /readyz, /metrics (0: any free port)",
    )
    transaction_timeout_s: float = setting(
        10.0,
        "WSGATE_TRANSACTION_TIMEOUT_S",
        "a transaction holding an object longer than this is aborted (its writes dropped)",
    )
    idempotency_retention_s: float = setting(
        3600.0,
        "WSGATE_IDEMPOTENCY_RETENTION_S",
        "how long applied idempotency keys are remembered (above the gateways' delivery timeout)",
    )
    lease_s: float = setting(
        10.0,
        "WSGATE_LEASE_S",
        "how long a worker's lease on a durable object's activation holds without renewal; "
        "a dead worker's objects move to another worker within about this long",
    )
    alarm_timeout_s: float = setting(
        60.0,
        "WSGATE_ALARM_TIMEOUT_S",
        "how long an alarm handler may run before its firing counts as failed and is retried",
    )
    alarm_first_backoff_s: float = setting(
        2.0,
        "WSGATE_ALARM_FIRST_BACKOFF_S",
        "delay before an alarm's first retry; doubles with each retry",
    )
    alarm_max_backoff_s: float = setting(
        60.0, "WSGATE_ALARM_MAX_BACKOFF_S", "the longest delay between two tries of an alarm"
    )
    alarm_max_retries: int = setting(
        6,
        "WSGATE_ALARM_MAX_RETRIES",
        "retries of a failing alarm handler before the alarm is dropped (0: never retried)",
    )
    # Quotas on durable objects and the disk (docs/architecture.md, "Quotas"). Appended
    # last: other settings merge above them.
    max_object_name_bytes: int = setting(
        1024,
        "WSGATE_MAX_OBJECT_NAME_BYTES",
        "longest namespace, and longest name, of a durable object in UTF-8 bytes; calls "
        "naming a longer one are refused (OBJECT_NAME_TOO_LONG)",
    )
    max_keys_per_object: int = setting(
        DEFAULT_MAX_KEYS_PER_OBJECT,
        "WSGATE_MAX_KEYS_PER_OBJECT",
        "keys one durable object may store; a write that would store more is refused "
        "whole (TOO_MANY_OBJECT_KEYS); deletes are always allowed",
    )
    max_object_bytes: int = setting(
        DEFAULT_MAX_OBJECT_BYTES,
        "WSGATE_MAX_OBJECT_BYTES",
        "bytes (keys' UTF-8 plus encoded values) one durable object may store; a write that "
        "would store more is refused whole (OBJECT_TOO_LARGE); deletes are always allowed",
    )
    max_members_per_object: int = setting(
        DEFAULT_MAX_MEMBERS_PER_OBJECT,
        "WSGATE_MAX_MEMBERS_PER_OBJECT",
        "connections one durable object may hold; a join over it is refused "
        "(TOO_MANY_MEMBERS; a durable object route answers the upgrade with 503)",
    )
    min_free_disk_bytes: int = setting(
        DEFAULT_MIN_FREE_DISK_BYTES,
        "WSGATE_MIN_FREE_DISK_BYTES",
        "below this much free space on the SQLite file's filesystem, writes that grow the "
        "data are refused (STORAGE_FULL) and /readyz answers 503 until space returns; "
        "0: off (PostgreSQL: not applied, the disk is the database server's)",
    )

    @property
    def postgres(self) -> bool:
        """Whether the data is in PostgreSQL (``dsn`` set)."""
        return bool(self.dsn)

    @property
    def migrates_at_start(self) -> bool:
        """Whether the state service creates or migrates the schema when it starts."""
        return self.migrate == "yes" or (self.migrate == "auto" and not self.postgres)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_port("port (WSGATE_STATE_PORT)", self.port)
        _check_port("probe_port (WSGATE_STATE_PROBE_PORT)", self.probe_port)
        _check_positive(
            "transaction_timeout_s (WSGATE_TRANSACTION_TIMEOUT_S)", self.transaction_timeout_s
        )
        _check_positive(
            "idempotency_retention_s (WSGATE_IDEMPOTENCY_RETENTION_S)",
            self.idempotency_retention_s,
        )
        _check_positive("lease_s (WSGATE_LEASE_S)", self.lease_s)
        _check_positive(
            "replica_timeout_s (WSGATE_STATE_REPLICA_TIMEOUT_S)", self.replica_timeout_s
        )
        if self.migrate not in ("auto", "yes", "no"):
            raise ConfigError(
                f"migrate (WSGATE_STATE_MIGRATE) must be auto, yes or no, got {self.migrate!r}"
            )
        if (
            self.dsn
            and not self.dsn.startswith(("postgresql://", "postgres://"))
            and ("=" not in self.dsn)
        ):
            raise ConfigError(
                "dsn (WSGATE_STATE_DSN) must be a postgresql:// URL or a libpq key=value string"
            )
        _check_positive("alarm_timeout_s (WSGATE_ALARM_TIMEOUT_S)", self.alarm_timeout_s)
        _check_positive(
            "alarm_first_backoff_s (WSGATE_ALARM_FIRST_BACKOFF_S)", self.alarm_first_backoff_s
        )
        if not self.alarm_max_backoff_s >= self.alarm_first_backoff_s:
            raise ConfigError(
                "alarm_max_backoff_s (WSGATE_ALARM_MAX_BACKOFF_S) must be >= "
                f"alarm_first_backoff_s, got {self.alarm_max_backoff_s}"
            )
        if self.alarm_max_retries < 0:
            raise ConfigError("alarm_max_retries (WSGATE_ALARM_MAX_RETRIES) must be >= 0")
        for name, env in (
            ("max_object_name_bytes", "WSGATE_MAX_OBJECT_NAME_BYTES"),
            ("max_keys_per_object", "WSGATE_MAX_KEYS_PER_OBJECT"),
            ("max_object_bytes", "WSGATE_MAX_OBJECT_BYTES"),
            ("max_members_per_object", "WSGATE_MAX_MEMBERS_PER_OBJECT"),
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} ({env}) must be >= 1, got {getattr(self, name)}")
        if self.min_free_disk_bytes < 0:
            raise ConfigError(
                "min_free_disk_bytes (WSGATE_MIN_FREE_DISK_BYTES) must be >= 0 (0: off), "
                f"got {self.min_free_disk_bytes}"
            )


def _examples_static() -> str:
    """The example app's page (examples/static, next to this package in a checkout and in
    an install), or "" when it is not there."""
    found = Path(__file__).resolve().parent.parent / "examples" / "static"
    return str(found) if (found / "index.html").is_file() else ""


_EXAMPLES_STATIC = _examples_static()


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
    static_dir: str = setting(
        _EXAMPLES_STATIC,
        "WSGATE_STATIC_DIR",
        "the gateway serves this directory's files (/ is index.html; default: the example "
        "chat page); empty: none",
    )

    def __post_init__(self) -> None:
        from wsgate.subjects import validate_prefix

        _check_port("port (WSGATE_GATEWAY_PORT)", self.port)
        if self.static_dir and not Path(self.static_dir).is_dir():
            raise ConfigError(
                f"static_dir (WSGATE_STATIC_DIR) must be a directory, got {self.static_dir!r}"
            )
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
