"""A throwaway PostgreSQL server from Debian's packages, for tests and benchmarks.

``scripts/bootstrap test`` installs the ``postgresql`` package; this module finds its
binaries (``initdb``, ``postgres``) on PATH or under ``/usr/lib/postgresql/<version>/bin``,
makes a cluster in a directory of its own and runs it on a free loopback port, with the
durability of a production server (``fsync`` and ``synchronous_commit`` on). PostgreSQL
refuses to run as root, so under root the cluster belongs to the ``postgres`` user that the
package creates, and the server runs as that user.

::

    with start_postgres(tmp_path) as pg:
        dsn = pg.new_database_schema("t1")   # a DSN whose tables live in schema t1
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from wsgate.errors import WsgateError


class PostgresUnavailable(WsgateError, RuntimeError):
    """PostgreSQL's binaries are not installed, or the server did not start."""


def find_pg_bin(name: str) -> Path:
    """The path of PostgreSQL's ``name`` binary (newest version first); raises
    PostgresUnavailable if it is not installed."""
    found = shutil.which(name)
    if found:
        return Path(found)
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for bin_dir in versions:
        if (bin_dir / name).exists():
            return bin_dir / name
    raise PostgresUnavailable(
        f"PostgreSQL's {name} was not found: install Debian's postgresql package "
        "(scripts/bootstrap test does)"
    )


def postgres_available() -> bool:
    """Whether PostgreSQL's binaries are installed."""
    try:
        find_pg_bin("initdb")
        find_pg_bin("postgres")
    except PostgresUnavailable:
        return False
    return True


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    """A running PostgreSQL server; :meth:`stop` ends it (by its PID)."""

    process: subprocess.Popen[bytes]
    host: str
    port: int
    data_dir: Path
    log_file: Path
    user: str = "postgres"
    _schemas: set[str] = field(default_factory=set)

    @property
    def pid(self) -> int:
        """The postmaster's PID."""
        return self.process.pid

    @property
    def dsn(self) -> str:
        """A DSN of the server's ``postgres`` database."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/postgres"

    def dsn_for_schema(self, schema: str) -> str:
        """A DSN whose tables live in ``schema`` (its search_path)."""
        return f"{self.dsn}?options=-csearch_path%3D{schema}"

    def new_database_schema(self, schema: str) -> str:
        """Create ``schema`` (dropping an older one of that name) and return its DSN: each
        test gets empty tables without the cost of a database of its own."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            conn.execute(f'CREATE SCHEMA "{schema}"')
        self._schemas.add(schema)
        return self.dsn_for_schema(schema)

    def stop(self, timeout_s: float = 30.0) -> int:
        """Fast shutdown (SIGINT: transactions rolled back, then a clean stop); SIGKILL if
        it does not end in ``timeout_s``. Idempotent; returns the exit status."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _as_postgres_user() -> tuple[int, int] | None:
    """(uid, gid) to run the server as when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError as exc:
        raise PostgresUnavailable(
            "running as root and there is no postgres user to run PostgreSQL as"
        ) from exc
    return entry.pw_uid, entry.pw_gid


def start_postgres(
    work_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ready_timeout_s: float = 60.0,
    settings: dict[str, str] | None = None,
) -> PostgresServer:
    """Make a cluster in ``work_dir`` and start PostgreSQL on ``host:port`` (0: a free
    port); returns once it accepts connections. Raises PostgresUnavailable."""
    initdb = find_pg_bin("initdb")
    postgres = find_pg_bin("postgres")
    owner = _as_postgres_user()
    work_dir.mkdir(parents=True, exist_ok=True)
    data_dir = work_dir / "pgdata"
    log_file = work_dir / "postgres.log"
    if owner is not None:
        os.chown(work_dir, *owner)
        # Reachable by the postgres user: every directory above must be searchable.
        for parent in work_dir.parents:
            with contextlib.suppress(OSError):
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)

    def demote() -> None:  # pragma: no cover - runs in the child between fork and exec
        if owner is not None:
            os.setgid(owner[1])
            os.setgroups([owner[1]])
            os.setuid(owner[0])

    if not (data_dir / "PG_VERSION").exists():
        done = subprocess.run(
            [
                str(initdb),
                "-D",
                str(data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            preexec_fn=demote,
            check=False,
        )
        if done.returncode != 0:
            raise PostgresUnavailable(
                f"initdb failed ({done.returncode}): {done.stderr.decode(errors='replace')}"
            )
    port = port or _free_port(host)
    options = {
        "listen_addresses": host,
        "port": str(port),
        # TCP only: a socket path under a deep directory (a test's tmp_path) would pass
        # the 107-byte limit of Unix socket names, and nothing here uses one.
        "unix_socket_directories": "",
        "max_connections": "200",
        "fsync": "on",
        "synchronous_commit": "on",
        **(settings or {}),
    }
    argv = [str(postgres), "-D", str(data_dir)]
    for key, value in options.items():
        argv += ["-c", f"{key}={value}"]
    log = log_file.open("ab")
    if owner is not None:
        os.chown(log_file, *owner)
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        preexec_fn=demote,
        process_group=0,
    )
    log.close()
    server = PostgresServer(process, host, port, data_dir, log_file)
    try:
        _wait_ready(server, ready_timeout_s)
    except BaseException:
        server.stop(timeout_s=5)
        raise
    return server


def _wait_ready(server: PostgresServer, timeout_s: float) -> None:
    import psycopg

    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        if server.process.poll() is not None:
            raise PostgresUnavailable(
                f"postgres exited with {server.process.returncode}: "
                f"{server.log_file.read_text(errors='replace')[-2000:]}"
            )
        try:
            with psycopg.connect(server.dsn, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            # Starting up: its readiness has no signal but accepting a connection.
            if time.monotonic() > deadline:
                raise PostgresUnavailable(
                    f"postgres did not accept connections within {timeout_s:g} s"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


@contextlib.contextmanager
def running_postgres(work_dir: Path, **kwargs: object) -> Iterator[PostgresServer]:
    """:func:`start_postgres`, stopped at the end of the ``with``."""
    server = start_postgres(work_dir, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()
