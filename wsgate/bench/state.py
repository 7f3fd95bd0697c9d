"""``wsgate bench state``: acknowledged durable writes per second through the state
service, beside a naive SQLite baseline measured in the same run on the same file.

Each *cell* is one object spread (one object, or ``objects`` objects written round robin)
times one count of concurrent clients, measured twice, the same way:

- **wsgate**: a state service started as its own process (``wsgate state``, with a
  nats-server it needs), on a SQLite file in a directory on disk. The clients are
  coroutines of this process on uvloop, sharing one :class:`~worker.state_client.StateClient`
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from stateservice.storage import ObjectId, PutKeys, SqliteConnection
from worker.state_client import StateClient
from wsgate.bench.histogram import LatencyHistogram
from wsgate.bench.processes import ROLE_LOG_LEVEL, BenchError
from wsgate.bench.state_command import StateBenchConfig
from wsgate.errors import StateError, WsgateError
from wsgate.procs import Child, python_role_argv, spawn, start_nats_server
from wsgate.values import encode_value

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

    def to_json(self) -> dict[str, Any]:
        """The figures ``--json`` prints."""
        return {
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

    def to_json(self) -> dict[str, Any]:
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

    @property
    def ratio(self) -> float:
        """wsgate writes/s over naive writes/s at the same spread and concurrency."""
        return self.wsgate.writes_per_s / self.naive.writes_per_s


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
        return max(max(c.wsgate.other_cores, c.naive.other_cores) for c in self.cells)

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

    def to_json(self) -> dict[str, Any]:
        """The object ``--json`` prints: settings, every cell with both targets' figures
        and their ratio, and the targets (null when their cell was not measured)."""
        c = self.config
        best = self.best_naive_writes_per_s
        target = self.target_cell()
        return {
            "seconds": c.seconds,
            "warmup_s": c.warmup_s,
            "value_chars": VALUE_CHARS,
            "filesystem": self.filesystem,
            "cells": [
                {
                    "objects": cell.objects,
                    "clients": cell.clients,
                    "wsgate": cell.wsgate.to_json(),
                    "naive": cell.naive.to_json(),
                    "ratio": round(cell.ratio, 3),
                    "ratio_vs_best_naive": round(cell.wsgate.writes_per_s / best, 3),
                }
                for cell in self.cells
            ],
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
        """A table for people, then whether the targets are met."""
        c = self.config
        lines = [
            f"wsgate bench state: {c.seconds:g} s per cell after {c.warmup_s:g} s warm-up; "
            f"{VALUE_CHARS}-character values; SQLite WAL, synchronous=FULL, on "
            f"{self.filesystem}",
            f"{'':16}|{'wsgate (state service over gRPC)':^49}|{'naive SQLite':^27}|",
            f"{'objects':>7} {'clients':>7} | {'writes/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'w/call':>7} {'CPU cli+srv':>13} | {'writes/s':>8} {'p50 ms':>7} "
            f"{'p99 ms':>8} | {'ratio':>6}",
        ]
        for cell in self.cells:
            w, n = cell.wsgate, cell.naive
            per_call = "n/a" if w.writes_per_call is None else f"{w.writes_per_call:.1f}"
            lines.append(
                f"{cell.objects:>7} {cell.clients:>7} | {w.writes_per_s:>9,.0f} "
                f"{w.p50_ms:>7.2f} {w.p99_ms:>7.2f} {per_call:>7} "
                f"{w.client_cores:>6.2f}+{w.server_cores:<6.2f} | {n.writes_per_s:>8,.0f} "
                f"{n.p50_ms:>7.2f} {n.p99_ms:>8.2f} | {cell.ratio:>5.2f}x"
            )
        errors = sum(cell.wsgate.errors + cell.naive.errors for cell in self.cells)
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
        return "\n".join(lines)


def _yes(met: bool) -> str:
    return "yes" if met else "no"


# -- the run ------------------------------------------------------------------------------------


def run_state(config: StateBenchConfig) -> StateReport:
    """Start nats-server and a state service on a SQLite file under a new temporary
    directory, measure every cell (wsgate, then naive, on the same file), stop both by
    PID and remove the directory.

    Raises BenchError; the directory (with the processes' logs) is then kept, and the
    message says where.
    """
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
        with running_state_service(run_dir, db_path) as state:
            cells = measure_cells(config, state, db_path)
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


@contextlib.contextmanager
def running_state_service(run_dir: Path, db_path: Path) -> Iterator[Child]:
    """Start nats-server and ``wsgate state`` on ``db_path`` (port chosen by the kernel),
    each waited for; stop them by PID on exit (the service first). Logs go to
    ``run_dir/logs``."""
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    handles: list[IO[Any]] = []
    children: list[Child] = []

    def log_file(name: str) -> IO[Any]:
        handle = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in finally
        handles.append(handle)
        return handle

    try:
        out = log_file("nats")
        nats = start_nats_server(run_dir / "nats", stdout=out, stderr=out)
        children.append(nats)
        out = log_file("state")
        # Every port chosen by the kernel, so that runs side by side (or beside a `wsgate
        # dev`) do not collide on a default port.
        argv = python_role_argv(
            "state", "--nats-url", str(nats.info["url"]), "--port", "0", "--probe-port", "0",
            "--db-path", str(db_path), "--log-level", ROLE_LOG_LEVEL,
        )  # fmt: skip
        state = spawn("state", argv, stdout=out, stderr=out)
        children.append(state)
        log.info("state service up: pid %d at %s", state.pid, state.info["address"])
        yield state
    finally:
        for child in reversed(children):
            child.stop()
        for handle in handles:
            handle.close()


def measure_cells(config: StateBenchConfig, state: Child, db_path: Path) -> list[Cell]:
    """Every cell, in order: for each spread, for each client count, wsgate then naive
    (back to back, so that both see the file, its WAL and the machine in the same state)."""
    cells: list[Cell] = []
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        client = StateClient(str(state.info["address"]))
        runner.run(client.start())
        counter = WriteCallCounter(client)
        try:
            for spread in config.spreads:
                for clients in config.clients:
                    service = runner.run(
                        measure_service(client, counter, state.pid, spread, clients, config)
                    )
                    naive = measure_naive(db_path, spread, clients, config)
                    cell = Cell(objects=spread, clients=clients, wsgate=service, naive=naive)
                    log.info(
                        "%d object(s), %d client(s): ratio %.2f; wsgate %s; naive %s",
                        spread, clients, cell.ratio, service.to_json(), naive.to_json(),
                    )  # fmt: skip
                    if max(service.other_cores, naive.other_cores) > QUIET_OTHER_CORES:
                        log.warning("other processes are busy: this cell's figures are low")
                    cells.append(cell)
        finally:
            runner.run(client.close())
    return cells


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
    """Counts the ``Write`` calls a started StateClient makes and the writes they carry
    (how well it coalesced), by wrapping the ``Write`` method of its State stub: whatever
    kind of call the client makes of it, it goes through the stub. Counting is all the
    wrapper adds."""

    def __init__(self, client: StateClient) -> None:
        self.calls = 0
        self.writes = 0
        stub = client.stub("State")
        original = stub.Write

        def counted_write(request: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self.writes += len(request.writes)
            return original(request, *args, **kwargs)

        stub.Write = counted_write


@dataclass(frozen=True)
class _Usage:
    """Counters read at one instant, to subtract."""

    at_ns: int
    machine_cpu_s: float
    client_cpu_s: float
    server_cpu_s: float
    write_calls: int
    writes_sent: int


def _usage(counter: WriteCallCounter | None, server_pid: int | None) -> _Usage:
    return _Usage(
        at_ns=time.monotonic_ns(),
        machine_cpu_s=machine_cpu_s(),
        client_cpu_s=time.process_time(),
        server_cpu_s=0.0 if server_pid is None else process_cpu_s(server_pid),
        write_calls=0 if counter is None else counter.calls,
        writes_sent=0 if counter is None else counter.writes,
    )


def machine_cpu_s() -> float:
    """CPU time all processes of the machine have used (every state but idle and
    iowait), from the first line of ``/proc/stat``."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    # cpu user nice system idle iowait irq softirq steal ...; guest time is in user.
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used, from ``/proc/PID/stat``."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may hold blanks: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


async def _sleep_until(monotonic_ns: int) -> None:
    await asyncio.sleep(max(0.0, (monotonic_ns - time.monotonic_ns()) / 1e9))


async def measure_service(
    client: StateClient,
    counter: WriteCallCounter,
    server_pid: int,
    spread: int,
    clients: int,
    config: StateBenchConfig,
) -> ServiceFigures:
    """Run ``clients`` closed loops of ``put`` through ``client`` over ``spread`` objects
    for the warm-up and the window; ``counter`` counts ``client``'s Write calls. Raises
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
        samples.append(_usage(counter, server_pid))
        await _sleep_until(window.measure_until_ns)
        samples.append(_usage(counter, server_pid))

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
        other_cores=max(0.0, machine_cores - client_cores - server_cores),
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
    first = _usage(None, None)
    _sleep_until_sync(window.measure_until_ns)
    last = _usage(None, None)
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
