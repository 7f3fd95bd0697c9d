"""The command line of ``wsgate bench state``: its options, its settings and its dispatch.

Kept apart from the measurement (:mod:`wsgate.bench.state`), which imports grpc, the
state client and SQLite: ``wsgate`` builds its parser at every start, and only a run of
this benchmark should pay for those imports.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsgate.errors import ConfigError, WsgateError

log = logging.getLogger("wsgate.bench")

__all__ = ["StateBenchConfig", "add_state_parser", "run_state_command"]

DEFAULT_CLIENTS = (1, 16, 128)
#: The backends ``--backend`` takes: the state service on SQLite alone, or also N state
#: replicas over PostgreSQL beside it.
BACKENDS = ("sqlite", "postgres")
#: State replicas over PostgreSQL when ``--backend postgres`` is given without ``--replicas``.
DEFAULT_REPLICAS = 3


@dataclass(frozen=True, kw_only=True)
class StateBenchConfig:
    """``wsgate bench state``: durable writes per second through the state service and
    through a naive SQLite baseline, and with ``backend="postgres"`` also through N state
    replicas over PostgreSQL. Checked on construction (ConfigError names the flag).
    """

    #: Measurement window of each cell (one object spread x one client count x one target).
    seconds: float = 3.0
    #: Load before each window, not counted: the first writes of a cell pay for a new
    #: object's rows, a cold B-tree page or, for the first cell, the gRPC connection.
    warmup_s: float = 1.0
    #: Concurrent writers, one cell per count (each is a coroutine on the service side and
    #: a thread with its own connection on the naive side).
    clients: tuple[int, ...] = DEFAULT_CLIENTS
    #: The spread: every count of clients is measured on one object and on this many.
    objects: int = 1000
    #: Where the SQLite file goes (a temporary directory is made inside it); None: the
    #: system's temporary directory unless it is in memory, else the current directory.
    data_dir: Path | None = None
    #: "sqlite": the state service on SQLite beside the naive baseline (each cell measured
    #: twice). "postgres": also N state replicas over a PostgreSQL started in the run
    #: directory, the client routing each write to its object's owner (three times).
    backend: str = "sqlite"
    #: The number of state replicas over PostgreSQL; None: :data:`DEFAULT_REPLICAS` with
    #: "postgres". Refused with "sqlite" (a single replica by construction).
    replicas: int | None = None

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ConfigError(f"--seconds must be > 0, got {self.seconds}")
        if not self.warmup_s >= 0:
            raise ConfigError(f"--warmup-s must be >= 0, got {self.warmup_s}")
        if not self.clients:
            raise ConfigError("--clients needs at least one count")
        for count in self.clients:
            if count < 1:
                raise ConfigError(f"--clients must all be >= 1, got {count}")
        if self.objects < 1:
            raise ConfigError(f"--objects must be >= 1, got {self.objects}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend}")
        if self.replicas is not None:
            if self.backend != "postgres":
                raise ConfigError(
                    "--replicas is only for --backend postgres (SQLite is one replica)"
                )
            if self.replicas < 1:
                raise ConfigError(f"--replicas must be >= 1, got {self.replicas}")

    @property
    def postgres_replicas(self) -> int:
        """The state replicas to run over PostgreSQL: 0 with "sqlite"."""
        if self.backend != "postgres":
            return 0
        return DEFAULT_REPLICAS if self.replicas is None else self.replicas

    @property
    def spreads(self) -> tuple[int, ...]:
        """The object counts measured: one object, then ``objects`` (once if that is 1)."""
        return (1,) if self.objects == 1 else (1, self.objects)


def add_state_parser(kinds: Any) -> None:
    """Add ``state`` to the ``bench`` subcommands (an ``add_subparsers()`` result)."""
    defaults = StateBenchConfig()
    state = kinds.add_parser(
        "state",
        help="durable writes/s through the state service beside a naive SQLite baseline",
        description="Acknowledged durable writes per second on one object and spread over "
        "many, for each count of concurrent clients, through a state service it starts "
        "(gRPC, group commit) and through a naive in-process baseline on the same SQLite "
        "file (one transaction, one fsync, per write), in the same run; with --backend "
        "postgres, also through N state replicas over a PostgreSQL it starts, the client "
        "routing each write to its object's owner.",
    )
    state.add_argument(
        "--seconds",
        type=float,
        default=defaults.seconds,
        help=f"measurement window of each cell (default: {defaults.seconds:g})",
    )
    state.add_argument(
        "--warmup-s",
        type=float,
        default=defaults.warmup_s,
        help=f"load before each window, not counted (default: {defaults.warmup_s:g})",
    )
    state.add_argument(
        "--clients",
        type=int,
        nargs="+",
        metavar="N",
        default=list(defaults.clients),
        help="concurrent clients, one cell per count "
        f"(default: {' '.join(map(str, defaults.clients))})",
    )
    state.add_argument(
        "--objects",
        type=int,
        default=defaults.objects,
        help="the spread measured beside a single object: writes go round robin over this "
        f"many objects (default: {defaults.objects})",
    )
    state.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="directory for the SQLite file, on the disk to measure (default: the system's "
        "temporary directory unless it is in memory (tmpfs), else the current directory)",
    )
    state.add_argument(
        "--backend",
        choices=BACKENDS,
        default=defaults.backend,
        help="sqlite: the state service on SQLite beside the naive baseline; postgres: also "
        "N state replicas over a PostgreSQL it starts (Debian's postgresql package), "
        f"measured in the same run (default: {defaults.backend})",
    )
    state.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help=f"state replicas over PostgreSQL, only with --backend postgres "
        f"(default: {DEFAULT_REPLICAS})",
    )
    state.add_argument("--json", action="store_true", help="print one JSON object")


def run_state_command(args: argparse.Namespace) -> int:
    """Run ``wsgate bench state`` as ``args`` say and print the report (a table, or one
    JSON object with ``--json``). Returns 0 done, 1 failed (the reason is logged); exits
    with 2 on bad settings."""
    try:
        config = StateBenchConfig(
            seconds=args.seconds,
            warmup_s=args.warmup_s,
            clients=tuple(args.clients),
            objects=args.objects,
            data_dir=args.data_dir,
            backend=args.backend,
            replicas=args.replicas,
        )
    except ConfigError as exc:
        args.bench_parser.exit(2, f"wsgate bench state: {exc}\n")
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)-7s bench %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # grpc logs every event loop it sees at DEBUG; keep it out of the benchmark's log.
    logging.getLogger("grpc").setLevel(logging.INFO)
    from wsgate.bench.state import run_state

    try:
        report = run_state(config)
    except WsgateError as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps(report.to_json()) if args.json else report.render(), flush=True)
    return 0
