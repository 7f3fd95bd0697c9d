"""Durable objects' key/value storage in one SQLite file.

One table holds every object's keys, keyed by (namespace, name, key). Keys are stored as
UTF-8 BLOBs, which SQLite compares with ``memcmp``: listing is in UTF-8 byte order, as on
Cloudflare Durable Objects, and a prefix is exactly the byte range [prefix, successor).

All SQLite work runs on one dedicated thread (a single-thread executor): the event loop
never blocks on disk, and operations are applied one at a time in the order they were
called, which makes every object's operations strictly serializable.

Durability: WAL journal with ``synchronous=FULL``, so the WAL is fsynced at every commit
and a write whose call has returned survives ``kill -9`` and power loss.
"""

from __future__ import annotations

import asyncio
import enum
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeAlias, TypeVar

from wsgate.errors import InvalidObjectId
from wsgate.service import StartsAndCloses

T = TypeVar("T")

#: Listed entries: (key, serialized Value) pairs in the requested order.
Entries: TypeAlias = list[tuple[str, bytes]]

_SCHEMA = """
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


class Storage(Protocol):
    """Durable objects' key/value storage, as the state service's handlers use it.

    Keys and values arrive already checked against the limits; values are opaque bytes.
    """

    async def get(self, obj: ObjectId, key: str) -> bytes | None:
        """The value of ``key``, or None if it does not exist."""
        ...

    async def put(self, obj: ObjectId, key: str, value: bytes) -> None:
        """Set ``key``; durable once this returns."""
        ...

    async def delete(self, obj: ObjectId, key: str) -> bool:
        """Delete ``key``; durable once this returns. Returns whether it existed."""
        ...

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
        """Entries of ``obj`` in UTF-8 byte order of keys (see :meth:`SqliteStorage.list`)."""
        ...


class StoragePhase(enum.Enum):
    """The storage's lifecycle; it only moves forward."""

    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class SqliteStorage(StartsAndCloses):
    """:class:`Storage` in a SQLite file, created (with its directory) if missing.

    Call :meth:`start` (or use ``async with``) before any operation, and :meth:`close` at
    the end. Operations raise RuntimeError unless the storage is open, and let
    ``sqlite3.Error`` through when the disk fails them (a failed write is rolled back).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.phase = StoragePhase.NEW
        self._executor: ThreadPoolExecutor | None = None
        # Used only on the executor's thread (sqlite3 checks that, too).
        self._conn: sqlite3.Connection | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the file, switch it to WAL and create the table.

        Idempotent while open; raises RuntimeError once closed, ``sqlite3.Error`` or
        OSError if the file cannot be opened (the storage is then closed).
        """
        if self.phase is StoragePhase.OPEN:
            return
        if self.phase is StoragePhase.CLOSED:
            raise RuntimeError("storage is closed; make a new SqliteStorage")
        self.phase = StoragePhase.OPEN
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsgate-sqlite")
        try:
            await self._call(self._open)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Finish the operations already called, then close the file. Idempotent.

        Operations called after ``close`` raise RuntimeError.
        """
        if self.phase is StoragePhase.CLOSED:
            return
        self.phase = StoragePhase.CLOSED
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            # Queued behind every operation already called, so those finish first.
            await asyncio.get_running_loop().run_in_executor(executor, self._close_connection)
        finally:
            # The thread exits after its queue is done; nothing left to wait for here.
            executor.shutdown(wait=False)

    # -- operations ----------------------------------------------------------------------

    async def get(self, obj: ObjectId, key: str) -> bytes | None:
        """The value of ``key`` in ``obj``, or None if it does not exist."""
        return await self._call(self._get, obj, key.encode())

    async def put(self, obj: ObjectId, key: str, value: bytes) -> None:
        """Set ``key`` in ``obj`` to ``value``. Durable once this returns."""
        await self._write(_Put(obj, key.encode(), bytes(value)))

    async def delete(self, obj: ObjectId, key: str) -> bool:
        """Delete ``key`` from ``obj``. Durable once this returns; returns whether it existed."""
        return await self._write(_Delete(obj, key.encode()))

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
        query = _ListQuery(
            obj=obj,
            prefix=prefix.encode(),
            start=None if start is None else start.encode(),
            end=None if end is None else end.encode(),
            limit=limit,
            reverse=reverse,
        )
        return await self._call(query.run_on, self._connection_for_thread)

    # -- the thread ----------------------------------------------------------------------

    async def _write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Apply one write in its own transaction; return once it is durable.

        Every write goes through here, which is the seam for what a later issue adds:
        group commit replaces this body with a queue that the thread drains in batches,
        running each batch in one transaction (one fsync serves many writers) and resolving
        each caller after COMMIT; transactions (atomic read-modify-write) arrive as one
        ``op`` running several statements.
        """
        return await self._call(self._in_transaction, op)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        executor = self._executor
        if self.phase is not StoragePhase.OPEN or executor is None:
            raise RuntimeError(f"storage is {self.phase.value}, not open")
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    def _connection_for_thread(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("storage did not open")
        return self._conn

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; _in_transaction opens them.
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
            conn.execute(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _get(self, obj: ObjectId, key: bytes) -> bytes | None:
        row = (
            self._connection_for_thread()
            .execute(
                "SELECT value FROM kv WHERE namespace = ? AND name = ? AND key = ?",
                (obj.namespace, obj.name, key),
            )
            .fetchone()
        )
        return None if row is None else bytes(row[0])

    def _in_transaction(self, op: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._connection_for_thread()
        # IMMEDIATE takes the write lock at BEGIN, so a busy file fails here, before work.
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = op(conn)
            conn.execute("COMMIT")
        except BaseException:
            # A failed COMMIT may already have rolled back (e.g. disk full).
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result


@dataclass(frozen=True)
class _Put:
    obj: ObjectId
    key: bytes
    value: bytes

    def __call__(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO kv (namespace, name, key, value) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (namespace, name, key) DO UPDATE SET value = excluded.value",
            (self.obj.namespace, self.obj.name, self.key, self.value),
        )


@dataclass(frozen=True)
class _Delete:
    obj: ObjectId
    key: bytes

    def __call__(self, conn: sqlite3.Connection) -> bool:
        cursor = conn.execute(
            "DELETE FROM kv WHERE namespace = ? AND name = ? AND key = ?",
            (self.obj.namespace, self.obj.name, self.key),
        )
        return cursor.rowcount > 0


@dataclass(frozen=True, kw_only=True)
class _ListQuery:
    obj: ObjectId
    prefix: bytes
    start: bytes | None
    end: bytes | None
    limit: int | None
    reverse: bool

    def run_on(self, connection: Callable[[], sqlite3.Connection]) -> Entries:
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
        rows = connection().execute(sql, params).fetchall()
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
