"""Durable objects' data in one SQLite file, written with group commit.

Tables: ``kv`` holds every object's keys, keyed by (namespace, name, key); other modules
add theirs (membership, alarms, idempotency) through ``schemas``. Keys are stored as UTF-8
BLOBs, which SQLite compares with ``memcmp``: listing is in UTF-8 byte order, as on
Cloudflare Durable Objects, and a prefix is exactly the byte range [prefix, successor).

All SQLite work runs on one dedicated thread, as *operations* (:class:`Operation`):
callables on the connection, submitted with :meth:`SqliteStorage.submit`. Operations are
applied one at a time in the order they were submitted, which makes the order of every
object's operations one total order, consistent with real time (strict serializability).

Group commit: while the thread commits one batch, newly submitted operations queue; the
thread then takes all of them (up to :data:`MAX_BATCH_OPS`) into one SQLite transaction and
one COMMIT: one fsync of the WAL serves them all. A write that raises is undone alone: the
batch then runs again with each write in its own SAVEPOINT (savepoints cost about a third
of a small write, so only a batch that needs them pays for them). Every caller is answered
only after that COMMIT: a write is durable when its future resolves, and a read never
returns data that a failed commit then loses. Under load a batch is as large as what
arrived during the previous fsync, so fsyncs per second stay bounded while writes per
second grow.

Durability: WAL journal with ``synchronous=FULL``: the WAL is fsynced at every commit,
so an acknowledged write survives ``kill -9`` and power loss.
"""

from __future__ import annotations

import asyncio
import enum
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeAlias, TypeVar

from wsgate.errors import InvalidObjectId
from wsgate.service import StartsAndCloses

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

#: Listed entries: (key, serialized Value) pairs in the requested order.
Entries: TypeAlias = list[tuple[str, bytes]]

#: At most this many operations share one SQLite transaction, which bounds how long one
#: batch holds the thread (and the latency of the operations queued behind it).
MAX_BATCH_OPS = 2048

KV_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    namespace TEXT NOT NULL,
    name      TEXT NOT NULL,
    key       BLOB NOT NULL,  -- UTF-8 bytes: BLOBs compare bytewise, giving UTF-8 order
    value     BLOB NOT NULL,  -- a serialized wsgate.v1.Value, stored as received
    PRIMARY KEY (namespace, name, key)
) WITHOUT ROWID
"""


@dataclass(frozen=True)
class ObjectId:
    """Names a durable object. Raises InvalidObjectId if ``namespace`` is empty."""

    namespace: str
    name: str

    def __post_init__(self) -> None:
        if not self.namespace:
            raise InvalidObjectId(f"object {self.name!r} has an empty namespace")


class Operation(Protocol[T_co]):
    """Work on the SQLite connection, run on the storage thread inside a batch's transaction.

    ``writes`` tells whether it changes anything: if a writing operation raises, its
    changes are undone (the batch runs again with it in a SAVEPOINT) and the batch goes
    on. Operations must therefore give the same outcome when run again on the same data.
    """

    writes: bool

    def __call__(self, conn: sqlite3.Connection) -> T_co:
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


class SqliteStorage(StartsAndCloses):
    """Operations on a SQLite file, created (with its directory) if missing.

    Call :meth:`start` (or use ``async with``) before any operation, and :meth:`close` at
    the end. Operations raise RuntimeError unless the storage is open. An operation that
    raises fails alone (its savepoint is rolled back); a failed COMMIT fails the whole
    batch with its ``sqlite3.Error``, and nothing of it was stored.

    ``group_commit=False`` commits every operation on its own (one fsync per write): the
    naive baseline the benchmark compares with.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        schemas: Sequence[str] = (),
        group_commit: bool = True,
    ) -> None:
        self.path = Path(path)
        self.phase = StoragePhase.NEW
        self.stats = CommitStats()
        self._schemas = (KV_SCHEMA, *schemas)
        self._max_batch = MAX_BATCH_OPS if group_commit else 1
        self._executor: ThreadPoolExecutor | None = None
        self._queue: list[tuple[Operation[Any], asyncio.Future[Any]]] = []
        self._committing = False
        self._idle: asyncio.Event | None = None
        # Used only on the executor's thread (sqlite3 checks that, too).
        self._conn: sqlite3.Connection | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the file, switch it to WAL and create the tables.

        Idempotent while open; raises RuntimeError once closed, ``sqlite3.Error`` or
        OSError if the file cannot be opened (the storage is then closed).
        """
        if self.phase is StoragePhase.OPEN:
            return
        if self.phase is StoragePhase.CLOSED:
            raise RuntimeError("storage is closed; make a new SqliteStorage")
        self.phase = StoragePhase.OPEN
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsgate-sqlite")
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._open)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Finish the operations already submitted, then close the file. Idempotent.

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

    def _apply(self, ops: list[Operation[Any]]) -> list[tuple[bool, Any]]:
        conn = self._connection_for_thread()
        # IMMEDIATE takes the write lock at BEGIN, so a busy file fails here, before work.
        conn.execute("BEGIN IMMEDIATE")
        try:
            outcomes = self._run_all(conn, ops)
            if outcomes is None:
                # Some write failed: start over with each write in its own savepoint, so
                # that it is undone alone. Rare, so the common batch pays for no savepoint.
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                outcomes = self._run_each_in_savepoint(conn, ops)
            conn.execute("COMMIT")
        except BaseException:
            # A failed COMMIT may already have rolled back (e.g. disk full).
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.stats.commits += 1
        self.stats.operations += len(ops)
        # An operation may stand for several writes (a Write call's group): it says so.
        self.stats.writes += sum(getattr(op, "write_count", 1) for op in ops if op.writes)
        return outcomes

    @staticmethod
    def _run_all(
        conn: sqlite3.Connection, ops: list[Operation[Any]]
    ) -> list[tuple[bool, Any]] | None:
        """Run every operation; None as soon as a write raises (its effects are partial)."""
        outcomes: list[tuple[bool, Any]] = []
        for op in ops:
            try:
                outcomes.append((True, op(conn)))
            except Exception as exc:
                if op.writes:
                    return None
                outcomes.append((False, exc))  # a failed read changed nothing
        return outcomes

    @staticmethod
    def _run_each_in_savepoint(
        conn: sqlite3.Connection, ops: list[Operation[Any]]
    ) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        for op in ops:
            if not op.writes:
                try:
                    outcomes.append((True, op(conn)))
                except Exception as exc:
                    outcomes.append((False, exc))
                continue
            conn.execute("SAVEPOINT op")
            try:
                result = op(conn)
            except Exception as exc:
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                outcomes.append((False, exc))
            else:
                conn.execute("RELEASE op")
                outcomes.append((True, result))
        return outcomes

    def _connection_for_thread(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("storage did not open")
        return self._conn

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; _apply opens them.
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            if str(mode).lower() != "wal":
                raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
            # FULL: the WAL is fsynced at each commit, so an acknowledged write is durable
            # (NORMAL would only protect the file's consistency, not the last commits).
            conn.execute("PRAGMA synchronous=FULL")
            # Another process holding the write lock (a backup, say) delays us, not fails us.
            conn.execute("PRAGMA busy_timeout=5000")
            for schema in self._schemas:
                conn.executescript(schema)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

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


# -- key/value operations -----------------------------------------------------------------


@dataclass(frozen=True)
class GetKeys:
    """Read keys of one object: ``[(key, value)]`` for the keys that exist, in the order
    asked (a key asked twice is answered once)."""

    obj: ObjectId
    keys: tuple[bytes, ...]
    writes = False

    def __call__(self, conn: sqlite3.Connection) -> Entries:
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
    entries were written."""

    obj: ObjectId
    entries: tuple[tuple[bytes, bytes], ...]
    writes = True

    def __call__(self, conn: sqlite3.Connection) -> int:
        conn.executemany(
            "INSERT INTO kv (namespace, name, key, value) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (namespace, name, key) DO UPDATE SET value = excluded.value",
            [(self.obj.namespace, self.obj.name, key, value) for key, value in self.entries],
        )
        return len(self.entries)


@dataclass(frozen=True)
class DeleteKeys:
    """Delete keys of one object; returns how many of them existed."""

    obj: ObjectId
    keys: tuple[bytes, ...]
    writes = True

    def __call__(self, conn: sqlite3.Connection) -> int:
        deleted = 0
        for key in dict.fromkeys(self.keys):  # a key listed twice existed at most once
            cursor = conn.execute(
                "DELETE FROM kv WHERE namespace = ? AND name = ? AND key = ?",
                (self.obj.namespace, self.obj.name, key),
            )
            deleted += cursor.rowcount
        return deleted


@dataclass(frozen=True)
class DeleteAll:
    """Delete every key of one object; returns how many there were."""

    obj: ObjectId
    writes = True

    def __call__(self, conn: sqlite3.Connection) -> int:
        cursor = conn.execute(
            "DELETE FROM kv WHERE namespace = ? AND name = ?", (self.obj.namespace, self.obj.name)
        )
        return cursor.rowcount


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

    def __call__(self, conn: sqlite3.Connection) -> Entries:
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
