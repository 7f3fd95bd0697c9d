"""One frozen configuration dataclass per role.

Every field declares, in its metadata, the environment variable that sets it and a help
text; :mod:`wsgate.cli` turns those into flags (``--nats-url``, ...) whose defaults come
from the environment. The environment is read only there, at the entry point, with one
exception: :class:`JWTConfig` belongs to the app, not to a role, and the app's
``JWTVerifier.from_env()`` reads it when the app is imported (:func:`from_environ`). Units
are in the field names (``_s`` seconds, ``_bytes``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from wsgate.errors import ConfigError

C = TypeVar("C")

DEFAULT_PREFIX = "wsgate"
DEFAULT_APP_NAME = "main"
DEFAULT_GATEWAY_PORT = 8080
DEFAULT_STATE_PORT = 7070
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_APP = "wsgate.examples.app:app"
DEFAULT_WORKER_PORT = 8081
DEFAULT_STATE_PROBE_PORT = 8082
#: The gateway's message size limit unless configured (1 MiB: DESIGN.md).
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
#: The largest message size a gateway may be configured to accept (32 MiB).
MAX_MESSAGE_LIMIT = 32 * 1024 * 1024
#: Per-object quotas (see StateConfig): no cap in normal use, a bound on abuse.
DEFAULT_MAX_KEYS_PER_OBJECT = 10_000_000
DEFAULT_MAX_OBJECT_BYTES = 1024**3
#: DESIGN.md: no cap on members per object below 100,000.
DEFAULT_MAX_MEMBERS_PER_OBJECT = 100_000
DEFAULT_MIN_FREE_DISK_BYTES = 256 * 1024 * 1024


def nkeys_available() -> bool:
    """Whether nats-py can log in with an nkey seed or a .creds file (it needs ``nkeys``)."""
    return importlib.util.find_spec("nkeys") is not None


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
    node_name: str = setting(
        "",
        "WSGATE_NODE_NAME",
        "this process's node name: the first part of a gateway's or worker's id, and its "
        "identity on NATS (its own subjects and request inboxes carry it; the NATS "
        "permissions of its credentials must name it); default: the host name",
    )
    # NATS credentials: one kind at most (a user and password, an nkey seed, or a .creds
    # file); none for a server without authentication (wsgate dev).
    nats_user: str = setting("", "WSGATE_NATS_USER", "NATS user name (with WSGATE_NATS_PASSWORD)")
    nats_password: str = setting(
        "",
        "WSGATE_NATS_PASSWORD",
        "NATS password (set it in the environment, not as a flag: flags show in ps)",
    )
    nats_nkey_seed: str = setting(
        "", "WSGATE_NATS_NKEY_SEED", "path of a file holding this identity's NATS nkey seed"
    )
    nats_creds: str = setting(
        "", "WSGATE_NATS_CREDS", "path of this identity's NATS .creds file (a user JWT and seed)"
    )
    # TLS to NATS: on once a CA or a client certificate is set. The client then starts TLS
    # before NATS says anything (the server needs tls { handshake_first }), so it never
    # speaks plaintext to a server, or a man in the middle, that does not offer TLS.
    nats_tls_ca: str = setting(
        "",
        "WSGATE_NATS_TLS_CA",
        "PEM file of the CA(s) that sign the NATS servers' certificates (turns TLS on; "
        "empty with a client certificate: the system's CAs)",
    )
    nats_tls_cert: str = setting(
        "",
        "WSGATE_NATS_TLS_CERT",
        "PEM client certificate (chain) for NATS (mutual TLS; with WSGATE_NATS_TLS_KEY)",
    )
    nats_tls_key: str = setting(
        "", "WSGATE_NATS_TLS_KEY", "PEM private key of WSGATE_NATS_TLS_CERT"
    )

    def __post_init__(self) -> None:
        # Checked here rather than on use so a bad setting stops the process at start.
        from wsgate.ids import validate_node_name
        from wsgate.subjects import validate_prefix

        validate_prefix(self.prefix)
        if not self.nats_url.strip():
            raise ConfigError("nats_url (WSGATE_NATS_URL) must not be empty")
        if self.node_name:
            validate_node_name(self.node_name)
        self._check_nats_credentials()
        if bool(self.nats_tls_cert) != bool(self.nats_tls_key):
            raise ConfigError(
                "nats_tls_cert (WSGATE_NATS_TLS_CERT) and nats_tls_key (WSGATE_NATS_TLS_KEY) "
                "go together: set both or neither"
            )
        for name, env, path in (
            ("nats_nkey_seed", "WSGATE_NATS_NKEY_SEED", self.nats_nkey_seed),
            ("nats_creds", "WSGATE_NATS_CREDS", self.nats_creds),
            ("nats_tls_ca", "WSGATE_NATS_TLS_CA", self.nats_tls_ca),
            ("nats_tls_cert", "WSGATE_NATS_TLS_CERT", self.nats_tls_cert),
            ("nats_tls_key", "WSGATE_NATS_TLS_KEY", self.nats_tls_key),
        ):
            if path and not Path(path).is_file():
                raise ConfigError(f"{name} ({env}): no such file {path!r}")
        if (self.nats_nkey_seed or self.nats_creds) and not nkeys_available():
            raise ConfigError(
                "WSGATE_NATS_NKEY_SEED and WSGATE_NATS_CREDS need the nkeys package, which "
                "nats-py uses to sign the server's challenge: pip install 'nats-py[nkeys]'"
            )
        # nats-py reads them only when connecting, where some mistakes hang or say nothing.
        if self.nats_nkey_seed:
            from wsgate.nats_credentials import check_seed_file

            check_seed_file(self.nats_nkey_seed, "nats_nkey_seed (WSGATE_NATS_NKEY_SEED)")
        if self.nats_creds:
            from wsgate.nats_credentials import check_creds_file

            check_creds_file(self.nats_creds, "nats_creds (WSGATE_NATS_CREDS)")

    def _check_nats_credentials(self) -> None:
        if bool(self.nats_user) != bool(self.nats_password):
            raise ConfigError(
                "nats_user (WSGATE_NATS_USER) and nats_password (WSGATE_NATS_PASSWORD) go "
                "together: set both or neither"
            )
        in_url = any(urlsplit(u).username is not None for u in self.nats_servers)
        kinds = [
            env
            for env, used in (
                ("WSGATE_NATS_USER/WSGATE_NATS_PASSWORD", bool(self.nats_user)),
                ("WSGATE_NATS_NKEY_SEED", bool(self.nats_nkey_seed)),
                ("WSGATE_NATS_CREDS", bool(self.nats_creds)),
                ("credentials in WSGATE_NATS_URL", in_url),
            )
            if used
        ]
        if len(kinds) > 1:
            raise ConfigError(f"NATS credentials: set one kind at most, got {' and '.join(kinds)}")

    @property
    def nats_servers(self) -> list[str]:
        """``nats_url`` split into the list nats-py takes."""
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]

    @property
    def node(self) -> str:
        """The node name in use: ``node_name``, else one made from the host name."""
        from wsgate.ids import node_name_from_host

        return self.node_name or node_name_from_host()

    @property
    def nats_credentials(self) -> str:
        """Which credentials the NATS connection presents, for messages (no secret)."""
        if self.nats_user:
            return f"the user {self.nats_user!r} (WSGATE_NATS_USER/WSGATE_NATS_PASSWORD)"
        if self.nats_nkey_seed:
            return f"the nkey seed {self.nats_nkey_seed!r} (WSGATE_NATS_NKEY_SEED)"
        if self.nats_creds:
            return f"the .creds file {self.nats_creds!r} (WSGATE_NATS_CREDS)"
        if any(urlsplit(u).username is not None for u in self.nats_servers):
            return "the credentials in WSGATE_NATS_URL"
        return "no credentials"

    @property
    def nats_tls(self) -> bool:
        """Whether NATS is reached over TLS (a CA or a client certificate is set)."""
        return bool(self.nats_tls_ca or self.nats_tls_cert)


@dataclass(frozen=True, kw_only=True)
class GatewayConfig(BusConfig):
    """The gateway: terminates WebSockets, forwards events, applies commands."""

    host: str = setting("127.0.0.1", "WSGATE_HOST", "address to listen on")
    port: int = setting(DEFAULT_GATEWAY_PORT, "WSGATE_GATEWAY_PORT", "HTTP port (0: any free port)")
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
        DEFAULT_MAX_MESSAGE_BYTES,
        "WSGATE_MAX_MESSAGE_BYTES",
        f"largest message a client may send (close 1009 above), at most {MAX_MESSAGE_LIMIT}",
    )
    max_outbound_bytes: int = setting(
        4 * 1024 * 1024,
        "WSGATE_MAX_OUTBOUND_BYTES",
        "bytes waiting to be written to one client; a slower client is closed with 1008",
    )
    outbound_budget_bytes: int = setting(
        256 * 1024 * 1024,
        "WSGATE_OUTBOUND_BUDGET_BYTES",
        "bytes waiting to be written to all clients of this gateway together (at least "
        "WSGATE_MAX_OUTBOUND_BYTES); past it the clients with the most queued are closed "
        "with 1013 and, until they are gone, upgrades get 503 and /readyz 503",
    )
    # Generous enough that no interactive client or closed-loop benchmark of one connection
    # meets it (Autobahn's 1,000-message cases fit in the burst), low enough that one
    # connection cannot take a worker pool's whole capacity.
    message_rate: float = setting(
        1000.0,
        "WSGATE_MESSAGE_RATE",
        "messages per second one client may send on average (a token bucket; auto-responses "
        "count); a message past it closes the connection with 1008 (0: off)",
    )
    message_burst: int = setting(
        1000,
        "WSGATE_MESSAGE_BURST",
        "messages one client may send at once above WSGATE_MESSAGE_RATE (the bucket's size)",
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
    # The edge: TLS, the handshake deadline, connections per client address, proxies
    # (gateway/listener.py). Paths are str for the CLI, as static_dir below.
    tls_cert: str = setting(
        "",
        "WSGATE_TLS_CERT",
        "serve wss (TLS 1.2+) with this PEM certificate chain, leaf first; with "
        "WSGATE_TLS_KEY; reloaded on SIGHUP and when either file changes; empty: plain ws",
    )
    tls_key: str = setting(
        "", "WSGATE_TLS_KEY", "the PEM private key of WSGATE_TLS_CERT (both or neither)"
    )
    tls_watch_interval_s: float = setting(
        5.0,
        "WSGATE_TLS_WATCH_INTERVAL_S",
        "check the certificate and key files for a change this often (a stat of each)",
    )
    handshake_timeout_s: float = setting(
        10.0,
        "WSGATE_HANDSHAKE_TIMEOUT_S",
        "a connection must complete its PROXY header, TLS handshake and request headers "
        "this long after its TCP accept, or it is closed (408 where HTTP can answer)",
    )
    keepalive_timeout_s: float = setting(
        75.0,
        "WSGATE_KEEPALIVE_TIMEOUT_S",
        "close a plain HTTP connection idle (or not done sending its next request) this long "
        "after its last response; keep it above a load balancer's idle timeout",
    )
    max_connections_per_ip: int = setting(
        256,
        "WSGATE_MAX_CONNECTIONS_PER_IP",
        "connections (open WebSockets and handshakes) per client address; more are closed "
        "at accept, or their upgrade gets 429 when a proxy's X-Forwarded-For names the "
        "client (0: no limit)",
    )
    trusted_proxies: str = setting(
        "",
        "WSGATE_TRUSTED_PROXIES",
        "comma-separated CIDRs of proxies allowed to name the client (X-Forwarded-For, "
        "PROXY protocol); empty: none, the TCP peer is the client",
    )
    proxy_protocol: str = setting(
        "off",
        "WSGATE_PROXY_PROTOCOL",
        "on: connections from WSGATE_TRUSTED_PROXIES must start with a PROXY protocol "
        "header (v1 or v2), before TLS; others are served as direct. off: no header",
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
        _check_edge(self)
        if self.static_path is not None and not self.static_path.is_dir():
            raise ConfigError(
                f"static_dir (WSGATE_STATIC_DIR) must be a directory, got {self.static_dir!r}"
            )
        if not 0 < self.presence_interval_s <= MAX_PRESENCE_INTERVAL_S:
            raise ConfigError(
                "presence_interval_s (WSGATE_PRESENCE_INTERVAL_S) must be > 0 and <= "
                f"{MAX_PRESENCE_INTERVAL_S:g}, got {self.presence_interval_s}"
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
        if self.outbound_budget_bytes < self.max_outbound_bytes:
            raise ConfigError(
                "outbound_budget_bytes (WSGATE_OUTBOUND_BUDGET_BYTES) must be >= "
                f"max_outbound_bytes (WSGATE_MAX_OUTBOUND_BYTES) = {self.max_outbound_bytes}, "
                f"got {self.outbound_budget_bytes}"
            )
        if not (math.isfinite(self.message_rate) and self.message_rate >= 0):
            raise ConfigError(
                "message_rate (WSGATE_MESSAGE_RATE) must be a finite number >= 0 (0: off), "
                f"got {self.message_rate}"
            )
        if self.message_burst < 1:
            raise ConfigError(
                f"message_burst (WSGATE_MESSAGE_BURST) must be >= 1, got {self.message_burst}"
            )
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
    def trusted_networks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        """``trusted_proxies`` parsed; a bare address is a network of one. ConfigError
        names an entry that is neither."""
        networks: list[IPv4Network | IPv6Network] = []
        for entry in (e.strip() for e in self.trusted_proxies.split(",")):
            if entry:
                try:
                    networks.append(ip_network(entry, strict=False))
                except ValueError:
                    raise ConfigError(
                        f"trusted_proxies (WSGATE_TRUSTED_PROXIES): {entry!r} is not an IP "
                        "address or CIDR network"
                    ) from None
        return tuple(networks)

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
    # TLS to the state service (wsgate/grpc_tls.py). Paths are str, "" for none, as
    # static_dir: the CLI builds each flag from the field's type.
    state_tls_ca: str = setting(
        "",
        "WSGATE_STATE_TLS_CA",
        "PEM CA certificate(s) that signed the state service's certificate: set, the worker "
        "speaks TLS to it and trusts no other; empty: plaintext",
    )
    state_tls_cert: str = setting(
        "",
        "WSGATE_STATE_TLS_CERT",
        "PEM certificate (chain) this worker presents to the state service (mTLS); needs "
        "state_tls_key and state_tls_ca",
    )
    state_tls_key: str = setting(
        "", "WSGATE_STATE_TLS_KEY", "the unencrypted PEM private key of state_tls_cert"
    )
    state_tls_server_name: str = setting(
        "",
        "WSGATE_STATE_TLS_SERVER_NAME",
        "the name the state service's certificate must carry (e.g. its Service's DNS name), "
        "checked whatever address is dialled (replicas advertise their pod IP); empty: the "
        "host of the address",
    )
    failpoints: str = setting(
        "",
        "WSGATE_FAILPOINTS",
        "testing only: faults to inject, e.g. kill-after-commit=<message> (worker/failpoints.py)",
    )
    # The server API (docs/server-api.md), served by workers on a port of its own.
    api_port: int = setting(
        -1,
        "WSGATE_API_PORT",
        "port of the server API on WSGATE_HOST (docs/server-api.md): -1 off, 0 any free port",
    )
    api_grpc_port: int = setting(
        -1,
        "WSGATE_API_GRPC_PORT",
        "port of the server API over gRPC (proto/wsgate/v1/api.proto): -1 off, 0 any free port",
    )
    api_keys: str = setting(
        "",
        "WSGATE_API_KEYS",
        "comma-separated keys the server API takes as bearer tokens (each at least 16 "
        "characters); a JWT verified with the WSGATE_JWT_* keys and carrying "
        "api_jwt_scope is taken too",
    )
    api_jwt_scope: str = setting(
        "wsgate:api",
        "WSGATE_API_JWT_SCOPE",
        "the scope (in the JWT's space-separated 'scope' claim) the server API requires",
    )
    api_tls_cert: str = setting(
        "", "WSGATE_API_TLS_CERT", "PEM certificate (chain) of the server API: set, it is HTTPS"
    )
    api_tls_key: str = setting("", "WSGATE_API_TLS_KEY", "the PEM private key of api_tls_cert")
    api_max_body_bytes: int = setting(
        1_048_576, "WSGATE_API_MAX_BODY_BYTES", "the largest request body the server API reads"
    )

    @property
    def api_key_list(self) -> tuple[str, ...]:
        """The server API's keys (``api_keys`` split)."""
        return tuple(key.strip() for key in self.api_keys.split(",") if key.strip())

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_port("port (WSGATE_WORKER_PORT)", self.port)
        if self.api_port != -1:
            _check_port("api_port (WSGATE_API_PORT; -1: off)", self.api_port)
        if self.api_grpc_port != -1:
            _check_port("api_grpc_port (WSGATE_API_GRPC_PORT; -1: off)", self.api_grpc_port)
        for key in self.api_key_list:
            if len(key) < MIN_API_KEY_CHARS:
                raise ConfigError(
                    f"api_keys (WSGATE_API_KEYS): a key of {len(key)} characters; "
                    f"each has at least {MIN_API_KEY_CHARS}"
                )
        _check_positive("api_max_body_bytes (WSGATE_API_MAX_BODY_BYTES)", self.api_max_body_bytes)
        _check_pair(
            ("api_tls_cert (WSGATE_API_TLS_CERT)", self.api_tls_cert),
            ("api_tls_key (WSGATE_API_TLS_KEY)", self.api_tls_key),
        )
        _check_files(
            ("api_tls_cert (WSGATE_API_TLS_CERT)", self.api_tls_cert),
            ("api_tls_key (WSGATE_API_TLS_KEY)", self.api_tls_key),
        )
        _check_positive("drain_timeout_s (WSGATE_DRAIN_TIMEOUT_S)", self.drain_timeout_s)
        _check_positive("turn_timeout_s (WSGATE_TURN_TIMEOUT_S)", self.turn_timeout_s)
        _check_positive("activation_idle_s (WSGATE_ACTIVATION_IDLE_S)", self.activation_idle_s)
        _check_positive("commit_timeout_s (WSGATE_COMMIT_TIMEOUT_S)", self.commit_timeout_s)
        _check_positive("intake_stall_s (WSGATE_INTAKE_STALL_S)", self.intake_stall_s)
        if self.max_activations < 1:
            raise ConfigError("max_activations (WSGATE_MAX_ACTIVATIONS) must be >= 1")
        if ":" not in self.app:
            raise ConfigError(f"app (WSGATE_APP) must be module:attribute, got {self.app!r}")
        if not is_host_port(self.state_address):
            raise ConfigError(
                "state_address (WSGATE_STATE_ADDRESS) must be host:port, "
                f"got {self.state_address!r}"
            )
        if self.max_concurrent_events < 1:
            raise ConfigError("max_concurrent_events (WSGATE_MAX_CONCURRENT_EVENTS) must be >= 1")
        _check_positive("state_timeout_s (WSGATE_STATE_TIMEOUT_S)", self.state_timeout_s)
        _check_pair(
            ("state_tls_cert (WSGATE_STATE_TLS_CERT)", self.state_tls_cert),
            ("state_tls_key (WSGATE_STATE_TLS_KEY)", self.state_tls_key),
        )
        for name, value in (
            ("state_tls_cert (WSGATE_STATE_TLS_CERT)", self.state_tls_cert),
            ("state_tls_server_name (WSGATE_STATE_TLS_SERVER_NAME)", self.state_tls_server_name),
        ):
            if value and not self.state_tls_ca:
                raise ConfigError(
                    f"{name} needs state_tls_ca (WSGATE_STATE_TLS_CA): TLS to the state "
                    "service is on only with the CA that signed its certificate"
                )
        _check_files(
            ("state_tls_ca (WSGATE_STATE_TLS_CA)", self.state_tls_ca),
            ("state_tls_cert (WSGATE_STATE_TLS_CERT)", self.state_tls_cert),
            ("state_tls_key (WSGATE_STATE_TLS_KEY)", self.state_tls_key),
        )


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
    # The gRPC port's TLS (wsgate/grpc_tls.py); "" for none. /healthz, /readyz and
    # /metrics stay plain HTTP on probe_port: Kubernetes' probes cannot present certificates.
    tls_cert: str = setting(
        "",
        "WSGATE_TLS_CERT",
        "PEM certificate (chain) of the gRPC port: set (with tls_key), the port speaks TLS "
        "only; empty: plaintext",
    )
    tls_key: str = setting("", "WSGATE_TLS_KEY", "the unencrypted PEM private key of tls_cert")
    tls_client_ca: str = setting(
        "",
        "WSGATE_TLS_CLIENT_CA",
        "PEM CA certificate(s): set, every gRPC client must present a certificate they "
        "signed (mTLS), others are refused at the handshake; empty: any client is served",
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
        if not 0 < self.replica_timeout_s <= MAX_REPLICA_TIMEOUT_S:
            raise ConfigError(
                "replica_timeout_s (WSGATE_STATE_REPLICA_TIMEOUT_S) must be > 0 and <= "
                f"{MAX_REPLICA_TIMEOUT_S:g}, got {self.replica_timeout_s}"
            )
        if self.replica_id and not is_replica_id(self.replica_id):
            raise ConfigError(
                "replica_id (WSGATE_STATE_REPLICA_ID) must be 1-128 letters, digits, '.', "
                f"'_' or '-', starting with a letter or digit, got {self.replica_id!r}"
            )
        if self.advertise and not is_host_port(self.advertise):
            raise ConfigError(
                f"advertise (WSGATE_STATE_ADVERTISE) must be host:port, got {self.advertise!r}"
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
        _check_pair(
            ("tls_cert (WSGATE_TLS_CERT)", self.tls_cert),
            ("tls_key (WSGATE_TLS_KEY)", self.tls_key),
        )
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError(
                "tls_client_ca (WSGATE_TLS_CLIENT_CA) needs tls_cert (WSGATE_TLS_CERT) and "
                "tls_key (WSGATE_TLS_KEY): client certificates are checked only over TLS"
            )
        _check_files(
            ("tls_cert (WSGATE_TLS_CERT)", self.tls_cert),
            ("tls_key (WSGATE_TLS_KEY)", self.tls_key),
            ("tls_client_ca (WSGATE_TLS_CLIENT_CA)", self.tls_client_ca),
        )
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
    """The example app's page (``wsgate/examples/static``, in a checkout and in an
    install), or "" when it is not there."""
    # Resolved: in a checkout wsgate/examples is a link to the top-level examples/.
    found = (Path(__file__).resolve().parent / "examples" / "static").resolve()
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


#: The JWT algorithms the verifier knows; any other (``none`` above all) is refused.
JWT_ALGORITHMS = ("HS256", "RS256", "ES256")
#: The most clock skew a JWT verifier may be configured to forgive (seconds).
MAX_JWT_LEEWAY_S = 300.0


@dataclass(frozen=True, kw_only=True)
class JWTConfig:
    """The app's JWT verifier when it is configured by the environment
    (``worker.JWTVerifier.from_env``): not a role's flags, since the verifier is the app's,
    but the same ``WSGATE_*`` settings, read by :func:`from_environ`."""

    algorithms: str = setting(
        ",".join(JWT_ALGORITHMS),
        "WSGATE_JWT_ALGORITHMS",
        "comma-separated algorithms a token may be signed with, of HS256, RS256, ES256 "
        "(each key is bound to its own: a secret to HS256, an RSA key to RS256, an EC P-256 "
        "key to ES256)",
    )
    secret: str = setting(
        "", "WSGATE_JWT_SECRET", "the HS256 shared secret (at least 32 bytes); empty: none"
    )
    public_key: str = setting(
        "",
        "WSGATE_JWT_PUBLIC_KEY",
        "path of a PEM file of public keys or certificates (RSA: RS256, EC P-256: ES256); "
        "empty: none",
    )
    jwks: str = setting(
        "", "WSGATE_JWT_JWKS", "path of a JWKS file, read again when it changes; empty: none"
    )
    audience: str = setting(
        "",
        "WSGATE_JWT_AUDIENCE",
        "comma-separated audiences; a token's aud must name one (empty: a token with aud "
        "is refused)",
    )
    issuer: str = setting(
        "", "WSGATE_JWT_ISSUER", "comma-separated issuers a token's iss must be one of (empty: any)"
    )
    leeway_s: float = setting(
        30.0,
        "WSGATE_JWT_LEEWAY_S",
        f"clock skew forgiven when checking exp and nbf, 0..{MAX_JWT_LEEWAY_S:g} seconds",
    )
    required_claims: str = setting(
        "exp", "WSGATE_JWT_REQUIRED_CLAIMS", "comma-separated claims every token must carry"
    )

    def __post_init__(self) -> None:
        for algorithm in self.algorithm_list:
            if algorithm not in JWT_ALGORITHMS:
                raise ConfigError(
                    f"algorithms (WSGATE_JWT_ALGORITHMS) may name {', '.join(JWT_ALGORITHMS)}, "
                    f"not {algorithm!r}"
                )
        if not self.algorithm_list:
            raise ConfigError("algorithms (WSGATE_JWT_ALGORITHMS) must name at least one")
        if not 0 <= self.leeway_s <= MAX_JWT_LEEWAY_S:
            raise ConfigError(
                f"leeway_s (WSGATE_JWT_LEEWAY_S) must be in 0..{MAX_JWT_LEEWAY_S:g}, "
                f"got {self.leeway_s}"
            )
        if not self.has_key:
            raise ConfigError(
                "a JWT verifier needs a key: set WSGATE_JWT_SECRET, WSGATE_JWT_PUBLIC_KEY "
                "or WSGATE_JWT_JWKS"
            )
        for name, path in (("public_key", self.public_key), ("jwks", self.jwks)):
            if path and not Path(path).is_file():
                variable = "WSGATE_JWT_PUBLIC_KEY" if name == "public_key" else "WSGATE_JWT_JWKS"
                raise ConfigError(f"{name} ({variable}) must be a file, got {path!r}")

    @property
    def has_key(self) -> bool:
        """Whether a key source is set."""
        return bool(self.secret or self.public_key or self.jwks)

    @property
    def algorithm_list(self) -> tuple[str, ...]:
        return _split(self.algorithms)

    @property
    def audience_list(self) -> tuple[str, ...]:
        return _split(self.audience)

    @property
    def issuer_list(self) -> tuple[str, ...]:
        return _split(self.issuer)

    @property
    def required_claim_list(self) -> tuple[str, ...]:
        return _split(self.required_claims)


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def from_environ(config_type: type[C], environ: Mapping[str, str]) -> C:
    """``config_type`` with each field set from its ``WSGATE_*`` variable in ``environ``
    when present (else its default), converted to the default's type. Raises ConfigError
    naming the variable for a value that does not convert, or whatever the config's own
    checks raise."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(config_type):  # type: ignore[arg-type]
        variable = f.metadata["env"]
        if variable not in environ:
            continue
        kind: Callable[[str], Any] = type(f.default)
        try:
            values[f.name] = kind(environ[variable])
        except ValueError:
            raise ConfigError(
                f"{f.name} ({variable}) must be a {kind.__name__}, got {environ[variable]!r}"
            ) from None
    return config_type(**values)


#: The longest presence interval: its lease (5 intervals) is an hour, the longest a state
#: service takes (wsgate.envelopes.MAX_PRESENCE_LEASE_MS).
MAX_PRESENCE_INTERVAL_S = 720.0
#: The longest replica timeout a replica may announce (wsgate.envelopes.MAX_REPLICA_TIMEOUT_MS).
MAX_REPLICA_TIMEOUT_S = 600.0

#: Applied with fullmatch: "$" would also accept a trailing newline.
_REPLICA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def is_replica_id(value: str) -> bool:
    """Whether ``value`` may name a state replica (a pod name fits)."""
    return _REPLICA_ID.fullmatch(value) is not None


#: Applied with fullmatch: "$" would also accept a trailing newline.
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^:\s]+):\d{1,5}")


def is_host_port(value: str) -> bool:
    """Whether ``value`` is ``host:port`` (an IPv6 host in brackets), the form of a gRPC
    address that workers and replicas take."""
    return _HOST_PORT.fullmatch(value) is not None


def _check_edge(config: GatewayConfig) -> None:
    """The gateway's TLS, handshake, per-address and proxy settings."""
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("WSGATE_TLS_CERT and WSGATE_TLS_KEY must be set together (or neither)")
    for name, path in (
        ("tls_cert (WSGATE_TLS_CERT)", config.tls_cert),
        ("tls_key (WSGATE_TLS_KEY)", config.tls_key),
    ):
        if path and not Path(path).is_file():
            raise ConfigError(f"{name} must be a file, got {path!r}")
    _check_positive(
        "tls_watch_interval_s (WSGATE_TLS_WATCH_INTERVAL_S)", config.tls_watch_interval_s
    )
    _check_positive("handshake_timeout_s (WSGATE_HANDSHAKE_TIMEOUT_S)", config.handshake_timeout_s)
    _check_positive("keepalive_timeout_s (WSGATE_KEEPALIVE_TIMEOUT_S)", config.keepalive_timeout_s)
    if config.max_connections_per_ip < 0:
        raise ConfigError("max_connections_per_ip (WSGATE_MAX_CONNECTIONS_PER_IP) must be >= 0")
    trusted = config.trusted_networks
    if config.proxy_protocol not in ("off", "on"):
        raise ConfigError(
            "proxy_protocol (WSGATE_PROXY_PROTOCOL) must be off or on, "
            f"got {config.proxy_protocol!r}"
        )
    if config.proxy_protocol == "on" and not trusted:
        raise ConfigError(
            "WSGATE_PROXY_PROTOCOL=on needs WSGATE_TRUSTED_PROXIES: only trusted proxies may "
            "send a PROXY header"
        )


#: The shortest server API key taken (a guessable key is no key).
MIN_API_KEY_CHARS = 16


def _check_port(name: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name} must be in 0..65535, got {port}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _check_pair(first: tuple[str, str], second: tuple[str, str]) -> None:
    """Two settings that are given together or not at all (a certificate and its key)."""
    if bool(first[1]) != bool(second[1]):
        raise ConfigError(f"{first[0]} and {second[0]} are set together or not at all")


def _check_files(*settings: tuple[str, str]) -> None:
    """Each setting that names a file (non-empty) names one that exists."""
    for name, value in settings:
        if value and not Path(value).is_file():
            raise ConfigError(f"{name} must be a file, got {value!r}")


def env_variables(config_type: type) -> dict[str, str]:
    """Map each field of ``config_type`` to the environment variable that sets it."""
    return {f.name: f.metadata["env"] for f in dataclasses.fields(config_type)}
