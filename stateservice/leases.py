"""Leases on durable objects: one worker at a time hosts an object's activation.

A worker asks for an object (``Activate``); the state service grants it a lease with an
*epoch*, one higher than every earlier grant of that object, or answers who holds it. The
holder renews all its leases in one call per interval (``Renew``), gives them up when it
evicts an activation or drains (``Release``), and names the epoch in every commit of the
activation's turns, which the commit refuses unless it is still the object's epoch
(:mod:`wsgate.stateservice.turns`, inside the database transaction: fencing).

Two halves:

- **Durable**: the ``leases`` table, one row per object ever activated: its epoch and its
  holder (``''`` once released or revoked). Epochs therefore grow across restarts, so an
  epoch is never granted twice.
- **In memory** (:class:`LeaseTable`, pure bookkeeping with the clock passed in): who holds
  what until when. Renewals touch only this, so they cost no disk write. After a restart
  the table is loaded from the rows with a holder, each with a full lease from the
  moment of loading: live holders keep their objects if they renew within it.

Rules (:meth:`LeaseTable.claim`): an object with no live lease goes to whoever asks; the
holder of a live lease keeps it. A lease runs out ``lease_s`` after its last grant or
renewal; it is then free for the next asker, but until somebody takes it the old holder
may still renew it (nothing else happened meanwhile, so nothing is lost).

Writes from outside an activation (``env.storage(...)`` of a function route) to an object
with a live lease are refused (:class:`~wsgate.errors.ObjectActive`): the activation
holds the object's state in memory and is its one writer. An expired lease is revoked
first (its epoch bumped, so its paused holder is fenced), then the write goes ahead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from wsgate.errors import ObjectActive
from wsgate.stateservice.storage import ObjectId, Sql, Storage

log = logging.getLogger(__name__)


#: Objects remembered as checked (their stored lease read) at most; then forgotten.
MAX_CHECKED = 100_000


# -- durable operations -------------------------------------------------------------------


@dataclass(frozen=True)
class GrantLease:
    """Give the object's next epoch to ``holder``; returns that epoch."""

    obj: ObjectId
    holder: str
    writes = True

    def __call__(self, conn: Sql) -> int:
        row = conn.execute(
            "INSERT INTO leases (namespace, name, epoch, holder) VALUES (?, ?, 1, ?) "
            "ON CONFLICT (namespace, name) DO UPDATE SET epoch = leases.epoch + 1, "
            "holder = excluded.holder RETURNING epoch",
            (self.obj.namespace, self.obj.name, self.holder),
        ).fetchone()
        return int(row[0])


@dataclass(frozen=True)
class ReleaseLease:
    """``holder`` gives up epoch ``epoch`` (nothing happens if that is not the lease)."""

    obj: ObjectId
    holder: str
    epoch: int
    writes = True

    def __call__(self, conn: Sql) -> bool:
        cursor = conn.execute(
            "UPDATE leases SET holder = '' "
            "WHERE namespace = ? AND name = ? AND epoch = ? AND holder = ?",
            (self.obj.namespace, self.obj.name, self.epoch, self.holder),
        )
        return cursor.rowcount > 0


@dataclass(frozen=True)
class RevokeLease:
    """Take an expired lease away: the epoch grows, so its holder's commits are refused."""

    obj: ObjectId
    writes = True

    def __call__(self, conn: Sql) -> None:
        conn.execute(
            "UPDATE leases SET epoch = epoch + 1, holder = '' WHERE namespace = ? AND name = ?",
            (self.obj.namespace, self.obj.name),
        )


@dataclass(frozen=True)
class HeldLeases:
    """Every lease with a holder, as ``(object, epoch, holder)`` (loaded at start)."""

    writes = False

    def __call__(self, conn: Sql) -> list[tuple[ObjectId, int, str]]:
        rows = conn.execute(
            "SELECT namespace, name, epoch, holder FROM leases WHERE holder != ''"
        ).fetchall()
        return [(ObjectId(ns, name), int(epoch), holder) for ns, name, epoch, holder in rows]


@dataclass(frozen=True)
class ReadLeases:
    """The stored leases of some objects, as ``{object: (epoch, holder)}`` (only those with
    a row; holder ``''``: released or revoked)."""

    objs: tuple[ObjectId, ...]
    writes = False

    def __call__(self, conn: Sql) -> dict[ObjectId, tuple[int, str]]:
        found: dict[ObjectId, tuple[int, str]] = {}
        for obj in dict.fromkeys(self.objs):
            row = conn.execute(
                "SELECT epoch, holder FROM leases WHERE namespace = ? AND name = ?",
                (obj.namespace, obj.name),
            ).fetchone()
            if row is not None:
                found[obj] = (int(row[0]), str(row[1]))
        return found


# -- the table in memory ------------------------------------------------------------------


@dataclass
class Lease:
    """A lease as the table keeps it. ``epoch`` is 0 while its grant is being stored."""

    holder: str
    epoch: int
    expires_at: float


class Claim(Enum):
    """What :meth:`LeaseTable.claim` decided."""

    GRANT = "grant"  # store a grant for the asker, then call granted()
    HELD = "held"  # another worker holds it


class LeaseTable:
    """Who holds which object, until when. Pure bookkeeping; every method takes ``now``
    (monotonic seconds). The event loop's alone (not thread-safe)."""

    def __init__(self, lease_s: float) -> None:
        if not lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        self.lease_s = lease_s
        self._leases: dict[ObjectId, Lease] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def load(self, held: list[tuple[ObjectId, int, str]], now: float) -> None:
        """Take the stored leases (after a restart), each lasting a full lease from now."""
        for obj, epoch, holder in held:
            self._leases[obj] = Lease(holder, epoch, now + self.lease_s)

    def get(self, obj: ObjectId) -> Lease | None:
        """The object's lease, live or expired (None: nobody holds it)."""
        return self._leases.get(obj)

    def live(self, obj: ObjectId, now: float) -> Lease | None:
        """The object's lease if it has not run out (or is being granted)."""
        lease = self._leases.get(obj)
        if lease is None or (lease.epoch and lease.expires_at <= now):
            return None
        return lease

    def claim(self, obj: ObjectId, worker: str, now: float) -> tuple[Claim, Lease | None]:
        """``worker`` asks for ``obj``. GRANT: the table now shows the grant in progress
        (so a second asker hears HELD), and the caller stores it and calls
        :meth:`granted` or :meth:`grant_failed`. HELD, with the lease: another worker
        holds it (or is being granted it)."""
        lease = self.live(obj, now)
        if lease is not None and lease.holder != worker:
            return Claim.HELD, lease
        self._leases[obj] = Lease(worker, 0, now + self.lease_s)
        return Claim.GRANT, None

    def granted(self, obj: ObjectId, worker: str, epoch: int, now: float) -> None:
        """The grant of ``epoch`` to ``worker`` is durable."""
        self._leases[obj] = Lease(worker, epoch, now + self.lease_s)

    def grant_failed(self, obj: ObjectId, worker: str) -> None:
        """Storing the grant failed: the object is free again."""
        lease = self._leases.get(obj)
        if lease is not None and lease.holder == worker and not lease.epoch:
            del self._leases[obj]

    def renew(self, worker: str, leases: list[tuple[ObjectId, int]], now: float) -> list[int]:
        """Extend ``worker``'s leases; returns the positions of those it no longer holds."""
        lost: list[int] = []
        for index, (obj, epoch) in enumerate(leases):
            lease = self._leases.get(obj)
            if lease is None or lease.holder != worker or lease.epoch != epoch or not epoch:
                lost.append(index)
            else:
                lease.expires_at = now + self.lease_s
        return lost

    def release(self, obj: ObjectId, worker: str, epoch: int) -> bool:
        """``worker`` gives up ``epoch``; returns whether that was the lease."""
        lease = self._leases.get(obj)
        if lease is None or lease.holder != worker or lease.epoch != epoch or not epoch:
            return False
        del self._leases[obj]
        return True

    def revoke(self, obj: ObjectId) -> None:
        """Forget the object's lease (the caller stores the revocation)."""
        self._leases.pop(obj, None)

    def adopt(self, obj: ObjectId, holder: str, epoch: int, now: float) -> None:
        """Take a lease found in the database (granted by another replica, which owned the
        object before): it lasts a full lease from now, as after a restart."""
        self._leases[obj] = Lease(holder, epoch, now + self.lease_s)

    def forget_unless(self, keep: Callable[[ObjectId], bool]) -> int:
        """Drop the leases of objects ``keep`` rejects (moved to another replica, whose
        table is now their authority); leases being granted stay. Returns how many."""
        gone = [obj for obj, lease in self._leases.items() if lease.epoch and not keep(obj)]
        for obj in gone:
            del self._leases[obj]
        return len(gone)


class ObjectLeases:
    """The lease table with its storage: what the state service's parts share."""

    def __init__(self, storage: Storage, lease_s: float) -> None:
        self.storage = storage
        self.table = LeaseTable(lease_s)
        #: Whether the table may miss leases that another replica granted (several
        #: replicas): then an object's stored lease is read once before a write from
        #: outside is admitted, and again after every change of the replicas.
        self.verify = False
        # Objects whose stored lease was read since the replicas last changed.
        self._checked: set[ObjectId] = set()

    async def load(self, now: float) -> None:
        """Load the stored leases (at start)."""
        self.table.load(await self.storage.run(HeldLeases()), now)

    async def refresh(self, objs: list[ObjectId]) -> None:
        """Bring the table up to date for ``objs``, which it shows without a live lease:
        a lease that another replica granted (the object moved here since) is adopted, so
        its holder keeps it instead of being fenced by a new grant.

        The table is a cache of the ``leases`` table, exact only while this replica owns
        the object throughout; the database stays the authority (commits check the epoch
        there), so a stale table costs a re-activation, never a lost or doubled turn.
        """
        stored = await self.storage.run(ReadLeases(tuple(objs)))
        if len(self._checked) + len(objs) > MAX_CHECKED:
            self._checked.clear()  # read again when next written: a bound, not a leak
        self._checked.update(objs)
        now = time.monotonic()
        for obj, (epoch, holder) in stored.items():
            if not holder:
                continue
            lease = self.table.get(obj)
            if lease is not None and not lease.epoch:
                continue  # a grant is in progress here
            if lease is None or lease.epoch != epoch or lease.holder != holder:
                self.table.adopt(obj, holder, epoch, now)

    async def check_outside_writes(self, objs: list[ObjectId]) -> None:
        """Before writes from outside to ``objs`` are admitted: with several replicas,
        read the stored leases of those this replica has not looked at since the replicas
        last changed (an object that moved here may have a live holder that the table
        does not show yet, and admitting the write would go behind that activation's
        back). Nothing to do on a replica alone, whose table is exact."""
        if not self.verify:
            return
        unchecked = [
            obj
            for obj in dict.fromkeys(objs)
            if obj not in self._checked and not self.table.get(obj)
        ]
        if unchecked:
            await self.refresh(unchecked)

    def replicas_changed(self) -> None:
        """Objects may have moved here: read their stored leases again before admitting
        writes from outside."""
        self._checked.clear()

    def admit_outside_write(self, obj: ObjectId, now: float) -> None:
        """Let a write from outside any activation reach ``obj``, or raise ObjectActive.

        Call it in the same step of the event loop as submitting the write (no await in
        between): an expired lease is revoked by an operation submitted here, so storage
        applies the revocation first, and no grant can come between the two.
        """
        lease = self.table.get(obj)
        if lease is None:
            return
        if self.table.live(obj, now) is not None:
            raise ObjectActive(
                f"object {obj.namespace!r}/{obj.name!r} is active on worker {lease.holder}: "
                "its activation is its one writer; reach it through its own handlers",
                holder=lease.holder,
            )
        self.table.revoke(obj)
        self.storage.submit(RevokeLease(obj)).add_done_callback(_log_failure)


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        # The write behind it fails the same way (the same disk), and says so to its caller.
        log.error("revoking an expired lease failed: %s", future.exception())
