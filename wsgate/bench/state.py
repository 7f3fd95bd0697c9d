"""``wsgate bench state``: acknowledged durable writes per second through the state
service, beside a naive SQLite baseline measured in the same run on the same file.

Each *cell* is one object spread (one object, or ``objects`` objects written round robin)
times one count of concurrent clients, measured twice, the same way:

- **wsgate**: a state service started as its own process (``wsgate state``, with a
  nats-server it needs), on a SQLite file in a directory on disk. The clients are
  coroutines of this process on uvloop, sharing one :class:`~wsgate.worker.state_client.StateClient`
  as a worker's handlers do; each is a closed loop of ``await storage.put(key, value)``.
  A put resolves once the write is durable (its batch's COMMIT, hence the WAL's fsync,
  returned), and concurrent puts travel and commit together: that is what is measured.
- **naive**: the same number of threads in this process, each with its own ``sqlite3``
  connection to the same file (WAL, ``synchronous=FULL``, a busy timeout), each a closed
  loop of ``BEGIN IMMEDIATE``, the state service's own upsert (:class:`PutKeys`),
  ``COMMIT``: one transaction, one fsync of the WAL, per write. No network and no
  serialization beyond the value's encoding, which makes it a strong baseline: it is
  what an application that writes SQLite directly, without batching, gets.

Both write the same keys (one per client) of the same objects with distinct values
(a 64-character string naming the client and its write's sequence number, encoded as a
``wsgate.v1.Value``), so every write changes a row. Nothing is counted during the warm-up;
then every write acknowledged inside the window counts, and its latency (call to
acknowledgement) goes into a histogram.

Also reported per wsgate cell, measured over the window: writes per ``Write`` call (the
client's coalescing, counted in the client; the service commits the writes of one call in
one transaction, and may join several calls in one, so writes per commit is at least about
this), and the CPU the client (this process) and the state service used, in cores; per
cell, the CPU every other process of the machine used (a busy neighbour lowers both
figures, and the report says so).

With ``--backend postgres`` every cell is measured a third time, first: **PostgreSQL**,
N state replicas (``wsgate state --dsn``) over one PostgreSQL server started in the run
directory (``fsync`` and ``synchronous_commit`` on), the clients sharing one StateClient
that routes each write to its object's owner as a worker does (it hears the replicas'
announcements on the bus). Each replica's ``/metrics`` counters, read before and after
the cell, say how many writes and commits it took: all of a single object's on its
owner, about 1/N each over many objects. Every object is written once through the
replicas before the first cell (see :meth:`RoutedClient.prime`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from wsgate.bench.histogram import LatencyHistogram
from wsgate.bench.machine import machine_cpu_s, tree_cpu_s
from wsgate.bench.processes import ROLE_LOG_LEVEL, BenchError
from wsgate.bench.state_command import StateBenchConfig
from wsgate.config import DEFAULT_PREFIX
from wsgate.errors import StateError, WsgateError
from wsgate.pgserver import PostgresServer, postgres_available, start_postgres
from wsgate.placement import Replica, ReplicaDirectory, ReplicaWatch
from wsgate.procs import Child, python_role_argv, spawn, start_nats_server
from wsgate.stateservice.storage import ObjectId, PutKeys, SqliteConnection
from wsgate.v1 import state_pb2 as pb
from wsgate.values import encode_value
from wsgate.worker.state_client import StateClient

log = logging.getLogger("wsgate.bench")

#: Every object of the benchmark is in this namespace.
NAMESPACE = "bench"
#: Values are strings of this many characters (about as many bytes once encoded).
VALUE_CHARS = 64
#: The targets the report checks (it prints whether they are met; nothing asserts them).
TARGET_WRITES_PER_S = 5000.0
TARGET_RATIO = 5.0
TARGET_CLIENTS = 128
#: Extra time, beyond warm-up and window, for a cell's last writes to be answered.
RESULT_GRACE_S = 30.0
#: The naive connections wait this long for the write lock before a write fails (it is
#: SQLite's answer to concurrent writers: the others sleep and retry).
NAIVE_BUSY_TIMEOUT_MS = 5000
#: File systems that keep files in memory, where fsync costs nothing.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
#: Above this much CPU used by other processes during a window, the report says that the
#: machine was not quiet (its figures are then low, and vary from run to run).
QUIET_OTHER_CORES = 0.2
#: The routing client waits this long for every replica's announcement before measuring.
REPLICAS_HEARD_TIMEOUT_S = 15.0
#: The routing client's view re-checks announcements' timeouts this often (times
#: ANNOUNCE_FRACTION); a worker uses 1 s too.
ROUTING_WATCH_TIMEOUT_S = 1.0
#: A replica's /metrics must answer within this long.
SCRAPE_TIMEOUT_S = 5.0
#: What to install when PostgreSQL is missing.
POSTGRES_MISSING = (
    "--backend postgres needs PostgreSQL's server binaries (initdb, postgres): install "
    "Debian's postgresql package (apt-get install postgresql; scripts/bootstrap test does)"
)


# -- what every writer does the same way ------------------------------------------------------


def object_name(index: int) -> str:
    """The name of the benchmark's object number ``index``."""
    return f"object-{index}"


def key_for(client: int) -> str:
    """The key client number ``client`` writes (in whichever object it writes)."""
    return f"client-{client}"


def value_for(client: int, seq: int) -> str:
    """A value no earlier write of ``client`` stored: :data:`VALUE_CHARS` characters."""
    return f"client {client} write {seq} ".ljust(VALUE_CHARS, ".")


def object_index(client: int, seq: int, clients: int, spread: int) -> int:
    """The object (in ``range(spread)``) that write ``seq`` of ``client`` goes to: round
    robin, offset so that the writes of one round of all clients hit distinct objects
    (when there are that many)."""
    return (client + seq * clients) % spread


class Window:
    """The clock of one cell: a warm-up from ``start_ns`` (``time.monotonic_ns``), then
    the measurement window."""

    def __init__(self, start_ns: int, warmup_s: float, seconds: float) -> None:
        self.measure_from_ns = start_ns + int(warmup_s * 1e9)
        self.measure_until_ns = self.measure_from_ns + int(seconds * 1e9)


class Tally:
    """What one writer (or a group of writers on one thread) counted in a window."""

    def __init__(self) -> None:
        self.histogram = LatencyHistogram()
        self.count = 0
        self.errors = 0
        self.first_error = ""

    def acknowledged(self, window: Window, sent_ns: int, now_ns: int) -> bool:
        """Count a write called at ``sent_ns`` and acknowledged at ``now_ns`` if that was
        inside the window; True while the window is open (write again)."""
        if now_ns >= window.measure_until_ns:
            return False
        if now_ns >= window.measure_from_ns:
            self.count += 1
            self.histogram.record_ns(now_ns - sent_ns)
        return True

    def failed(self, window: Window, error: BaseException, now_ns: int) -> bool:
        """Count a write that failed (never counted as written); True while the window
        is open."""
        self.errors += 1
        if not self.first_error:
            self.first_error = repr(error)
        return now_ns < window.measure_until_ns

    def merge(self, other: Tally) -> None:
        """Add ``other``'s counts to this tally."""
        self.histogram.merge(other.histogram)
        self.count += other.count
        self.errors += other.errors
        self.first_error = self.first_error or other.first_error


# -- figures and report ------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceFigures:
    """What the state service sustained in one cell."""

    writes_per_s: float
    p50_ms: float
    p99_ms: float
    writes: int
    errors: int
    #: Writes per gRPC ``Write`` call in the window, counted in the client (None: no call
    #: was counted, see :class:`WriteCallCounter`).
    writes_per_call: float | None
    #: CPU used over the window, in cores (CPU time over wall time): this process (the
    #: clients and their gRPC threads) and the state service process.
    client_cores: float
    server_cores: float
    #: CPU every other process of the machine used over the window, in cores: the two
    #: measured processes share the cores with it, so figures taken beside a busy
    #: neighbour are low and not comparable.
    other_cores: float
    #: CPU PostgreSQL's processes used over the window, in cores (not in ``other_cores``);
    #: None on SQLite, which runs inside the state service.
    postgres_cores: float | None = None

    def to_json(self) -> dict[str, object]:
        """The figures ``--json`` prints (``postgres_cores`` only over PostgreSQL)."""
        figures: dict[str, object] = {
            "writes_per_s": round(self.writes_per_s, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "writes": self.writes,
            "errors": self.errors,
            "writes_per_call": (
                None if self.writes_per_call is None else round(self.writes_per_call, 2)
            ),
            "client_cores": round(self.client_cores, 2),
            "server_cores": round(self.server_cores, 2),
            "other_cores": round(self.other_cores, 2),
        }
        if self.postgres_cores is not None:
            figures["postgres_cores"] = round(self.postgres_cores, 2)
        return figures


@dataclass(frozen=True)
class ReplicaWrites:
    """What one state replica committed during one cell: the difference of its
    ``wsgate_state_writes_total`` and ``wsgate_state_commits_total`` read just before the
    cell and once its last write was answered (warm-up and window included, so at least
    the writes counted in the window)."""

    replica_id: str
    writes: int
    commits: int

    @property
    def writes_per_commit(self) -> float | None:
        """Its group commit's batching (None: it committed nothing)."""
        return self.writes / self.commits if self.commits else None

    def to_json(self) -> dict[str, object]:
        """The figures ``--json`` prints."""
        return {"replica_id": self.replica_id, "writes": self.writes, "commits": self.commits}


@dataclass(frozen=True)
class ReplicasFigures:
    """What N state replicas over PostgreSQL sustained in one cell, and how its writes
    spread over them. ``service.server_cores`` is the replicas' processes together."""

    service: ServiceFigures
    replicas: tuple[ReplicaWrites, ...]
    #: NOT_OWNER answers the client followed during the cell: 0 when its view of the
    #: owners matched the replicas' own.
    redirects: int

    @property
    def writes_per_s(self) -> float:
        """Acknowledged writes per second in the window."""
        return self.service.writes_per_s

    @property
    def writes_committed(self) -> int:
        """Writes the replicas committed over the whole cell, together."""
        return sum(replica.writes for replica in self.replicas)

    def to_json(self) -> dict[str, object]:
        """The figures ``--json`` prints: the service's, then the spread."""
        return {
            **self.service.to_json(),
            "redirects": self.redirects,
            "writes_committed": self.writes_committed,
            "replicas": [replica.to_json() for replica in self.replicas],
        }


@dataclass(frozen=True)
class NaiveFigures:
    """What the naive baseline sustained in one cell."""

    writes_per_s: float
    p50_ms: float
    p99_ms: float
    writes: int
    errors: int
    #: Transactions committed over the whole cell (warm-up included): one per write, each
    #: ending with a fsync of the WAL (``synchronous=FULL``, checked on every connection).
    commits: int
    #: CPU every process but this one used over the window, in cores (the idle state
    #: service among them).
    other_cores: float

    def to_json(self) -> dict[str, object]:
        """The figures ``--json`` prints."""
        return {
            "writes_per_s": round(self.writes_per_s, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "writes": self.writes,
            "errors": self.errors,
            "commits": self.commits,
            "other_cores": round(self.other_cores, 2),
        }


@dataclass(frozen=True)
class Cell:
    """Both measurements of one object spread and client count."""

    objects: int
    clients: int
    wsgate: ServiceFigures
    naive: NaiveFigures
    #: N state replicas over PostgreSQL (``--backend postgres``), else None.
    postgres: ReplicasFigures | None = None

    @property
    def ratio(self) -> float:
        """wsgate writes/s over naive writes/s at the same spread and concurrency."""
        return self.wsgate.writes_per_s / self.naive.writes_per_s

    @property
    def postgres_ratio(self) -> float | None:
        """PostgreSQL replicas' writes/s over the SQLite service's (None: not measured)."""
        if self.postgres is None:
            return None
        return self.postgres.writes_per_s / self.wsgate.writes_per_s

    @property
    def other_cores(self) -> float:
        """The most CPU other processes used during any of the cell's windows, in cores."""
        measured = [self.wsgate.other_cores, self.naive.other_cores]
        if self.postgres is not None:
            measured.append(self.postgres.service.other_cores)
        return max(measured)


@dataclass(frozen=True)
class StateReport:
    """Every cell of one run."""

    config: StateBenchConfig
    #: The file system type of the directory holding the SQLite file (``ext4``, ...).
    filesystem: str
    cells: tuple[Cell, ...]

    @property
    def max_other_cores(self) -> float:
        """The most CPU other processes used during any window, in cores."""
        return max(cell.other_cores for cell in self.cells)

    @property
    def best_naive_writes_per_s(self) -> float:
        """The naive baseline's best cell: the strictest comparison."""
        return max(cell.naive.writes_per_s for cell in self.cells)

    def target_cell(self) -> Cell | None:
        """The cell the targets are about: one object, :data:`TARGET_CLIENTS` clients."""
        for cell in self.cells:
            if cell.objects == 1 and cell.clients == TARGET_CLIENTS:
                return cell
        return None

    def to_json(self) -> dict[str, object]:
        """The object ``--json`` prints: settings, every cell with both targets' figures
        and their ratio, and the targets (null when their cell was not measured).

        With ``--backend postgres`` also ``backend`` and ``replicas``, and per cell
        ``postgres`` (the replicas' figures and their writes one by one) and
        ``ratio_postgres_vs_sqlite``; a SQLite run prints exactly what it always did."""
        c = self.config
        best = self.best_naive_writes_per_s
        target = self.target_cell()
        cells: list[dict[str, object]] = []
        for cell in self.cells:
            figures: dict[str, object] = {
                "objects": cell.objects,
                "clients": cell.clients,
                "wsgate": cell.wsgate.to_json(),
                "naive": cell.naive.to_json(),
                "ratio": round(cell.ratio, 3),
                "ratio_vs_best_naive": round(cell.wsgate.writes_per_s / best, 3),
            }
            if cell.postgres is not None and cell.postgres_ratio is not None:
                figures["postgres"] = cell.postgres.to_json()
                figures["ratio_postgres_vs_sqlite"] = round(cell.postgres_ratio, 3)
            cells.append(figures)
        backend: dict[str, object] = {}
        if c.backend == "postgres":
            backend = {"backend": c.backend, "replicas": c.postgres_replicas}
        return {
            "seconds": c.seconds,
            "warmup_s": c.warmup_s,
            "value_chars": VALUE_CHARS,
            "filesystem": self.filesystem,
            **backend,
            "cells": cells,
            "best_naive_writes_per_s": round(best, 1),
            "max_other_cores": round(self.max_other_cores, 2),
            "targets": {
                "clients": TARGET_CLIENTS,
                "writes_per_s": TARGET_WRITES_PER_S,
                "ratio": TARGET_RATIO,
                "single_object_writes_per_s": (
                    None if target is None else round(target.wsgate.writes_per_s, 1)
                ),
                "single_object_ratio": None if target is None else round(target.ratio, 3),
                "writes_per_s_met": (
                    None if target is None else target.wsgate.writes_per_s >= TARGET_WRITES_PER_S
                ),
                "ratio_met": None if target is None else target.ratio >= TARGET_RATIO,
            },
        }

    def render(self) -> str:
        """A table for people, then whether the targets are met (with ``--backend
        postgres``, the three targets' table and the writes per replica first)."""
        postgres = self.config.backend == "postgres"
        lines = self._render_postgres() if postgres else self._render_sqlite()
        return "\n".join(lines + self._render_footer())

    def _render_sqlite(self) -> list[str]:
        c = self.config
        return [
            f"wsgate bench state: {c.seconds:g} s per cell after {c.warmup_s:g} s warm-up; "
            f"{VALUE_CHARS}-character values; SQLite WAL, synchronous=FULL, on "
            f"{self.filesystem}",
            f"{'':16}|{'wsgate (state service over gRPC)':^49}|{'naive SQLite':^27}|",
            f"{'objects':>7} {'clients':>7} | {'writes/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'w/call':>7} {'CPU cli+srv':>13} | {'writes/s':>8} {'p50 ms':>7} "
            f"{'p99 ms':>8} | {'ratio':>6}",
            *(
                f"{cell.objects:>7} {cell.clients:>7} | {cell.wsgate.writes_per_s:>9,.0f} "
                f"{cell.wsgate.p50_ms:>7.2f} {cell.wsgate.p99_ms:>7.2f} "
                f"{_per_call(cell.wsgate):>7} "
                f"{cell.wsgate.client_cores:>6.2f}+{cell.wsgate.server_cores:<6.2f} | "
                f"{cell.naive.writes_per_s:>8,.0f} {cell.naive.p50_ms:>7.2f} "
                f"{cell.naive.p99_ms:>8.2f} | {cell.ratio:>5.2f}x"
                for cell in self.cells
            ),
        ]

    def _render_postgres(self) -> list[str]:
        c = self.config
        n = c.postgres_replicas
        group = "{:^26}|"
        lines = [
            f"wsgate bench state: {c.seconds:g} s per cell after {c.warmup_s:g} s warm-up; "
            f"{VALUE_CHARS}-character values; PostgreSQL fsync=on, synchronous_commit=on, "
            f"{n} replica(s); SQLite WAL, synchronous=FULL; all on {self.filesystem}",
            f"{'':16}|"
            + group.format(f"PostgreSQL, {n} replica(s)")
            + group.format("SQLite state service")
            + group.format("naive SQLite")
            + f"{'ratios':^21}",
            f"{'objects':>7} {'clients':>7} |"
            + f" {'writes/s':>8} {'p50 ms':>7} {'p99 ms':>7} |" * 3
            + f" {'pg/sqlite':>9} {'sqlite/naive':>12}",
        ]
        for cell in self.cells:
            p = cell.postgres
            if p is None or cell.postgres_ratio is None:  # not in a postgres run's report
                continue
            row = f"{cell.objects:>7} {cell.clients:>7} |"
            for f in (p.service, cell.wsgate, cell.naive):
                row += f" {f.writes_per_s:>8,.0f} {f.p50_ms:>7.2f} {f.p99_ms:>7.2f} |"
            lines.append(row + f" {cell.postgres_ratio:>8.2f}x {cell.ratio:>11.2f}x")
        lines += [
            "",
            "writes per call and CPU in cores (client + service [+ PostgreSQL]); writes each "
            "replica committed over the cell, warm-up included (share, writes per commit):",
            f"{'objects':>7} {'clients':>7} | {'pg w/call':>9} {'CPU cli+repl+pg':>16} | "
            f"{'sqlite w/call':>13} {'CPU cli+srv':>11} | per replica",
        ]
        for cell in self.cells:
            p = cell.postgres
            if p is None:
                continue
            s, w = p.service, cell.wsgate
            total = p.writes_committed or 1
            spread = "  ".join(
                f"{r.replica_id} {r.writes:,} ({100 * r.writes / total:.0f}%, "
                + ("-" if r.writes_per_commit is None else f"{r.writes_per_commit:.1f}")
                + ")"
                for r in p.replicas
            )
            lines.append(
                f"{cell.objects:>7} {cell.clients:>7} | {_per_call(s):>9} "
                f"{f'{s.client_cores:.2f}+{s.server_cores:.2f}+{s.postgres_cores or 0:.2f}':>16}"
                f" | {_per_call(w):>13} {f'{w.client_cores:.2f}+{w.server_cores:.2f}':>11} | "
                f"{spread}"
            )
        redirects = sum(cell.postgres.redirects for cell in self.cells if cell.postgres)
        lines.append(
            f"the client routed each write to its object's owner (rendezvous hashing over the "
            f"replicas it heard on the bus); NOT_OWNER answers followed: {redirects}"
        )
        return lines

    def _render_footer(self) -> list[str]:
        lines: list[str] = []
        errors = sum(
            cell.wsgate.errors
            + cell.naive.errors
            + (0 if cell.postgres is None else cell.postgres.service.errors)
            for cell in self.cells
        )
        lines.append(
            f"naive: in-process sqlite3, no network; N threads, each its own connection, one "
            f"BEGIN IMMEDIATE/upsert/COMMIT (one WAL fsync) per write; best cell "
            f"{self.best_naive_writes_per_s:,.0f} writes/s. Failed writes (not counted): "
            f"{errors}."
        )
        other = self.max_other_cores
        lines.append(
            f"other processes used at most {other:.2f} core(s) during the windows"
            + ("" if other <= QUIET_OTHER_CORES else ": the machine was NOT quiet, figures are low")
        )
        target = self.target_cell()
        if target is None:
            lines.append(
                f"targets: not checked (they are about one object with {TARGET_CLIENTS} "
                f"clients: add {TARGET_CLIENTS} to --clients)"
            )
        else:
            rate = target.wsgate.writes_per_s
            best_ratio = rate / self.best_naive_writes_per_s
            lines.append(
                f">= {TARGET_WRITES_PER_S:,.0f} writes/s on one object with {TARGET_CLIENTS} "
                f"clients: {_yes(rate >= TARGET_WRITES_PER_S)} ({rate:,.0f})"
            )
            lines.append(
                f">= {TARGET_RATIO:g}x naive (one object, {TARGET_CLIENTS} clients): "
                f"{_yes(target.ratio >= TARGET_RATIO)} ({target.ratio:.2f}x the naive cell at "
                f"the same concurrency; {best_ratio:.2f}x the best naive cell)"
            )
        return lines


def _yes(met: bool) -> str:
    return "yes" if met else "no"


def _per_call(figures: ServiceFigures) -> str:
    return "n/a" if figures.writes_per_call is None else f"{figures.writes_per_call:.1f}"


# -- the run ------------------------------------------------------------------------------------


def run_state(config: StateBenchConfig) -> StateReport:
    """Start nats-server and a state service on a SQLite file under a new temporary
    directory (with ``--backend postgres`` also a PostgreSQL server and N state replicas
    over it, in the same directory), measure every cell (PostgreSQL replicas, then the
    SQLite service, then naive on the same SQLite file), stop every process by PID and
    remove the directory.

    Raises BenchError (at once if PostgreSQL is asked for and not installed); the
    directory (with the processes' logs) is then kept, and the message says where.
    """
    if config.backend == "postgres" and not postgres_available():
        raise BenchError(POSTGRES_MISSING)
    run_dir = make_run_dir(config.data_dir)
    filesystem = filesystem_type(run_dir)
    if filesystem in MEMORY_FILESYSTEMS:
        log.warning(
            "%s is on %s: fsync costs nothing there, so neither figure is a durable "
            "write's; pass --data-dir on a disk",
            run_dir, filesystem,
        )  # fmt: skip
    db_path = run_dir / "state.sqlite3"
    log.info("SQLite file %s (%s)", db_path, filesystem)
    try:
        with running_services(run_dir, db_path, config.postgres_replicas) as services:
            cells = measure_cells(config, services, db_path)
    except (WsgateError, sqlite3.Error, OSError) as exc:
        raise BenchError(f"{exc} (logs kept in {run_dir})") from exc
    shutil.rmtree(run_dir, ignore_errors=True)
    return StateReport(config=config, filesystem=filesystem, cells=tuple(cells))


def make_run_dir(data_dir: Path | None) -> Path:
    """A new directory for one run's SQLite file and logs: inside ``data_dir`` if given,
    else in the system's temporary directory unless that is in memory (tmpfs: fsync would
    cost nothing), else in the current directory."""
    if data_dir is None:
        base = Path(tempfile.gettempdir())
        if filesystem_type(base) in MEMORY_FILESYSTEMS:
            log.info("%s is in memory; the SQLite file goes in the current directory", base)
            base = Path.cwd()
    else:
        base = data_dir
        base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="wsgate-bench-state-", dir=base))


def filesystem_type(path: Path) -> str:
    """The type (``ext4``, ``tmpfs``, ...) of the file system holding ``path``: that of
    the longest mount point above it in ``/proc/self/mounts``; "unknown" off Linux."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        # Blanks and backslashes in mount points are written as octal escapes (\040).
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


@dataclass
class Services:
    """The processes one run started: nats-server, the state service on SQLite, and with
    ``--backend postgres`` a PostgreSQL server and the state replicas over it."""

    nats: Child
    state: Child
    postgres: PostgresServer | None = None
    replicas: list[Child] = field(default_factory=list)


@contextlib.contextmanager
def running_services(run_dir: Path, db_path: Path, replicas: int) -> Iterator[Services]:
    """Start nats-server and ``wsgate state`` on ``db_path``, and if ``replicas`` > 0 a
    PostgreSQL server in ``run_dir/postgres`` and that many ``wsgate state --dsn``
    replicas over it (every port chosen by the kernel), each waited for; stop them all by
    PID on exit, also on failure (the replicas first, nats-server last). Logs go to
    ``run_dir/logs`` (PostgreSQL's to ``run_dir/postgres/postgres.log``)."""
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    handles: list[IO[Any]] = []
    # Whatever was started, in order; stopped in reverse.
    started: list[Child | PostgresServer] = []

    def log_file(name: str) -> IO[Any]:
        handle = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in finally
        handles.append(handle)
        return handle

    try:
        out = log_file("nats")
        nats = start_nats_server(run_dir / "nats", stdout=out, stderr=out)
        started.append(nats)
        nats_url = str(nats.info["url"])
        out = log_file("state")
        # Every port chosen by the kernel, so that runs side by side (or beside a `wsgate
        # dev`) do not collide on a default port.
        argv = python_role_argv(
            "state", "--nats-url", nats_url, "--port", "0", "--probe-port", "0",
            "--db-path", str(db_path), "--log-level", ROLE_LOG_LEVEL,
        )  # fmt: skip
        state = spawn("state", argv, stdout=out, stderr=out)
        started.append(state)
        log.info("state service up: pid %d at %s", state.pid, state.info["address"])
        services = Services(nats=nats, state=state)
        if replicas:
            # In the run directory: on the disk measured, beside the SQLite file.
            # TCP only, as the replicas connect: a Unix socket's path in a deep --data-dir
            # can exceed the 107 bytes PostgreSQL allows, and then it refuses to start.
            postgres = start_postgres(
                run_dir / "postgres", settings={"unix_socket_directories": ""}
            )
            started.append(postgres)
            services.postgres = postgres
            log.info("PostgreSQL up: pid %d at %s", postgres.pid, postgres.dsn)
            for index in range(replicas):
                replica_id = f"replica-{index}"
                out = log_file(replica_id)
                # One after the other: each migrates the schema at start (a no-op after
                # the first) and hears the ones before it when it joins.
                argv = python_role_argv(
                    "state", "--nats-url", nats_url, "--port", "0", "--probe-port", "0",
                    "--dsn", postgres.dsn, "--migrate", "yes", "--replica-id", replica_id,
                    "--log-level", ROLE_LOG_LEVEL,
                )  # fmt: skip
                replica = spawn(replica_id, argv, stdout=out, stderr=out)
                started.append(replica)
                services.replicas.append(replica)
                log.info("%s up: pid %d at %s", replica_id, replica.pid, replica.info["address"])
        yield services
    finally:
        for process in reversed(started):
            process.stop()
        for handle in handles:
            handle.close()


def measure_cells(config: StateBenchConfig, services: Services, db_path: Path) -> list[Cell]:
    """Every cell, in order: for each spread, for each client count, the PostgreSQL
    replicas (if started), the SQLite state service, then naive (back to back, so that
    all see the machine, and the last two the file and its WAL, in the same state)."""
    cells: list[Cell] = []
    state = services.state
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        client = StateClient(str(state.info["address"]))
        runner.run(client.start())
        counter = WriteCallCounter(client)
        routed: RoutedClient | None = None
        try:
            if services.replicas:
                assert services.postgres is not None
                routed = RoutedClient(services.nats, services.replicas, services.postgres)
                runner.run(routed.open())
                runner.run(routed.prime(max(config.spreads)))
            for spread in config.spreads:
                for clients in config.clients:
                    on_postgres = (
                        None if routed is None else routed.measure(runner, spread, clients, config)
                    )
                    service = runner.run(
                        measure_service(client, counter, [state.pid], spread, clients, config)
                    )
                    if routed is None:
                        naive = measure_naive(db_path, spread, clients, config)
                    else:
                        # The routing client's loop must keep running meanwhile: its view
                        # forgets a replica not heard from for 3 s (the announcements'
                        # timeout), and with it that replica's channel.
                        naive = runner.run(
                            asyncio.to_thread(measure_naive, db_path, spread, clients, config)
                        )
                    cell = Cell(
                        objects=spread,
                        clients=clients,
                        wsgate=service,
                        naive=naive,
                        postgres=on_postgres,
                    )
                    log.info(
                        "%d object(s), %d client(s): ratio %.2f; wsgate %s; naive %s",
                        spread, clients, cell.ratio, service.to_json(), naive.to_json(),
                    )  # fmt: skip
                    if on_postgres is not None:
                        log.info(
                            "%d object(s), %d client(s): PostgreSQL/SQLite %.2f; postgres %s",
                            spread, clients, cell.postgres_ratio, on_postgres.to_json(),
                        )  # fmt: skip
                    if cell.other_cores > QUIET_OTHER_CORES:
                        log.warning("other processes are busy: this cell's figures are low")
                    cells.append(cell)
        finally:
            if routed is not None:
                runner.run(routed.close())
            runner.run(client.close())
    return cells


# -- PostgreSQL: N replicas, the client routing by owner -------------------------------------


class RoutedClient:
    """One StateClient over the state replicas, routing each call to its object's owner as
    a worker does: a :class:`ReplicaWatch` on the bus tells it which replicas are alive,
    and rendezvous hashing over them which one owns an object."""

    def __init__(self, nats: Child, replicas: Sequence[Child], postgres: PostgresServer) -> None:
        self._nats_url = str(nats.info["url"])
        self.replicas = list(replicas)
        self.postgres = postgres
        # Until the watch has heard a replica, calls go to this address; none is made then.
        self.client = StateClient(str(replicas[0].info["address"]))
        self._nc: Any = None
        self._watch: ReplicaWatch | None = None
        self.counter: WriteCallCounter | None = None
        #: Every replica was heard: from then on, a change of the view is news.
        self._complete = False

    async def open(self) -> None:
        """Connect to the bus, start the client and its watch, and wait until the watch
        has heard every replica. Raises BenchError if it has not within
        :data:`REPLICAS_HEARD_TIMEOUT_S`, or the bus cannot be reached."""
        import nats
        import nats.errors

        try:
            self._nc = await nats.connect(
                self._nats_url, name="wsgate bench state", connect_timeout=5, allow_reconnect=False
            )
        except (OSError, nats.errors.Error) as exc:
            raise BenchError(f"cannot reach nats-server at {self._nats_url}: {exc!r}") from exc
        await self.client.start()
        self._watch = watch = ReplicaWatch(
            self._nc,
            DEFAULT_PREFIX,
            ReplicaDirectory(),
            timeout_s=ROUTING_WATCH_TIMEOUT_S,
            on_change=self._replicas_changed,
        )
        await watch.start()
        self.client.use_replicas(watch)
        expected = {str(child.info["replica_id"]) for child in self.replicas}
        deadline = time.monotonic() + REPLICAS_HEARD_TIMEOUT_S
        # The replicas announce themselves every quarter of their timeout (3 s): the view
        # is complete within about 0.75 s.
        while {r.replica_id for r in watch.known()} != expected:
            if time.monotonic() > deadline:
                heard = ", ".join(r.replica_id for r in watch.known()) or "none"
                raise BenchError(
                    f"within {REPLICAS_HEARD_TIMEOUT_S:g} s the client heard only replicas "
                    f"{heard} on the bus, expected {', '.join(sorted(expected))}"
                )
            await asyncio.sleep(0.05)
        log.info(
            "client routes over %s",
            ", ".join(f"{r.replica_id} at {r.address}" for r in watch.known()),
        )
        self.counter = WriteCallCounter(self.client)
        self._complete = True

    async def prime(self, objects: int) -> None:
        """Write every one of the first ``objects`` objects once (key ``prime``), not
        measured. The first write a replica admits to an object since the replicas last
        changed reads the object's stored lease first (one more transaction: the object
        may have moved here with a live activation); a worker's objects are past that, and
        so are the cells' once primed. Raises BenchError if a write fails."""
        storages = [self.client.storage(NAMESPACE, object_name(i)) for i in range(objects)]
        try:
            async with asyncio.timeout(RESULT_GRACE_S):
                await asyncio.gather(*(storage.put("prime", "primed") for storage in storages))
        except (StateError, TimeoutError) as exc:
            raise BenchError(f"priming {objects} object(s) on the replicas: {exc!r}") from exc

    def _replicas_changed(self, live: list[Replica]) -> None:
        self.client.replicas_changed(live)
        if self._complete and len(live) != len(self.replicas):
            # Calls then go to another owner and are refused (NOT_OWNER, counted), or wait.
            log.warning(
                "the client's view lost a replica (%s live of %d): figures are disturbed",
                ", ".join(r.replica_id for r in live) or "none", len(self.replicas),
            )  # fmt: skip

    def measure(
        self, runner: asyncio.Runner, spread: int, clients: int, config: StateBenchConfig
    ) -> ReplicasFigures:
        """One cell through the replicas, with each replica's writes and commits over it."""
        assert self.counter is not None, "open() first"
        before = [replica_counters(child) for child in self.replicas]
        redirects = self.client.redirects
        service = runner.run(
            measure_service(
                self.client,
                self.counter,
                [child.pid for child in self.replicas],
                spread,
                clients,
                config,
                postgres_pid=self.postgres.pid,
            )
        )
        after = [replica_counters(child) for child in self.replicas]
        return ReplicasFigures(
            service=service,
            replicas=tuple(
                ReplicaWrites(
                    replica_id=str(child.info["replica_id"]),
                    writes=round(end[0] - start[0]),
                    commits=round(end[1] - start[1]),
                )
                for child, start, end in zip(self.replicas, before, after, strict=True)
            ),
            redirects=self.client.redirects - redirects,
        )

    async def close(self) -> None:
        """Close the client, the watch and the bus connection. Idempotent."""
        await self.client.close()
        if self._watch is not None:
            await self._watch.close()
            self._watch = None
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None


def replica_counters(replica: Child) -> tuple[float, float]:
    """``wsgate_state_writes_total`` and ``wsgate_state_commits_total`` from a replica's
    /metrics (on 127.0.0.1, where the benchmark started it). Raises BenchError if it
    does not answer or lacks either."""
    url = f"http://127.0.0.1:{replica.info['probe_port']}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
            text = response.read().decode()
    except (OSError, urllib.error.URLError) as exc:
        raise BenchError(f"{replica.name}'s metrics at {url}: {exc}") from exc
    values = parse_counters(text, ("wsgate_state_writes_total", "wsgate_state_commits_total"))
    return values[0], values[1]


def parse_counters(text: str, names: Sequence[str]) -> list[float]:
    """The values of the unlabelled samples ``names`` in Prometheus text ``text``, in
    that order. Raises BenchError naming one that is missing."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) >= 2 and fields[0] in names:
            found[fields[0]] = float(fields[1])
    missing = [name for name in names if name not in found]
    if missing:
        raise BenchError(f"metrics without {', '.join(missing)}")
    return [found[name] for name in names]


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    # The roles run on uvloop; so do the clients here, as a worker's handlers would.
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


# -- wsgate: the state service ----------------------------------------------------------------


class WriteCallCounter:
    """Counts the ``Write`` calls a StateClient makes and the writes they carry (how well
    it coalesced), on every channel it uses (a routing client has one per replica), through
    its :attr:`~wsgate.worker.state_client.StateClient.on_write_call` hook. Counting is all
    it adds."""

    def __init__(self, client: StateClient) -> None:
        self.calls = 0
        self.writes = 0
        client.on_write_call = self._count

    def _count(self, request: pb.WriteRequest) -> None:
        self.calls += 1
        self.writes += len(request.writes)


@dataclass(frozen=True)
class _Usage:
    """Counters read at one instant, to subtract."""

    at_ns: int
    machine_cpu_s: float
    client_cpu_s: float
    server_cpu_s: float
    postgres_cpu_s: float
    write_calls: int
    writes_sent: int


def _usage(
    counter: WriteCallCounter | None,
    server_pids: Sequence[int] = (),
    postgres_pid: int | None = None,
) -> _Usage:
    return _Usage(
        at_ns=time.monotonic_ns(),
        machine_cpu_s=machine_cpu_s(),
        client_cpu_s=time.process_time(),
        server_cpu_s=sum(process_cpu_s(pid) for pid in server_pids),
        postgres_cpu_s=0.0 if postgres_pid is None else process_tree_cpu_s(postgres_pid),
        write_calls=0 if counter is None else counter.calls,
        writes_sent=0 if counter is None else counter.writes,
    )


def process_cpu_s(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used, from ``/proc/PID/stat``."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may hold blanks: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def process_tree_cpu_s(root_pid: int) -> float:
    """CPU time (user + system) process ``root_pid`` and every live descendant have used:
    PostgreSQL's postmaster, its background processes and one backend per connection.
    Processes that end meanwhile are missed (the replicas' connections last the run)."""
    return tree_cpu_s(root_pid)


async def _sleep_until(monotonic_ns: int) -> None:
    await asyncio.sleep(max(0.0, (monotonic_ns - time.monotonic_ns()) / 1e9))


async def measure_service(
    client: StateClient,
    counter: WriteCallCounter,
    server_pids: Sequence[int],
    spread: int,
    clients: int,
    config: StateBenchConfig,
    *,
    postgres_pid: int | None = None,
) -> ServiceFigures:
    """Run ``clients`` closed loops of ``put`` through ``client`` over ``spread`` objects
    for the warm-up and the window; ``counter`` counts ``client``'s Write calls, the
    service's CPU is that of ``server_pids`` together and, when ``postgres_pid`` is given,
    PostgreSQL's is that of its process tree. Raises
    BenchError if a writer failed other than with a StateError (counted as a failed write),
    no write was acknowledged in the window, or the writes did not end within the grace
    period."""
    storages = [client.storage(NAMESPACE, object_name(i)) for i in range(spread)]
    window = Window(time.monotonic_ns(), config.warmup_s, config.seconds)
    tally = Tally()
    samples: list[_Usage] = []

    async def writer(index: int) -> None:
        key = key_for(index)
        seq = 0
        while True:
            seq += 1
            storage = storages[object_index(index, seq, clients, spread)]
            sent_ns = time.monotonic_ns()
            try:
                await storage.put(key, value_for(index, seq))
            except StateError as exc:
                if tally.failed(window, exc, time.monotonic_ns()):
                    continue
                return
            if not tally.acknowledged(window, sent_ns, time.monotonic_ns()):
                return

    async def sample_window() -> None:
        await _sleep_until(window.measure_from_ns)
        samples.append(_usage(counter, server_pids, postgres_pid))
        await _sleep_until(window.measure_until_ns)
        samples.append(_usage(counter, server_pids, postgres_pid))

    limit_s = config.warmup_s + config.seconds + RESULT_GRACE_S
    try:
        async with asyncio.timeout(limit_s), asyncio.TaskGroup() as group:
            group.create_task(sample_window())
            for index in range(clients):
                group.create_task(writer(index))
    except TimeoutError as exc:
        raise BenchError(f"the state service's writes did not end within {limit_s:g} s") from exc
    except ExceptionGroup as group:  # a bug, in the client or here: say what it was
        raise BenchError(f"a writer failed: {group.exceptions[0]!r}") from group
    if tally.errors:
        log.warning("%d write(s) failed, e.g. %s", tally.errors, tally.first_error)
    if not tally.count:
        raise BenchError(f"no write acknowledged in the window ({tally.first_error or 'none'})")
    first, last = samples
    wall_s = (last.at_ns - first.at_ns) / 1e9
    calls = last.write_calls - first.write_calls
    if not calls:
        log.warning("no Write call was counted: the client no longer calls its stub's Write?")
    client_cores = (last.client_cpu_s - first.client_cpu_s) / wall_s
    server_cores = (last.server_cpu_s - first.server_cpu_s) / wall_s
    postgres_cores = (last.postgres_cpu_s - first.postgres_cpu_s) / wall_s
    machine_cores = (last.machine_cpu_s - first.machine_cpu_s) / wall_s
    return ServiceFigures(
        writes_per_s=tally.count / config.seconds,
        p50_ms=tally.histogram.percentile_ms(50),
        p99_ms=tally.histogram.percentile_ms(99),
        writes=tally.count,
        errors=tally.errors,
        writes_per_call=(last.writes_sent - first.writes_sent) / calls if calls else None,
        client_cores=client_cores,
        server_cores=server_cores,
        other_cores=max(0.0, machine_cores - client_cores - server_cores - postgres_cores),
        postgres_cores=None if postgres_pid is None else postgres_cores,
    )


# -- naive: one transaction per write ---------------------------------------------------------


def open_naive_connection(db_path: Path) -> SqliteConnection:
    """A connection as the state service opens its own (WAL, ``synchronous=FULL``, a busy
    timeout), with both settings read back: so each COMMIT fsyncs the WAL. Raises
    BenchError if SQLite did not take them."""
    # isolation_level=None: no implicit transactions; the loop issues BEGIN and COMMIT.
    conn = sqlite3.connect(db_path, isolation_level=None, factory=SqliteConnection)
    try:
        conn.execute(f"PRAGMA busy_timeout={NAIVE_BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous=FULL")
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        (synchronous,) = conn.execute("PRAGMA synchronous").fetchone()
        if str(mode).lower() != "wal" or synchronous != 2:  # 2 is FULL
            raise BenchError(
                f"naive connection to {db_path}: journal_mode={mode}, synchronous={synchronous}"
                " (expected wal and 2, FULL)"
            )
    except BaseException:
        conn.close()
        raise
    return conn


def measure_naive(
    db_path: Path, spread: int, clients: int, config: StateBenchConfig
) -> NaiveFigures:
    """Run ``clients`` threads, each its own connection and a closed loop of one-write
    transactions over ``spread`` objects, for the warm-up and the window. Raises
    BenchError if a connection could not be opened, no write committed in the window,
    or the threads did not end within the grace period."""
    objects = [ObjectId(NAMESPACE, object_name(i)) for i in range(spread)]
    tallies = [Tally() for _ in range(clients)]
    commits = [0] * clients
    problems: list[str] = []
    windows: list[Window] = []

    def open_window() -> None:
        # Run by the barrier once every thread has its connection: the clock starts then.
        windows.append(Window(time.monotonic_ns(), config.warmup_s, config.seconds))

    start = threading.Barrier(clients + 1, action=open_window)

    def writer(index: int) -> None:
        try:
            conn = open_naive_connection(db_path)
        except (sqlite3.Error, BenchError) as exc:
            problems.append(f"naive connection {index}: {exc}")
            start.abort()
            return
        try:
            start.wait()
            window, tally = windows[0], tallies[index]
            key = key_for(index).encode()
            seq = 0
            while True:
                seq += 1
                obj = objects[object_index(index, seq, clients, spread)]
                sent_ns = time.monotonic_ns()
                write = PutKeys(obj, ((key, encode_value(value_for(index, seq))),))
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    write(conn)
                    conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    if tally.failed(window, exc, time.monotonic_ns()):
                        continue
                    return
                commits[index] += 1
                if not tally.acknowledged(window, sent_ns, time.monotonic_ns()):
                    return
        except threading.BrokenBarrierError:
            return
        except Exception as exc:  # reported by the parent, which raises BenchError
            problems.append(f"naive writer {index}: {exc!r}")
        finally:
            conn.close()

    threads = [
        threading.Thread(target=writer, args=(i,), name=f"naive-{i}", daemon=True)
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    try:
        start.wait(timeout=RESULT_GRACE_S)
    except threading.BrokenBarrierError:
        for thread in threads:
            thread.join(timeout=RESULT_GRACE_S)
        raise BenchError("; ".join(problems) or "naive writers did not start") from None
    window = windows[0]
    _sleep_until_sync(window.measure_from_ns)
    first = _usage(None)
    _sleep_until_sync(window.measure_until_ns)
    last = _usage(None)
    wall_s = (last.at_ns - first.at_ns) / 1e9
    own_cores = (last.client_cpu_s - first.client_cpu_s) / wall_s
    machine_cores = (last.machine_cpu_s - first.machine_cpu_s) / wall_s
    deadline = time.monotonic() + RESULT_GRACE_S
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            raise BenchError(f"{thread.name} did not end within the grace period")
    if problems:
        raise BenchError("; ".join(problems))
    tally = Tally()
    for each in tallies:
        tally.merge(each)
    if tally.errors:
        log.warning("%d naive write(s) failed, e.g. %s", tally.errors, tally.first_error)
    if not tally.count:
        raise BenchError(f"no naive write committed in the window ({tally.first_error or 'none'})")
    return NaiveFigures(
        writes_per_s=tally.count / config.seconds,
        p50_ms=tally.histogram.percentile_ms(50),
        p99_ms=tally.histogram.percentile_ms(99),
        writes=tally.count,
        errors=tally.errors,
        commits=sum(commits),
        other_cores=max(0.0, machine_cores - own_cores),
    )


def _sleep_until_sync(monotonic_ns: int) -> None:
    time.sleep(max(0.0, (monotonic_ns - time.monotonic_ns()) / 1e9))
