"""What each durable object holds (keys, bytes, members), kept in ``object_usage`` by the
very transactions that change it, and the per-object quotas checked against it.

Every operation that adds or removes an object's keys or members updates the object's row
in the same transaction (:func:`lock` then :meth:`UsageChange.apply`), so usage is exact
whatever is rolled back or retried, and a quota is checked by reading one row, never by
scanning the object. ``bytes`` counts what the object stores: each key's UTF-8 plus its
encoded value, as ``length(key) + length(value)`` in the ``kv`` table. An object without
a row holds nothing; a row that drops to nothing is deleted, so objects named once and
emptied leave nothing behind.

Concurrency: SQLite runs one write transaction at a time (BEGIN IMMEDIATE), so a row read
is a row nobody changes meanwhile. On PostgreSQL, replicas may write one object at once
(while ownership moves): :func:`lock` takes the row's lock first (creating the row if need
be), so an operation's "was this key new?" and its update of the row see the same data.

The rule of every quota (:func:`check_growth`): a write is refused only if it leaves the
object over the quota *and* bigger than it was. Deletes are always allowed, and so is a
write that shrinks or keeps the object, even one already over a quota lowered since.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from wsgate.errors import ObjectTooLarge, TooManyMembers, TooManyObjectKeys

if TYPE_CHECKING:
    from stateservice.storage import ObjectId, Operation, Sql


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


def lock(conn: Sql, obj: ObjectId) -> UsageChange:
    """Start changing the object's usage: on PostgreSQL, lock its row (made if missing)
    until the transaction ends; then read it."""
    if conn.dialect == "postgres":
        # ON CONFLICT DO UPDATE locks an existing row; a new one is locked by its insert.
        row = conn.execute(
            "INSERT INTO object_usage (namespace, name, keys, bytes, members) "
            "VALUES (?, ?, 0, 0, 0) ON CONFLICT (namespace, name) "
            "DO UPDATE SET keys = object_usage.keys RETURNING keys, bytes, members",
            (obj.namespace, obj.name),
        ).fetchone()
        return UsageChange(conn, obj, Usage(int(row[0]), int(row[1]), int(row[2])), row=True)
    return UsageChange(conn, obj, read(conn, obj), row=False)


class UsageChange:
    """An object's usage while an operation changes it (see :func:`lock`)."""

    __slots__ = ("_conn", "_row", "before", "current", "obj")

    def __init__(self, conn: Sql, obj: ObjectId, before: Usage, *, row: bool) -> None:
        self._conn = conn
        self.obj = obj
        #: The usage before the operation.
        self.before = before
        #: The usage now (after what was applied so far).
        self.current = before
        # Whether a row exists (made by :func:`lock`, it may be an empty one to delete).
        self._row = row or before != Usage()

    def apply(self, *, keys: int = 0, bytes: int = 0, members: int = 0) -> Usage:
        """Add the deltas; returns the usage after them. Deletes a row left empty."""
        before = self.current
        after = Usage(before.keys + keys, before.bytes + bytes, before.members + members)
        namespace, name = self.obj.namespace, self.obj.name
        if after == Usage():
            if self._row:
                self._conn.execute(
                    "DELETE FROM object_usage WHERE namespace = ? AND name = ?", (namespace, name)
                )
        elif after != before or not self._row:
            self._conn.execute(
                "INSERT INTO object_usage (namespace, name, keys, bytes, members) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (namespace, name) DO UPDATE SET "
                "keys = excluded.keys, bytes = excluded.bytes, members = excluded.members",
                (namespace, name, after.keys, after.bytes, after.members),
            )
        self.current = after
        self._row = after != Usage()
        return after


def decrement_members(conn: Sql, counts: dict[tuple[str, str], int]) -> None:
    """Members left these objects (``{(namespace, name): how many}``): their rows were
    deleted (and locked) by the caller, so the counts are exact."""
    # In one order: replicas sweeping at once lock usage rows alike (no deadlock).
    for (namespace, name), count in sorted(counts.items()):
        conn.execute(
            "UPDATE object_usage SET members = members - ? WHERE namespace = ? AND name = ?",
            (count, namespace, name),
        )
        conn.execute(
            "DELETE FROM object_usage WHERE namespace = ? AND name = ? "
            "AND keys = 0 AND bytes = 0 AND members <= 0",
            (namespace, name),
        )


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
        before = lock(conn, self.obj).before
        count = sum(op(conn) for op in self.ops)
        check_growth(before, read(conn, self.obj), self.quotas, self.key)
        return count
