"""The settings of ``wsgate bench echo``, ``idle`` and ``object``: one frozen dataclass
each, checked on construction (ConfigError names the flag)."""

from __future__ import annotations

from dataclasses import dataclass

from wsgate.errors import ConfigError

#: The example app's echo route, served by both the full stack and the baseline.
ECHO_PATH = "/echo"
DEFAULT_APP = "wsgate.examples.app:app"
#: The gateway's default message size limit; larger messages would be refused (1009).
MAX_MESSAGE_BYTES = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class EchoBenchConfig:
    """``wsgate bench echo``: closed-loop echo load on the full path and on the baseline."""

    connections: int = 200
    size_bytes: int = 64
    duration_s: float = 10.0
    warmup_s: float = 2.0
    clients: int = 2
    #: Each round starts both servers afresh and measures them one after the other; the
    #: median round of each is reported, so one unlucky placement of the processes on the
    #: cores does not decide the figures.
    rounds: int = 3

    def __post_init__(self) -> None:
        _check_at_least("--connections", self.connections, 1)
        _check_at_least("--clients", self.clients, 1)
        _check_at_least("--rounds", self.rounds, 1)
        if not 1 <= self.size_bytes <= MAX_MESSAGE_BYTES:
            raise ConfigError(f"--size must be in 1..{MAX_MESSAGE_BYTES}, got {self.size_bytes}")
        if not self.duration_s > 0:
            raise ConfigError(f"--duration-s must be > 0, got {self.duration_s}")
        if not self.warmup_s >= 0:
            raise ConfigError(f"--warmup-s must be >= 0, got {self.warmup_s}")


#: The example app's durable counter; ``<this><name>`` is the object ``name``.
COUNTER_PATH = "/counter/"


@dataclass(frozen=True, kw_only=True)
class ObjectBenchConfig:
    """``wsgate bench object``: the naive counter (get, then put) on one durable object and
    spread over many, through the full path, beside the full path's echo, in one run."""

    #: Connections on the one object (and on the echo route).
    connections: int = 128
    #: Objects of the spread measurement, one connection each.
    objects: int = 1000
    duration_s: float = 10.0
    warmup_s: float = 2.0
    clients: int = 2
    #: As for echo: each round starts everything afresh; the median round is reported.
    rounds: int = 3

    def __post_init__(self) -> None:
        _check_at_least("--connections", self.connections, 1)
        _check_at_least("--objects", self.objects, 1)
        _check_at_least("--clients", self.clients, 1)
        _check_at_least("--rounds", self.rounds, 1)
        if not self.duration_s > 0:
            raise ConfigError(f"--duration-s must be > 0, got {self.duration_s}")
        if not self.warmup_s >= 0:
            raise ConfigError(f"--warmup-s must be >= 0, got {self.warmup_s}")


@dataclass(frozen=True, kw_only=True)
class IdleBenchConfig:
    """``wsgate bench idle``: the gateway's memory per idle connection."""

    connections: int = 5000
    clients: int = 2

    def __post_init__(self) -> None:
        _check_at_least("--connections", self.connections, 1)
        _check_at_least("--clients", self.clients, 1)


def _check_at_least(flag: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(f"{flag} must be >= {minimum}, got {value}")
