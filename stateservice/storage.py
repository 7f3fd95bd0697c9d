"""Durable objects' data in one database, SQLite or PostgreSQL, written with group commit.

Tables (:mod:`wsgate.stateservice.schema`): ``kv`` holds every object's keys, keyed by (namespace,
name, key); membership, alarms, idempotency keys, leases and turn records have theirs. Keys
are stored as UTF-8 bytes (BLOB, BYTEA), which both compare bytewise: listing is in UTF-8
byte order, as on Cloudflare Durable Objects, and a prefix is exactly the byte range
[prefix, successor).

All database work runs on one dedicated thread per storage, as *operations*
(:class:`Operation`): callables on the connection, submitted with :meth:`Storage.submit`.
Operations are applied one at a time in the order they were submitted, which makes the order
of every object's operations one total order, consistent with real time. The operations are
the same code on both databases: they use sqlite3's ``execute`` with ``?`` placeholders, and
:class:`PgConnection` offers that on a psycopg connection.

Group commit: while the thread commits one batch, newly submitted operations queue; the
thread then takes all of them (up to :data:`MAX_BATCH_OPS`) into one transaction and one
COMMIT: one fsync (of SQLite's WAL, of PostgreSQL's WAL) serves them all. A write that
raises is undone alone: the batch then runs again with each operation in its own SAVEPOINT
(savepoints cost about a third of a small write, so only a batch that needs them pays for
them). Every caller is answered only after that COMMIT: a write is durable when its future
resolves, and a read never returns data that a failed commit then loses.

Durability: SQLite runs a WAL journal with ``synchronous=FULL`` (the WAL is fsynced at every
commit); PostgreSQL commits with its default ``synchronous_commit=on``. Either way an
acknowledged write survives ``kill -9`` of the state service.

PostgreSQL specifics: several replicas write to one database, so a batch may meet another
replica's transaction. A batch that PostgreSQL aborts for a deadlock or a serialization
failure ran nothing: it is run again, whole (up to :data:`PG_BATCH_ATTEMPTS` times). A lost
connection fails the batch in flight (its callers see the error: not acknowledged) and is
opened again for the next one.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import sqlite3
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, TypeAlias, TypeVar

import psycopg
import psycopg.errors
from psycopg.pq import TransactionStatus

from wsgate.clock import now_ms
from wsgate.errors import InvalidObjectId
from wsgate.service import StartsAndCloses
from wsgate.stateservice import schema, usage
from wsgate.stateservice.usage import ObjectQuotas

log = logging.getLogger(__name__)

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

#: Listed entries: (key, serialized Value) pairs in the requested order.
Entries: TypeAlias = list[tuple[str, bytes]]

#: At most this many operations share one transaction, which bounds how long one batch
#: holds the thread (and the latency of the operations queued behind it).
MAX_BATCH_OPS = 2048

#: A PostgreSQL batch aborted by a deadlock or serialization failure is tried this often.
PG_BATCH_ATTEMPTS = 5

#: A PostgreSQL session idle inside a transaction this long is ended by the server.
PG_IDLE_IN_TRANSACTION_MS = 5000

#: What PostgreSQL raises when it aborted a batch's transaction for a deadlock or a
#: serialization failure: nothing of the batch is stored, and it runs again, whole (an
#: operation that meets one must let it through, never treat it as its own failure).
RETRY_WHOLE_BATCH = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)

#: What the databases raise; a storage failure is one of these (or RuntimeError when closed).
DATABASE_ERRORS = (sqlite3.Error, psycopg.Error)


class Sql(Protocol):
    """A connection as operations see it: sqlite3's ``execute`` and ``executemany`` with
    ``?`` placeholders, and ``dialect`` ("sqlite" or "postgres") for the rare statement that
    differs (:func:`for_update`)."""

    dialect: str

    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Any: ...


def for_update(conn: Sql) -> str:
    """`` FOR UPDATE`` on PostgreSQL, where a read that a transaction's writes depend on must
    lock its row against other replicas' transactions; nothing on SQLite, whose write
    transaction (BEGIN IMMEDIATE) already excludes every other writer."""
    return " FOR UPDATE" if conn.dialect == "postgres" else ""


class SqliteConnection(sqlite3.Connection):
    """sqlite3's connection, telling operations its dialect."""

    dialect = "sqlite"


@lru_cache(maxsize=1024)
def _pg_sql(sql: str) -> str:
    # Our statements never hold a literal "?" or "%", so this is exact.
    return sql.replace("?", "%s")


class PgConnection:
    """sqlite3's ``execute``/``executemany`` on a psycopg connection (``?`` placeholders)."""

    dialect = "postgres"

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.raw = conn

    def execute(self, sql: str, parameters: Any = None, /) -> psycopg.Cursor[Any]:
        """Run one statement; returns its cursor (``fetchone``, ``fetchall``, ``rowcount``)."""
        return self.raw.execute(_pg_sql(sql), parameters or None)

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> psycopg.Cursor[Any]:
        """Run one statement once per parameter tuple."""
        cursor = self.raw.cursor()
        rows = list(parameters)
        if rows:
            cursor.executemany(_pg_sql(sql), rows)
        return cursor

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open (or failed and not yet rolled back)."""
        return self.raw.info.transaction_status is not TransactionStatus.IDLE


@dataclass(frozen=True)
class ObjectId:
    """Names a durable object. Raises InvalidObjectId if ``namespace`` is empty."""

    namespace: str
    name: str

    def __post_init__(self) -> None:
        if not self.namespace:
            raise InvalidObjectId(f"object {self.name!r} has an empty namespace")


class Operation(Protocol[T_co]):
    """Work on the connection, run on the storage thread inside a batch's transaction.

    ``writes`` tells whether it changes anything: if a writing operation raises, its
    changes are undone (the batch runs again with it in a SAVEPOINT) and the batch goes
    on. Operations must therefore give the same outcome when run again on the same data.
    """

    writes: bool

    def __call__(self, conn: Sql) -> T_co:
        """Do the work; raise to fail this operation alone."""
        ...


class StoragePhase(enum.Enum):
    """The storage's lifecycle; it only moves forward."""

    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


@dataclass
class CommitStats:
    """What group commit did so far: batches committed and the operations they held."""

    commits: int = 0
    operations: int = 0
    writes: int = 0
    #: PostgreSQL batches run again after a deadlock or serialization failure.
    retries: int = 0


class Storage(StartsAndCloses):
    """Operations on one database, with group commit; :class:`SqliteStorage` and
    :class:`PostgresStorage` open it.

    Call :meth:`start` (or use ``async with``) before any operation, and :meth:`close` at
    the end. Operations raise RuntimeError unless the storage is open. An operation that
    raises fails alone (its savepoint is rolled back); a failed COMMIT fails the whole
    batch with the database's error (one of :data:`DATABASE_ERRORS`), and nothing of it
    was stored.

    ``migrate``: create or migrate the schema at start (:mod:`wsgate.stateservice.schema`);
    otherwise a database whose schema is not this code's is refused with SchemaOutdated
    (or SchemaTooNew).

    ``group_commit=False`` commits every operation on its own (one fsync per write): the
    naive baseline the benchmark compares with.
    """

    #: "sqlite" or "postgres".
    dialect: str = ""

    def __init__(self, *, group_commit: bool = True, migrate: bool = True) -> None:
        self.phase = StoragePhase.NEW
        self.stats = CommitStats()
        self.migrate = migrate
        self._max_batch = MAX_BATCH_OPS if group_commit else 1
        self._executor: ThreadPoolExecutor | None = None
        self._queue: list[tuple[Operation[Any], asyncio.Future[Any]]] = []
        self._committing = False
        self._idle: asyncio.Event | None = None

    @property
    def label(self) -> str:
        """Where the data is, for logs (no password)."""
        raise NotImplementedError

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database and check (or migrate) its schema.

        Idempotent while open; raises RuntimeError once closed, one of
        :data:`DATABASE_ERRORS` or OSError if the database cannot be opened, SchemaOutdated
        or SchemaTooNew (the storage is then closed).
        """
        if self.phase is StoragePhase.OPEN:
            return
        if self.phase is StoragePhase.CLOSED:
            raise RuntimeError("storage is closed; make a new one")
        self.phase = StoragePhase.OPEN
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsgate-storage")
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._open_checked)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Finish the operations already submitted, then close the database. Idempotent.

        Operations submitted after ``close`` raise RuntimeError.
        """
        if self.phase is StoragePhase.CLOSED:
            return
        self.phase = StoragePhase.CLOSED
        if self._idle is not None:
            await self._idle.wait()
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_connection)
        finally:
            executor.shutdown(wait=False)

    # -- the queue -----------------------------------------------------------------------

    def submit(self, op: Operation[T]) -> asyncio.Future[T]:
        """Queue ``op`` behind every operation submitted before it; the future resolves
        with its result (or exception) once the batch that ran it has committed.

        Raises RuntimeError unless the storage is open. Must be called on the event loop.
        """
        if self.phase is not StoragePhase.OPEN:
            raise RuntimeError(f"storage is {self.phase.value}, not open")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((op, future))
        if not self._committing:
            self._committing = True
            assert self._idle is not None
            self._idle.clear()
            asyncio.get_running_loop().create_task(self._commit_loop())
        return future

    async def run(self, op: Operation[T]) -> T:
        """:meth:`submit` ``op`` and wait for its result."""
        return await self.submit(op)

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                ops = [op for op, _ in batch]
                try:
                    assert self._executor is not None
                    outcomes = await loop.run_in_executor(self._executor, self._apply, ops)
                except BaseException as exc:  # the COMMIT (or BEGIN) failed: all of it did
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
                    if future.done():  # the caller gave up waiting (cancelled)
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        finally:
            self._committing = False
            assert self._idle is not None
            self._idle.set()

    # -- the thread ----------------------------------------------------------------------

    def _open_checked(self) -> None:
        conn = self._open()
        if self.migrate:
            self._begin(conn)
            try:
                applied = schema.migrate(conn, self.dialect, now_ms())
                conn.execute("COMMIT")
            except BaseException:
                self._rollback(conn)
                raise
            if applied:
                log.info("schema of %s migrated to version %s", self.label, applied[-1])
        schema.check(conn)

    def _apply(self, ops: list[Operation[Any]]) -> list[tuple[bool, Any]]:
        conn = self._connection()
        self._begin(conn)
        try:
            outcomes = self._run_all(conn, ops)
            if outcomes is None:
                # Some write failed: start over with each write in its own savepoint, so
                # that it is undone alone. Rare, so the common batch pays for no savepoint.
                conn.execute("ROLLBACK")
                self._begin(conn)
                outcomes = self._run_each_in_savepoint(conn, ops)
            conn.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise
        self.stats.commits += 1
        self.stats.operations += len(ops)
        # An operation may stand for several writes (a Write call's group): it says so.
        self.stats.writes += sum(getattr(op, "write_count", 1) for op in ops if op.writes)
        return outcomes

    def _run_all(self, conn: Sql, ops: list[Operation[Any]]) -> list[tuple[bool, Any]] | None:
        """Run every operation; None as soon as a write raises (its effects are partial),
        or any operation meets a database error (on PostgreSQL that ends the transaction)."""
        outcomes: list[tuple[bool, Any]] = []
        for op in ops:
            try:
                outcomes.append((True, op(conn)))
            except Exception as exc:
                if isinstance(exc, RETRY_WHOLE_BATCH):
                    raise  # the transaction is lost: the batch runs again, whole
                if op.writes or isinstance(exc, DATABASE_ERRORS):
                    return None
                outcomes.append((False, exc))  # a failed read changed nothing
        return outcomes

    def _run_each_in_savepoint(
        self, conn: Sql, ops: list[Operation[Any]]
    ) -> list[tuple[bool, Any]]:
        # A read needs a savepoint only where a failed statement ends the transaction.
        reads_too = self.dialect == "postgres"
        outcomes: list[tuple[bool, Any]] = []
        for op in ops:
            if not op.writes and not reads_too:
                try:
                    outcomes.append((True, op(conn)))
                except Exception as exc:
                    outcomes.append((False, exc))
                continue
            conn.execute("SAVEPOINT op")
            try:
                result = op(conn)
            except Exception as exc:
                if isinstance(exc, RETRY_WHOLE_BATCH):
                    raise
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                outcomes.append((False, exc))
            else:
                conn.execute("RELEASE op")
                outcomes.append((True, result))
        return outcomes

    # -- key/value conveniences (the servicer builds the same operations) ----------------

    async def get(self, obj: ObjectId, key: str) -> bytes | None:
        """The value of ``key`` in ``obj``, or None if it does not exist."""
        found = await self.run(GetKeys(obj, (key.encode(),)))
        return found[0][1] if found else None

    async def put(self, obj: ObjectId, key: str, value: bytes) -> None:
        """Set ``key`` in ``obj`` to ``value``. Durable once this returns."""
        await self.run(PutKeys(obj, ((key.encode(), bytes(value)),)))

    async def delete(self, obj: ObjectId, key: str) -> bool:
        """Delete ``key`` from ``obj``. Durable once this returns; returns whether it existed."""
        return await self.run(DeleteKeys(obj, (key.encode(),))) > 0

    async def list(
        self,
        obj: ObjectId,
        *,
        prefix: str = "",
        start: str | None = None,
        end: str | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> Entries:
        """The entries of ``obj`` whose keys start with ``prefix``, are ``>= start`` and
        ``< end``, in ascending UTF-8 byte order of keys (descending if ``reverse``).

        ``limit`` keeps the first entries in that order (so with ``reverse``, the greatest
        keys); None means all, 0 means none. Raises ValueError for a negative limit.
        """
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        if limit == 0:
            return []
        return await self.run(
            ListQuery(
                obj=obj,
                prefix=prefix.encode(),
                start=None if start is None else start.encode(),
                end=None if end is None else end.encode(),
                limit=limit,
                reverse=reverse,
            )
        )

    # -- what each database does its own way -----------------------------------------------

    def _open(self) -> Sql:
        """Connect (on the storage thread) and return the connection."""
        raise NotImplementedError

    def _connection(self) -> Sql:
        raise NotImplementedError

    def _begin(self, conn: Sql) -> None:
        raise NotImplementedError

    def _rollback(self, conn: Sql) -> None:
        raise NotImplementedError

    def _close_connection(self) -> None:
        raise NotImplementedError


class SqliteStorage(Storage):
    """Operations on a SQLite file, created (with its directory) if missing."""

    dialect = "sqlite"

    def __init__(
        self,
        path: Path | str,
        *,
        group_commit: bool = True,
        migrate: bool = True,
    ) -> None:
        super().__init__(group_commit=group_commit, migrate=migrate)
        self.path = Path(path)
        # Used only on the executor's thread (sqlite3 checks that, too).
        self._conn: SqliteConnection | None = None

    @property
    def label(self) -> str:
        """The file's path."""
        return str(self.path)

    def _open(self) -> Sql:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; _apply opens them.
        conn = sqlite3.connect(self.path, isolation_level=None, factory=SqliteConnection)
        try:
            (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            if str(mode).lower() != "wal":
                raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
            # FULL: the WAL is fsynced at each commit, so an acknowledged write is durable
            # (NORMAL would only protect the file's consistency, not the last commits).
            conn.execute("PRAGMA synchronous=FULL")
            # Another process holding the write lock (a backup, say) delays us, not fails us.
            conn.execute("PRAGMA busy_timeout=5000")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _connection(self) -> Sql:
        if self._conn is None:
            raise RuntimeError("storage did not open")
        return self._conn

    def _begin(self, conn: Sql) -> None:
        # IMMEDIATE takes the write lock at BEGIN, so a busy file fails here, before work.
        conn.execute("BEGIN IMMEDIATE")

    def _rollback(self, conn: Sql) -> None:
        # A failed COMMIT may already have rolled back (e.g. disk full).
        assert isinstance(conn, sqlite3.Connection)
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class PostgresStorage(Storage):
    """Operations on a PostgreSQL database named by ``dsn`` (a libpq connection string or
    ``postgresql://`` URL), through one psycopg connection on the storage thread.

    Several replicas may share the database: each group-commits its own objects' work, and
    what must not race another replica (a lease's epoch checked by a commit) locks its row
    (:func:`for_update`).
    """

    dialect = "postgres"

    def __init__(self, dsn: str, *, group_commit: bool = True, migrate: bool = False) -> None:
        super().__init__(group_commit=group_commit, migrate=migrate)
        self.dsn = dsn
        self._conn: PgConnection | None = None

    @property
    def label(self) -> str:
        """The database, host and port (never the password)."""
        try:
            info = psycopg.conninfo.conninfo_to_dict(self.dsn)
        except psycopg.Error:
            return "postgresql (unparsable DSN)"
        host = info.get("host", "localhost")
        return f"postgresql://{host}:{info.get('port', 5432)}/{info.get('dbname', '')}"

    def _open(self) -> Sql:
        # autocommit: no implicit transactions; _apply opens them with BEGIN, as on SQLite.
        raw = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
        try:
            # A replica paused (SIGSTOP, a long GC, a frozen VM) in the middle of a batch
            # would hold its row locks, among them leases', and stall every other
            # replica's grants and commits of those objects: PostgreSQL ends its session
            # instead, and its COMMIT fails when it wakes up (nothing of it stored).
            raw.execute(f"SET idle_in_transaction_session_timeout = {PG_IDLE_IN_TRANSACTION_MS}")
        except BaseException:
            raw.close()
            raise
        self._conn = PgConnection(raw)
        return self._conn

    def _connection(self) -> Sql:
        conn = self._conn
        if conn is None or conn.raw.closed or conn.raw.broken:
            if conn is not None:
                log.warning("connection to %s lost; connecting again", self.label)
                conn.raw.close()
            return self._open()
        return conn

    def _begin(self, conn: Sql) -> None:
        conn.execute("BEGIN")

    def _rollback(self, conn: Sql) -> None:
        assert isinstance(conn, PgConnection)
        if conn.raw.broken or conn.raw.closed:
            return
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def _apply(self, ops: list[Operation[Any]]) -> list[tuple[bool, Any]]:
        for attempt in range(1, PG_BATCH_ATTEMPTS + 1):
            try:
                return super()._apply(ops)
            except RETRY_WHOLE_BATCH:
                # Nothing of the batch was stored; run it again, whole.
                if attempt == PG_BATCH_ATTEMPTS:
                    raise
                self.stats.retries += 1
                time.sleep(0.001 * attempt)
        raise AssertionError("unreachable")

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.raw.close()


# -- key/value operations -----------------------------------------------------------------


@dataclass(frozen=True)
class GetKeys:
    """Read keys of one object: ``[(key, value)]`` for the keys that exist, in the order
    asked (a key asked twice is answered once)."""

    obj: ObjectId
    keys: tuple[bytes, ...]
    writes = False

    def __call__(self, conn: Sql) -> Entries:
        found: Entries = []
        seen: set[bytes] = set()
        for key in self.keys:
            if key in seen:
                continue
            seen.add(key)
            row = conn.execute(
                "SELECT value FROM kv WHERE namespace = ? AND name = ? AND key = ?",
                (self.obj.namespace, self.obj.name, key),
            ).fetchone()
            if row is not None:
                found.append((key.decode("utf-8"), bytes(row[0])))
        return found


@dataclass(frozen=True)
class PutKeys:
    """Set keys of one object (a key given twice takes its last value); returns how many
    entries were written. The object's usage follows (:mod:`wsgate.stateservice.usage`); with
    ``quotas``, a put that would take the object over one raises its exception and writes
    nothing."""

    obj: ObjectId
    entries: tuple[tuple[bytes, bytes], ...]
    quotas: ObjectQuotas | None = None
    writes = True

    def __call__(self, conn: Sql) -> int:
        final = dict(self.entries)  # a key given twice: its last value, written once
        if not final:
            return 0
        stored = _stored_sizes(conn, self.obj, final)
        added = sum(1 for key in final if key not in stored)
        grown = sum(len(key) + len(value) for key, value in final.items()) - sum(stored.values())
        namespace, name = self.obj.namespace, self.obj.name
        rows = [(namespace, name, key, value) for key, value in final.items()]
        # One statement for every key: one round trip on PostgreSQL.
        sql = (
            f"INSERT INTO kv (namespace, name, key, value) VALUES {_marks(len(rows), 4)} "
            "ON CONFLICT (namespace, name, key) DO UPDATE SET value = excluded.value"
        )
        params = [param for row in rows for param in row]
        if conn.dialect == "postgres":
            inserted = conn.execute(sql + " RETURNING (xmax = 0)", params).fetchall()
            if sum(1 for (new,) in inserted if new) != added:
                # Another replica inserted one of the keys since they were read: counted
                # wrong, so run the batch again (it will see that key).
                raise psycopg.errors.SerializationFailure(
                    f"a key of {namespace!r}/{name!r} was inserted concurrently"
                )
        else:
            conn.execute(sql, params)
        if added or grown:
            after = usage.add(conn, self.obj, keys=added, bytes=grown)
            before = usage.Usage(after.keys - added, after.bytes - grown, after.members)
            usage.check_growth(before, after, self.quotas, _first_key(final))
        return len(self.entries)


def _marks(rows: int, columns: int) -> str:
    """``(?, ?), (?, ?)``: placeholders of ``rows`` rows of ``columns`` values."""
    row = "(" + ", ".join("?" * columns) + ")"
    return ", ".join([row] * rows)


def _stored_sizes(conn: Sql, obj: ObjectId, keys: Iterable[bytes]) -> dict[bytes, int]:
    """``{key: length of key and value}`` of the keys that ``obj`` stores (on PostgreSQL
    their rows locked, so what is counted as replaced is what the put replaces)."""
    wanted = list(keys)
    if not wanted:
        return {}
    marks = ", ".join("?" * len(wanted))
    rows = conn.execute(
        "SELECT key, length(key) + length(value) FROM kv "
        f"WHERE namespace = ? AND name = ? AND key IN ({marks})" + for_update(conn),
        (obj.namespace, obj.name, *wanted),
    ).fetchall()
    return {bytes(key): int(size) for key, size in rows}


def _first_key(entries: Iterable[bytes]) -> str:
    return next((key.decode("utf-8", "replace") for key in entries), "")


@dataclass(frozen=True)
class DeleteKeys:
    """Delete keys of one object; returns how many of them existed."""

    obj: ObjectId
    keys: tuple[bytes, ...]
    writes = True

    def __call__(self, conn: Sql) -> int:
        deleted = freed = 0
        for key in dict.fromkeys(self.keys):  # a key listed twice existed at most once
            row = conn.execute(
                "DELETE FROM kv WHERE namespace = ? AND name = ? AND key = ? "
                "RETURNING length(key) + length(value)",
                (self.obj.namespace, self.obj.name, key),
            ).fetchone()
            if row is not None:
                deleted += 1
                freed += int(row[0])
        if deleted:
            usage.add(conn, self.obj, keys=-deleted, bytes=-freed)
        return deleted


@dataclass(frozen=True)
class DeleteAll:
    """Delete every key of one object; returns how many there were."""

    obj: ObjectId
    writes = True

    def __call__(self, conn: Sql) -> int:
        where = (self.obj.namespace, self.obj.name)
        if conn.dialect == "postgres":
            # Counted from the rows deleted (another replica may write meanwhile).
            count, size = conn.execute(
                "WITH gone AS (DELETE FROM kv WHERE namespace = ? AND name = ? "
                "RETURNING length(key) + length(value) AS size) "
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM gone",
                where,
            ).fetchone()
        else:
            # Nobody else writes during the transaction: what the object held, it held.
            size = usage.read(conn, self.obj).bytes
            count = conn.execute("DELETE FROM kv WHERE namespace = ? AND name = ?", where).rowcount
        if count:
            usage.add(conn, self.obj, keys=-int(count), bytes=-int(size))
        return int(count)


@dataclass(frozen=True, kw_only=True)
class ListQuery:
    """List one object's entries in a key range (see :meth:`SqliteStorage.list`)."""

    obj: ObjectId
    prefix: bytes = b""
    start: bytes | None = None
    end: bytes | None = None
    limit: int | None = None
    reverse: bool = False
    writes = False

    def __call__(self, conn: Sql) -> Entries:
        where = ["namespace = ?", "name = ?"]
        params: list[object] = [self.obj.namespace, self.obj.name]
        # Every bound is a plain comparison on the primary key, so SQLite walks one range
        # of the index; the bounds are intersected by ANDing them.
        if self.prefix:
            where.append("key >= ?")
            params.append(self.prefix)
            upper = prefix_successor(self.prefix)
            if upper is not None:
                where.append("key < ?")
                params.append(upper)
        if self.start is not None:
            where.append("key >= ?")
            params.append(self.start)
        if self.end is not None:
            where.append("key < ?")
            params.append(self.end)
        order = "DESC" if self.reverse else "ASC"
        sql = f"SELECT key, value FROM kv WHERE {' AND '.join(where)} ORDER BY key {order}"
        if self.limit is not None:
            sql += " LIMIT ?"
            params.append(self.limit)
        rows = conn.execute(sql, params).fetchall()
        return [(bytes(key).decode("utf-8"), bytes(value)) for key, value in rows]


def prefix_successor(prefix: bytes) -> bytes | None:
    """The least byte string greater than every string that starts with ``prefix``.

    None when there is none (``prefix`` empty or all 0xFF). UTF-8 never contains 0xFF,
    but the function is exact for any bytes.
    """
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])
