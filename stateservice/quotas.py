"""A state service's quotas on durable objects, and what they refused.

- **Names**: an object's namespace and its name are each at most
  ``max_object_name_bytes`` of UTF-8 (:class:`~wsgate.errors.ObjectNameTooLong`), checked
  wherever a call names an object to store, read, join, alarm or activate (renewals and
  releases of leases already granted are not: a lowered limit must not strand them).
- **Keys and bytes per object**, **members per object**: checked by the storage
  operations themselves, in the transaction that writes (:mod:`wsgate.stateservice.usage`); the
  servicers turn what they raise into RESOURCE_EXHAUSTED refusals.
- **The disk** (SQLite only): :class:`~wsgate.stateservice.disk.DiskGuard`. Writes that grow the
  data (puts, joins, attachments, turns that do either) are refused while it is low;
  deletes, leaves, leases, alarms and turn records that write nothing else go on, so
  space can be freed and objects keep running. On PostgreSQL the disk is the database
  server's: nothing is measured here, and the server's own "disk full" error (SQLSTATE
  53100) is refused as StorageFull like SQLite's (:func:`storage_full`).

Every refusal is counted by quota (``wsgate_state_quota_refusals_total{quota}``).
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from typing import TypeVar

import psycopg.errors

from wsgate.config import StateConfig
from wsgate.errors import (
    ObjectNameTooLong,
    ObjectTooLarge,
    StateError,
    StorageFull,
    TooManyMembers,
    TooManyObjectKeys,
)
from wsgate.stateservice.disk import DiskGuard
from wsgate.stateservice.storage import ObjectId
from wsgate.stateservice.usage import ObjectQuotas
from wsgate.v1 import state_pb2 as pb

E = TypeVar("E", bound=StateError)

#: The ``quota`` label of each refusal.
QUOTA_LABELS: dict[type[StateError], str] = {
    ObjectNameTooLong: "object_name",
    TooManyObjectKeys: "keys",
    ObjectTooLarge: "bytes",
    TooManyMembers: "members",
    StorageFull: "disk",
}


class Quotas:
    """The quotas of one state service (from its config) and the count of refusals."""

    def __init__(self, config: StateConfig) -> None:
        self.objects = ObjectQuotas(
            max_keys=config.max_keys_per_object,
            max_bytes=config.max_object_bytes,
            max_members=config.max_members_per_object,
        )
        self.max_name_bytes = config.max_object_name_bytes
        #: None on PostgreSQL, or when the threshold is 0 (off).
        self.disk: DiskGuard | None = (
            DiskGuard(config.db_path, config.min_free_disk_bytes)
            if config.min_free_disk_bytes and not config.postgres
            else None
        )
        #: Refusals so far, by ``quota`` label.
        self.refusals: Counter[str] = Counter({label: 0 for label in QUOTA_LABELS.values()})

    def object_id(self, message: pb.ObjectId) -> ObjectId:
        """The object a request names; raises InvalidObjectId for an empty namespace, or
        ObjectNameTooLong (counted) for a namespace or name over the limit."""
        for part in (message.namespace, message.name):
            size = len(part.encode())
            if size > self.max_name_bytes:
                raise self.counted(ObjectNameTooLong(size, self.max_name_bytes, part[:64]))
        return ObjectId(message.namespace, message.name)

    def check_disk(self) -> None:
        """Raise StorageFull (counted) while the disk is below its threshold."""
        if self.disk is not None:
            try:
                self.disk.check()
            except StorageFull as exc:
                raise self.counted(exc) from None

    def not_ready_reason(self) -> str | None:
        """Why the service should get no traffic, as far as quotas go (a low disk)."""
        if self.disk is None:
            return None
        try:
            return self.disk.shortfall()
        except OSError as exc:
            return f"the disk's free space cannot be measured: {exc}"

    def counted(self, exc: E) -> E:
        """Count ``exc`` if it is a quota's refusal; returns it (to raise or send)."""
        for cls in type(exc).__mro__:
            label = QUOTA_LABELS.get(cls)
            if label is not None:
                self.refusals[label] += 1
                break
        return exc


def storage_full(exc: BaseException) -> StorageFull | None:
    """The StorageFull a database error stands for (SQLite's SQLITE_FULL, PostgreSQL's
    disk_full), or None: the write failed for want of space, and nothing of it was stored."""
    if isinstance(exc, psycopg.errors.DiskFull):
        return StorageFull(f"the database's disk is full: {exc}")
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(exc, sqlite3.Error) and code == sqlite3.SQLITE_FULL:
        return StorageFull(f"the database's disk is full: {exc}")
    return None
