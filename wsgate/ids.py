"""Gateway, worker and connection ids.

A gateway id is ``<node>-<boot>``: the node name (a DNS label such as a pod name, or the
host name) and 8 random characters chosen at each start, so a restarted gateway never
reuses its predecessor's ids. A connection id is ``<gateway_id>_<serial>``, the serial
counting up in base 36. Both are single NATS tokens (``[a-z0-9-]`` and one ``_``), and
a connection id names its gateway, so anyone can address the owning gateway's command
subject without a lookup. A worker id has the gateway id's form; it names the worker's
own subjects, where the events of the durable objects it hosts are sent.

The node part of a gateway or worker id is also the process's identity on NATS: its own
subjects carry it as a token of its own (``wsgate.subjects``), so NATS permissions, which
wildcard whole tokens only, can give each identity its own subjects and nobody else's.
"""

from __future__ import annotations

import functools
import re
import secrets
import socket

from wsgate.errors import ConfigError, InvalidConnectionId

_BOOT_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_NODE_MAX = 40
_BOOT_CHARS = 8
#: The longest gateway or worker id: a node name, "-" and 8 characters.
_ID_MAX = _NODE_MAX + 9
#: The longest connection id: a gateway id, "_" and a serial of up to 13 base-36 digits
#: (2**64 connections). Anything longer is refused before any other look at it.
MAX_CONNECTION_ID_CHARS = _ID_MAX + 1 + 13
# Every pattern here is applied with fullmatch: "$" would also accept a trailing newline.
_NODE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_GATEWAY_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?-[a-z0-9]{8}")
#: The characters of a serial ([0-9a-z]+): a non-empty serial is one if
#: ``serial.strip(_SERIAL_CHARS)`` is empty (strip stops at the first other character from
#: either end). Half the cost of a regular expression's fullmatch, for every event and ack.
_SERIAL_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"


def node_name_from_host(hostname: str | None = None) -> str:
    """A node name made from the host name: lower-cased, other characters as ``-``."""
    name = (hostname if hostname is not None else socket.gethostname()).lower()
    name = re.sub(r"[^a-z0-9-]+", "-", name).strip("-")[:_NODE_MAX].strip("-")
    return name or "gateway"


def validate_node_name(node_name: str) -> str:
    """Check a node name (a DNS label of at most 40 characters); returns it, or raises
    ConfigError naming WSGATE_NODE_NAME."""
    if len(node_name) > _NODE_MAX or not _NODE_NAME.fullmatch(node_name):
        raise ConfigError(
            f"node name (WSGATE_NODE_NAME) {node_name!r} must be 1-{_NODE_MAX} characters of "
            "a-z, 0-9 and '-', not starting or ending with '-'"
        )
    return node_name


def new_gateway_id(node_name: str) -> str:
    """A fresh gateway id for ``node_name``; raises ConfigError for an unusable name."""
    validate_node_name(node_name)
    boot = "".join(secrets.choice(_BOOT_ALPHABET) for _ in range(_BOOT_CHARS))
    return f"{node_name}-{boot}"


def new_worker_id(node_name: str | None = None) -> str:
    """A fresh worker id: ``<node>-<boot>`` as a gateway's (the host name by default), so a
    restarted worker is a new worker: leases it held before are never taken for its own."""
    return new_gateway_id(node_name or node_name_from_host())


def node_of(an_id: str) -> str:
    """The node name a gateway or worker id starts with (its NATS identity): the id
    without its ``-<boot>`` tail. Cheap and unchecked: ``an_id`` must have the id's form
    (check it first where it comes from outside)."""
    return an_id[: -(_BOOT_CHARS + 1)]


def is_worker_id(value: str) -> bool:
    """Whether ``value`` has the form of a worker id (one safe NATS token)."""
    return _valid_gateway_id(value)


def is_gateway_id(value: str) -> bool:
    """Whether ``value`` has the form of a gateway id."""
    return _valid_gateway_id(value)


class ConnectionIds:
    """Hands out connection ids of one gateway: unique, never reused in its lifetime."""

    def __init__(self, gateway_id: str) -> None:
        if not is_gateway_id(gateway_id):
            raise ConfigError(f"not a gateway id: {gateway_id!r}")
        self.gateway_id = gateway_id
        self._serial = 0

    def next(self) -> str:
        """The next connection id."""
        self._serial += 1
        return f"{self.gateway_id}_{_base36(self._serial)}"


def gateway_of(connection_id: str) -> str:
    """The id of the gateway that holds ``connection_id``; raises InvalidConnectionId.

    It runs for every event and every command, so it is cheap: a split at the one ``_``,
    the serial checked, and the gateway id checked through a cache keyed by gateway id
    (a cluster has few). Not a cache keyed by connection id: every connection is new,
    and such a cache grew by about 250 bytes per connection ever seen, up to 16 MiB, in
    every role (the churn soak of the load tests found it).
    """
    if len(connection_id) > MAX_CONNECTION_ID_CHARS:
        raise InvalidConnectionId(f"not a connection id: {connection_id[:120]!r}...")
    gateway, sep, serial = connection_id.rpartition("_")
    if not sep or not serial or serial.strip(_SERIAL_CHARS) or not _valid_gateway_id(gateway):
        raise InvalidConnectionId(f"not a connection id: {connection_id[:120]!r}")
    return gateway


def _valid_gateway_id(value: str) -> bool:
    # The length first: what reaches the cache is at most an id long, so hostile input
    # (a megabyte "id", a thousand times) cannot make the cache hold megabytes.
    return len(value) <= _ID_MAX and _cached_valid_gateway_id(value)


@functools.lru_cache(maxsize=1024)
def _cached_valid_gateway_id(value: str) -> bool:
    # Cached: a cluster has few gateways and workers, and every event and ack asks.
    return _GATEWAY_ID.fullmatch(value) is not None


_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def _base36(n: int) -> str:
    digits = []
    while True:
        n, r = divmod(n, 36)
        digits.append(_BASE36[r])
        if n == 0:
            return "".join(reversed(digits))
