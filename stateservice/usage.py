"""What each durable object holds (keys, bytes, members), kept in ``object_usage`` by the
very transactions that change it, and the per-object quotas checked against it.

Every operation that adds or removes an object's keys or members adds what it changed to
the object's row (:func:`add`) in the same transaction, so usage is exact whatever is
rolled back or retried, and a quota is checked by reading one row, never by scanning the
object. ``bytes`` counts what the object stores: each key's UTF-8 plus its
encoded value, as ``length(key) + length(value)`` in the ``kv`` table. An object without
a row holds nothing; a row that drops to nothing is deleted, so objects named once and
emptied leave nothing behind.

Concurrency: SQLite runs one write transaction at a time (BEGIN IMMEDIATE). On PostgreSQL
replicas may write one object at once (while ownership moves), so what an operation counts
must be what it changed: deltas are added in one statement (never read, then written);
a put locks the rows it replaces as it reads their sizes, and learns from its insert which
keys it really added (another replica may have inserted one meanwhile: the batch then runs
again, :data:`~wsgate.stateservice.storage.RETRY_WHOLE_BATCH`); a delete counts the rows it
deleted; a leave counts member rows it read locked. A quota check that compares the usage
before and after several writes (a transaction's, a turn's) may, in that rare race, count
another replica's write as its own: the refusal can be off, the usage never is.

The rule of every quota (:func:`check_growth`): a write is refused only if it leaves the
object over the quota *and* bigger than it was. Deletes are always allowed, and so is a
write that shrinks or keeps the object, even one already over a quota lowered since.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from wsgate.errors import ObjectTooLarge, TooManyMembers, TooManyObjectKeys

if TYPE_CHECKING:
    from wsgate.stateservice.storage import ObjectId, Operation, Sql


@dataclass(frozen=True)
class ObjectQuotas:
    """The per-object quotas a state service enforces (from its StateConfig)."""

    max_keys: int
    max_bytes: int
    max_members: int


@dataclass(frozen=True)
class Usage:
    """What one object holds: keys, their bytes (keys plus values), connections joined."""

    keys: int = 0
    bytes: int = 0
    members: int = 0


def read(conn: Sql, obj: ObjectId) -> Usage:
    """The object's usage, without locking it."""
    row = conn.execute(
        "SELECT keys, bytes, members FROM object_usage WHERE namespace = ? AND name = ?",
        (obj.namespace, obj.name),
    ).fetchone()
    return Usage() if row is None else Usage(int(row[0]), int(row[1]), int(row[2]))


#: A listing's page size: the default, and the most a request may ask for.
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000


@dataclass(frozen=True)
class ListObjects:
    """An operation: a page of ``namespace``'s objects that hold something (a row in
    ``object_usage``), names after ``after`` that start with ``prefix``, in name order (by
    code point: SQLite's binary collation, PostgreSQL's "C"), at most ``limit``. Returns
    the page and whether more follow. One index range: the table's primary key."""

    namespace: str
    prefix: str = ""
    after: str = ""
    limit: int = DEFAULT_LIST_LIMIT
    writes = False

    def __call__(self, conn: Sql) -> tuple[list[tuple[str, Usage]], bool]:
        start, end = self.after, _prefix_end(self.prefix)
        sql = (
            "SELECT name, keys, bytes, members FROM object_usage "
            "WHERE namespace = ? AND name > ? AND name >= ?"
        )
        params: list[object] = [self.namespace, start, self.prefix]
        if end is not None:
            sql += " AND name < ?"
            params.append(end)
        sql += " ORDER BY name LIMIT ?"
        params.append(self.limit + 1)
        rows = conn.execute(sql, tuple(params)).fetchall()
        page = [
            (str(name), Usage(int(keys), int(size), int(members)))
            for name, keys, size, members in rows[: self.limit]
        ]
        return page, len(rows) > self.limit


def _prefix_end(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (None: no bound),
    in code point order: the prefix with its last character raised by one (dropping
    characters that cannot be raised)."""
    while prefix:
        last = ord(prefix[-1])
        if last == 0xD7FF:  # the next one is a surrogate, which no stored name holds
            return prefix[:-1] + "\ue000"
        if last < 0x10FFFF:
            return prefix[:-1] + chr(last + 1)
        prefix = prefix[:-1]
    return None


def add(conn: Sql, obj: ObjectId, *, keys: int = 0, bytes: int = 0, members: int = 0) -> Usage:
    """Add the deltas to the object's usage in one statement, and return the usage after
    them; a row left with nothing is deleted. On PostgreSQL the statement locks the row
    until the transaction ends, so replicas changing one object add in turn."""
    return _add(conn, obj.namespace, obj.name, keys, bytes, members)


def _add(conn: Sql, namespace: str, name: str, keys: int, bytes: int, members: int) -> Usage:
    row = conn.execute(
        "INSERT INTO object_usage (namespace, name, keys, bytes, members) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (namespace, name) DO UPDATE SET "
        "keys = object_usage.keys + excluded.keys, bytes = object_usage.bytes + excluded.bytes, "
        "members = object_usage.members + excluded.members RETURNING keys, bytes, members",
        (namespace, name, keys, bytes, members),
    ).fetchone()
    after = Usage(int(row[0]), int(row[1]), int(row[2]))
    if after == Usage():
        conn.execute(
            "DELETE FROM object_usage WHERE namespace = ? AND name = ? "
            "AND keys = 0 AND bytes = 0 AND members = 0",
            (namespace, name),
        )
    return after


def decrement_members(conn: Sql, counts: dict[tuple[str, str], int]) -> None:
    """Members left these objects (``{(namespace, name): how many}``): their rows were
    deleted (and on PostgreSQL locked as they were read) by the caller, so the counts are
    exact."""
    # In one order: replicas sweeping at once lock usage rows alike (no deadlock).
    for (namespace, name), count in sorted(counts.items()):
        _add(conn, namespace, name, 0, 0, -count)


def check_growth(before: Usage, after: Usage, quotas: ObjectQuotas | None, key: str) -> None:
    """Raise TooManyObjectKeys or ObjectTooLarge if going from ``before`` to ``after``
    takes the object over a storage quota and makes it bigger (``key``: one of the
    write's, for the message). None: no quotas."""
    if quotas is None:
        return
    if after.keys > quotas.max_keys and after.keys > before.keys:
        raise TooManyObjectKeys(after.keys, quotas.max_keys, key)
    if after.bytes > quotas.max_bytes and after.bytes > before.bytes:
        raise ObjectTooLarge(after.bytes, quotas.max_bytes, key)


def check_members(after: Usage, quotas: ObjectQuotas | None, connection_id: str) -> None:
    """Raise TooManyMembers if a join left the object with more members than its quota."""
    if quotas is not None and after.members > quotas.max_members:
        raise TooManyMembers(after.members, quotas.max_members, connection_id)


@dataclass(frozen=True)
class ReadUsage:
    """An operation: the object's usage."""

    obj: ObjectId
    writes = False

    def __call__(self, conn: Sql) -> Usage:
        return read(conn, self.obj)


@dataclass(frozen=True)
class CheckedGrowth:
    """An operation: ``ops`` on one object, in order, refused as a whole (raising the
    quota's exception, the caller rolls back) if together they take the object over a
    storage quota (:func:`check_growth`). Returns what the ops returned, summed."""

    obj: ObjectId
    ops: tuple[Operation[int], ...]
    quotas: ObjectQuotas | None
    key: str = ""
    writes = True

    def __call__(self, conn: Sql) -> int:
        before = read(conn, self.obj)
        count = sum(op(conn) for op in self.ops)
        check_growth(before, read(conn, self.obj), self.quotas, self.key)
        return count
