"""An activation's count of what its object holds, against the state service's quotas.

The state service checks each object's quotas (keys, bytes, members) when it commits a
turn, but a handler's writes and joins are made in memory and committed after it returns:
so that a handler sees a write over a quota refused *as it makes it* (a typed exception,
nothing of the write applied), the activation counts too. The grant of its lease tells it
what the object holds and the quotas; from then on it is the object's one writer, and
counts every write and join of its turns.

The count is exact or above the truth, never below, so what the activation lets through the
service never refuses (it checks each turn's writes together, a looser rule than each call
on its own):

- a put or delete of a key the activation's cache does not know (never read or written)
  counts as if the key did not exist: a put as a new key, a delete as nothing freed;
- members that leave because their gateway died are not seen (the count keeps them).

When a write would go over a quota by this count and the count may be above the truth, the
activation *settles* it before refusing (:meth:`ObjectQuota.settle`): it waits until its
earlier turns are committed, asks the service what the object holds, and reads what the
running turn's writes replaced where it did not know it. The count is then exact, and the
write is let through or refused on the truth. This costs a round trip or two, only near a
quota.

The rule is the service's (:func:`wsgate.stateservice.usage.check_growth`): a write is refused if
it leaves the object over a quota and bigger than it was; deletes always pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from wsgate.errors import ObjectQuotaExceeded, ObjectTooLarge, TooManyMembers, TooManyObjectKeys
from wsgate.v1 import state_pb2 as pb
from wsgate.worker.object_cache import UNKNOWN, Layer

#: What a write changes: key -> its new encoded value, None for a delete.
Changes = Mapping[str, bytes | None]

#: The ``quota`` label of each refusal (``wsgate_worker_quota_refusals_total``).
QUOTA_LABELS: dict[type[ObjectQuotaExceeded], str] = {
    TooManyObjectKeys: "keys",
    ObjectTooLarge: "bytes",
    TooManyMembers: "members",
}


def entry_size(key: str, value: bytes | None) -> int:
    """What a stored entry counts for: its key's UTF-8 plus its encoded value (0: none)."""
    return 0 if value is None else len(key.encode()) + len(value)


@dataclass
class _TurnWrites:
    """What the running turn wrote: each key's value before the turn first wrote it (as
    the cache knew it: bytes, None, or UNKNOWN), and whether it deleted everything."""

    number: int
    before: dict[str, bytes | object | None] = field(default_factory=dict)
    cleared: bool = False
    #: Members joined minus members left in the turn.
    members: int = 0


class ObjectQuota:
    """One activation's count of its object's keys, bytes and members against the quotas
    of the state service (0 in a grant: no quota)."""

    def __init__(self, usage: pb.ObjectUsage, quotas: pb.ObjectQuotas) -> None:
        self.max_keys = quotas.max_keys or None
        self.max_bytes = quotas.max_bytes or None
        self.max_members = quotas.max_members or None
        self.keys = usage.keys
        self.bytes = usage.bytes
        self.members = usage.members
        #: Whether keys and bytes may be above the truth (a write of an unknown key).
        self.uncertain = False
        self._turn = _TurnWrites(0)

    def __repr__(self) -> str:
        return (
            f"<ObjectQuota {self.keys}/{self.max_keys} keys, {self.bytes}/{self.max_bytes} "
            f"bytes, {self.members}/{self.max_members} members"
            f"{' (at most)' if self.uncertain else ''}>"
        )

    # -- storage -------------------------------------------------------------------------

    def after(self, cache: Layer, changes: Changes, *, clear: bool = False) -> tuple[int, int]:
        """Keys and bytes once ``changes`` apply (after deleting everything, with
        ``clear``), counting a key the cache does not know as absent."""
        if clear:
            present = [(k, v) for k, v in changes.items() if v is not None]
            return len(present), sum(entry_size(k, v) for k, v in present)
        keys, size = self.keys, self.bytes
        for key, value in changes.items():
            old = cache.lookup(key)
            stored = old if isinstance(old, bytes) else None
            keys += (value is not None) - (stored is not None)
            size += entry_size(key, value) - entry_size(key, stored)
        return keys, size

    def refusal(
        self, cache: Layer, changes: Changes, *, clear: bool = False
    ) -> ObjectQuotaExceeded | None:
        """The quota's exception if ``changes`` would take the object over one, by this
        count (exact only if :meth:`decides`)."""
        keys, size = self.after(cache, changes, clear=clear)
        example = next(iter(changes), "")
        if self.max_keys is not None and keys > self.max_keys and keys > self.keys:
            return TooManyObjectKeys(keys, self.max_keys, example)
        if self.max_bytes is not None and size > self.max_bytes and size > self.bytes:
            return ObjectTooLarge(size, self.max_bytes, example)
        return None

    def decides(self, cache: Layer, changes: Changes, *, clear: bool = False) -> bool:
        """Whether the count is exact for ``changes``: nothing counted so far is in doubt,
        and the cache knows every key they change."""
        if clear:
            return True
        return not self.uncertain and all(cache.lookup(key) is not UNKNOWN for key in changes)

    def unknown(self, cache: Layer, changes: Changes) -> list[str]:
        """The keys of ``changes`` that the cache does not know."""
        return [key for key in changes if cache.lookup(key) is UNKNOWN]

    def wrote(self, turn: int, cache: Layer, changes: Changes, *, clear: bool = False) -> None:
        """Count ``changes`` as made by turn number ``turn``: call just before they apply
        to ``cache``."""
        keys, size = self.after(cache, changes, clear=clear)
        writes = self._writes_of(turn)
        if clear:
            writes.cleared = True
            writes.before.clear()
            self.uncertain = False  # nothing is left to be unsure of
        else:
            for key in changes:
                if key not in writes.before:
                    writes.before[key] = cache.lookup(key)
            if self.unknown(cache, changes):
                self.uncertain = True
        self.keys, self.bytes = keys, size

    def unknown_before(self, turn: int) -> list[str]:
        """Keys that turn ``turn`` wrote without knowing what they held before."""
        writes = self._writes_of(turn)
        return [key for key, value in writes.before.items() if value is UNKNOWN]

    def settle(
        self, turn: int, cache: Layer, committed: pb.ObjectUsage, held: Mapping[str, bytes]
    ) -> None:
        """Make the count exact: ``committed`` is what the service holds once every turn
        before ``turn`` committed, and ``held`` what it holds for :meth:`unknown_before`'s
        keys (those missing do not exist). Then the running turn's writes are added."""
        writes = self._writes_of(turn)
        if writes.cleared:
            entries = [(k, v) for k, v in cache.values.items() if isinstance(v, bytes)]
            keys, size = len(entries), sum(entry_size(k, v) for k, v in entries)
        else:
            keys, size = committed.keys, committed.bytes
            for key, before in writes.before.items():
                old = held.get(key) if before is UNKNOWN else before
                new = cache.lookup(key)
                stored = old if isinstance(old, bytes) else None
                now = new if isinstance(new, bytes) else None
                keys += (now is not None) - (stored is not None)
                size += entry_size(key, now) - entry_size(key, stored)
                # Known from now on: the turn's count needs no second reading.
                writes.before[key] = stored
        self.keys, self.bytes = keys, size
        self.members = committed.members + writes.members
        self.uncertain = False

    # -- members -------------------------------------------------------------------------

    def join_refusal(self, connection_id: str) -> TooManyMembers | None:
        """TooManyMembers if one more member would take the object over its quota, by this
        count (which may be above the truth: :meth:`settle` first)."""
        if self.max_members is not None and self.members + 1 > self.max_members:
            return TooManyMembers(self.members + 1, self.max_members, connection_id)
        return None

    def joined(self, turn: int) -> None:
        """Turn ``turn`` made a connection a member."""
        self.members += 1
        self._writes_of(turn).members += 1

    def left(self, turn: int) -> None:
        """Turn ``turn`` removed a member (a connection that closed)."""
        self.members = max(self.members - 1, 0)
        self._writes_of(turn).members -= 1

    def _writes_of(self, turn: int) -> _TurnWrites:
        if self._turn.number != turn:
            self._turn = _TurnWrites(turn)
        return self._turn
