"""Administrative actions on the state service's database: ``wsgate state migrate``,
``wsgate state backup PATH`` and ``wsgate state restore PATH``.

Each action is a plain blocking function that returns a report (its ``str`` is what the
command prints) or raises :class:`AdminError`, whose message is one line and whose
``exit_code`` is what the command exits with: :data:`EXIT_REFUSED` (2) when the request
itself cannot be done (a backup of PostgreSQL, a PATH that exists without ``--force``),
:data:`EXIT_FAILED` (1) when the database or a file is not what it must be (unreachable,
schema too new, not a wsgate database, in use).

- :func:`migrate` creates or migrates the schema of the configured database, SQLite file
  or PostgreSQL, to :data:`~wsgate.stateservice.schema.LATEST_VERSION`. It may run while state
  services serve (SQLite's write lock, PostgreSQL's advisory lock serialize it).
- :func:`backup` writes an online snapshot of the SQLite file with SQLite's backup API,
  while the state service keeps writing: the snapshot is the database as of one commit.
- :func:`restore` puts a snapshot in place of the SQLite file, atomically, and refuses
  while anything has the file open (see :func:`_take_over`).

PostgreSQL is backed up with ``pg_dump`` or the provider's point-in-time recovery, never
here: a snapshot of one replica's view would not be one of the database.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from wsgate.clock import now_ms
from wsgate.config import StateConfig
from wsgate.errors import SchemaTooNew, WsgateError
from wsgate.stateservice import schema
from wsgate.stateservice.storage import PgConnection, PostgresStorage

#: Exit status of a request that cannot be done as asked (nothing was touched).
EXIT_REFUSED = 2
#: Exit status of an action that failed on the database or a file (nothing was replaced).
EXIT_FAILED = 1

#: How long restore waits for the current file's exclusive lock. A state service holds its
#: shared lock for as long as it runs, so waiting longer would not help; a second rides out
#: a passing reader (a backup that is finishing).
IN_USE_WAIT_S = 1.0

#: How long migrate and backup wait behind the state service's write or checkpoint.
BUSY_WAIT_S = 5.0

POSTGRES_BACKUP_HINT = (
    "the state store is PostgreSQL (--dsn): back it up with pg_dump or your provider's "
    "point-in-time recovery; `wsgate state backup` and `restore` are for the SQLite file"
)

#: What SQLite keeps beside a database file; stale ones must never meet another file.
_SIDECARS = ("-wal", "-shm", "-journal")


class AdminError(WsgateError):
    """An administrative action was refused or failed; the message is one line."""

    def __init__(self, message: str, *, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(" ".join(message.split()))
        self.exit_code = exit_code


@dataclass(frozen=True)
class MigrateReport:
    """What :func:`migrate` did: the schema version found and the one left."""

    database: str
    before: int
    after: int

    def __str__(self) -> str:
        if self.before == self.after:
            return f"{self.database}: schema already at version {self.after}"
        return f"{self.database}: schema migrated from version {self.before} to {self.after}"


@dataclass(frozen=True)
class BackupReport:
    """What :func:`backup` wrote."""

    database: Path
    target: Path
    version: int
    size_bytes: int

    def __str__(self) -> str:
        return (
            f"backed up {self.database} to {self.target} "
            f"(schema version {self.version}, {self.size_bytes} bytes)"
        )


@dataclass(frozen=True)
class RestoreReport:
    """What :func:`restore` put in place."""

    source: Path
    database: Path
    version: int

    def __str__(self) -> str:
        return f"restored {self.database} from {self.source} (schema version {self.version})"


# -- migrate ------------------------------------------------------------------------------


def migrate(config: StateConfig) -> MigrateReport:
    """Create or migrate the schema of ``config``'s database (PostgreSQL when it has a DSN,
    else the SQLite file, created with its directory if missing) to the latest version.

    Raises AdminError (exit 1) when the database cannot be reached or opened, or its
    schema is newer than this code (SchemaTooNew); nothing is changed then.
    """
    if config.postgres:
        return migrate_postgres(config.dsn)
    return migrate_sqlite(config.db_path)


def migrate_sqlite(path: Path) -> MigrateReport:
    """:func:`migrate` on a SQLite file."""
    with _failures(f"cannot migrate {path}"):
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_WAIT_S)
        try:
            # As the state service opens it: WAL (persistent in the file), fsync per commit.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            return _migrate_in_transaction(conn, "sqlite", str(path))
        finally:
            conn.close()


def migrate_postgres(dsn: str) -> MigrateReport:
    """:func:`migrate` on the PostgreSQL database (and schema) ``dsn`` names."""
    label = PostgresStorage(dsn).label  # never the password
    with _failures(f"cannot migrate {label}"):
        raw = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
        try:
            conn = PgConnection(raw)
            conn.execute("BEGIN")
            return _migrate_in_transaction(conn, "postgres", label)
        finally:
            raw.close()


def _migrate_in_transaction(conn: schema.SqlRunner, dialect: str, label: str) -> MigrateReport:
    """Migrate inside the open transaction and commit it; roll back on any failure."""
    try:
        applied = schema.migrate(conn, dialect, now_ms())
        after = schema.current_version(conn)
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(Exception):
            conn.execute("ROLLBACK")
        raise
    # schema.migrate applies every version above the one it found, in order: the one it
    # found is the last version below the first it applied.
    before = (
        max((m.version for m in schema.MIGRATIONS if m.version < applied[0]), default=0)
        if applied
        else after
    )
    return MigrateReport(label, before, after)


# -- backup -------------------------------------------------------------------------------


def backup(config: StateConfig, target: Path, *, force: bool = False) -> BackupReport:
    """Write a snapshot of ``config``'s SQLite file to ``target``, online: the state service
    may be running and writing.

    The snapshot is the database as of one commit (every write acknowledged before the
    backup began is in it), one self-contained file (rollback journal mode, no ``-wal``),
    checked by ``PRAGMA integrity_check`` and for a wsgate schema before it appears at
    ``target``: it is written beside ``target``, fsynced, then renamed to it, so a failed
    or interrupted backup leaves no partial file there.

    Raises AdminError: exit 2 if the store is PostgreSQL (see :data:`POSTGRES_BACKUP_HINT`)
    or ``target`` exists and ``force`` is false (even if it appears during the backup);
    exit 1 if the database is missing or not a wsgate database, or writing fails.
    """
    if config.postgres:
        raise AdminError(POSTGRES_BACKUP_HINT, exit_code=EXIT_REFUSED)
    database = config.db_path
    if target.exists() and not force:
        raise AdminError(f"{target} exists; pass --force to replace it", exit_code=EXIT_REFUSED)
    if not database.is_file():
        raise AdminError(f"no database at {database}")
    if target.exists() and target.resolve() == database.resolve():
        raise AdminError(f"{target} is the database itself", exit_code=EXIT_REFUSED)
    with _failures(f"cannot back up {database} to {target}"):
        # mode=rw: never create an empty database where the file was expected.
        source = _connect(database, "rw")
        try:
            with _temp_beside(target, ".partial") as temp:
                version = _copy_database(source, temp, what=f"the snapshot of {database}")
                _publish(temp, target, replace=force)
        finally:
            source.close()
        _fsync_dir(target.parent)
        return BackupReport(database, target, version, target.stat().st_size)


# -- restore ------------------------------------------------------------------------------


def restore(config: StateConfig, source: Path) -> RestoreReport:
    """Put the SQLite database ``source`` (a :func:`backup` snapshot, or any SQLite file
    with a wsgate schema no newer than this code's) in place of ``config``'s SQLite file.

    ``source`` is checked first (``integrity_check``, schema version) and copied, through
    SQLite, into a temporary file beside the database, which is fsynced; then, if nothing
    has the current file open, its ``-wal`` is folded into it and removed with the other
    sidecars, and the copy is renamed over it. A crash at any point leaves either the old
    database or the restored one, never one with the other's WAL. ``source`` is only read.

    Raises AdminError: exit 2 if the store is PostgreSQL or ``source`` is the database
    itself; exit 1 if ``source`` is not a wsgate SQLite database, the current file is in
    use (a state service runs on it: stop it first) or not a SQLite database, or writing
    fails. The current file is then untouched.

    Nothing stops a state service from being started in the instant between the check and
    the rename: keep it stopped until restore has returned.
    """
    if config.postgres:
        raise AdminError(POSTGRES_BACKUP_HINT, exit_code=EXIT_REFUSED)
    database = config.db_path
    if not source.is_file():
        raise AdminError(f"{source} is not a file")
    if database.exists() and source.resolve() == database.resolve():
        raise AdminError(f"{source} is the database itself", exit_code=EXIT_REFUSED)
    with _failures(f"cannot restore {database} from {source}"):
        # mode=ro: a restore never changes its source.
        reader = _connect(source, "ro")
        try:
            _check_wsgate_database(reader, str(source))
            database.parent.mkdir(parents=True, exist_ok=True)
            with _temp_beside(database, ".restore") as temp:
                # Before the copy, whose fsync then makes the mode and owner durable too.
                _copy_owner_and_mode(database, temp)
                version = _copy_database(reader, temp, what=f"the copy of {source}")
                _take_over(database)
                os.replace(temp, database)
        finally:
            reader.close()
        _fsync_dir(database.parent)
        return RestoreReport(source, database, version)


def _take_over(database: Path) -> None:
    """Make sure nothing has ``database`` open, fold its WAL into it, and remove its
    sidecar files, so that another file renamed to its name is read as it is.

    "In use" is detected with SQLite's own locks: every connection to a WAL database
    (a state service, idle or not, or a backup) holds a shared lock on the file for as
    long as it is open. ``BEGIN EXCLUSIVE`` alone would not see them (in WAL mode it only
    excludes writers), but in ``locking_mode=EXCLUSIVE`` SQLite must take the file's
    exclusive lock before it reads the database, which it gets only when no other
    connection has the file open. Raises AdminError (exit 1) if it is in use, or is not
    a SQLite database.
    """
    if not database.exists():
        # Sidecars of a file that is gone would be read as the new file's (a WAL applied
        # to another database corrupts it).
        for sidecar in _SIDECARS:
            _sidecar(database, sidecar).unlink(missing_ok=True)
        return
    conn = _connect(database, "rw", timeout=IN_USE_WAIT_S)
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        try:
            conn.execute("BEGIN EXCLUSIVE")
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise AdminError(
                    f"{database} is in use (a state service or a backup has it open): "
                    "stop the state service, then restore"
                ) from exc
            raise
        except sqlite3.DatabaseError as exc:
            raise AdminError(
                f"{database} is not a SQLite database ({exc}): move it away, then restore"
            ) from exc
        # Rollback journal mode checkpoints the whole WAL into the file and deletes it:
        # the old file is then complete on its own, whatever happens next.
        (mode,) = conn.execute("PRAGMA journal_mode=DELETE").fetchone()
        if str(mode).lower() != "delete":
            raise AdminError(f"{database}: SQLite kept journal mode {mode!r}")
    finally:
        # Closed before the rename: SQLite deletes sidecars by name when it closes, and
        # after the rename that name is the restored file's.
        conn.close()
    # A -shm (or an emptied journal) may be left by a state service that was killed; the
    # old file needs none of them now.
    for sidecar in _SIDECARS:
        _sidecar(database, sidecar).unlink(missing_ok=True)


# -- shared -------------------------------------------------------------------------------


def _connect(path: Path, mode: str, *, timeout: float = BUSY_WAIT_S) -> sqlite3.Connection:
    """A connection to the existing file ``path`` (``mode`` "ro" or "rw": never created)."""
    uri = f"{path.resolve().as_uri()}?mode={mode}"
    return sqlite3.connect(uri, uri=True, isolation_level=None, timeout=timeout)


def _copy_database(source: sqlite3.Connection, temp: Path, *, what: str) -> int:
    """Copy ``source`` into the empty file ``temp`` with SQLite's backup API, make it one
    self-contained file, check it, and fsync it; returns its schema version."""
    target = sqlite3.connect(temp, isolation_level=None)
    try:
        # One step (pages=-1): one read transaction on the source, so the copy is the
        # database as of one commit. A WAL reader does not block the state service's
        # writers. Smaller steps would start over whenever another process commits, and
        # might never finish under load.
        source.backup(target, pages=-1)
        # The copy inherits WAL mode from the source's header; a rollback-mode file has no
        # sidecars to lose when it is copied or moved.
        target.execute("PRAGMA journal_mode=DELETE")
        version = _check_wsgate_database(target, what)
    finally:
        target.close()
    _fsync_file(temp)
    return version


def _check_wsgate_database(conn: sqlite3.Connection, what: str) -> int:
    """Raise AdminError unless ``conn`` is a sound SQLite database with a wsgate schema
    this code can serve (after migrating it, if older); returns its schema version."""
    try:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
    except sqlite3.DatabaseError as exc:
        raise AdminError(f"{what} is not a SQLite database ({exc})") from exc
    if rows != [("ok",)]:
        raise AdminError(f"{what} fails SQLite's integrity check: {rows[0][0]}")
    version = schema.current_version(conn)
    if version <= 0:
        raise AdminError(f"{what} is a SQLite database without a wsgate schema")
    if version > schema.LATEST_VERSION:
        raise AdminError(
            f"{what} has schema version {version}; this wsgate knows up to {schema.LATEST_VERSION}"
        )
    return version


@contextlib.contextmanager
def _temp_beside(path: Path, suffix: str) -> Iterator[Path]:
    """A new empty file in ``path``'s directory (so a rename to ``path`` is atomic),
    removed on the way out unless it was renamed away."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
    finally:
        temp.unlink(missing_ok=True)
        for sidecar in _SIDECARS:
            _sidecar(temp, sidecar).unlink(missing_ok=True)


def _publish(temp: Path, target: Path, *, replace: bool) -> None:
    """Rename ``temp`` to ``target``; unless ``replace``, only if ``target`` does not exist
    (a hard link fails if it does, with no window where another file could be clobbered)."""
    if replace:
        os.replace(temp, target)
        return
    try:
        os.link(temp, target)
    except FileExistsError:
        raise AdminError(
            f"{target} exists; pass --force to replace it", exit_code=EXIT_REFUSED
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # A file system without hard links: checked, then renamed.
        if target.exists():
            raise AdminError(
                f"{target} exists; pass --force to replace it", exit_code=EXIT_REFUSED
            ) from None
        os.replace(temp, target)
        return
    temp.unlink()


def _copy_owner_and_mode(database: Path, temp: Path) -> None:
    """Give ``temp`` the current database's permissions and, where allowed (root), its
    owner: a restore run as root must leave a file the state service's user can write."""
    try:
        st = database.stat()
    except FileNotFoundError:
        os.chmod(temp, 0o644)  # what SQLite creates under the usual umask
        return
    os.chmod(temp, st.st_mode & 0o7777)
    with contextlib.suppress(PermissionError):
        os.chown(temp, st.st_uid, st.st_gid)


def _sidecar(database: Path, suffix: str) -> Path:
    return database.with_name(database.name + suffix)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _failures(context: str) -> Iterator[None]:
    """Turn the database's and the file system's errors into AdminError (exit 1), one line
    prefixed by ``context``."""
    try:
        yield
    except (sqlite3.Error, psycopg.Error, OSError, SchemaTooNew) as exc:
        raise AdminError(f"{context}: {exc}") from exc
