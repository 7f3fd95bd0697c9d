"""Which objects this state replica serves: all of them alone (SQLite), or those that
rendezvous hashing over the live replicas gives it (PostgreSQL, N replicas; see
:mod:`wsgate.placement`).

A call about an object this replica does not own is refused with NOT_OWNER, naming the
owner (:func:`wsgate.stateservice.rpc.require_owner`). Jobs for the whole tier (removing a dead
gateway's members, pruning old records) run on the owner of their own key, so exactly one
live replica runs each, and another takes over when it dies.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from wsgate.errors import NotOwner
from wsgate.placement import Replica, ReplicaWatch, object_key
from wsgate.stateservice.storage import ObjectId

#: ``wsgate_state_objects`` counts the objects served within this many seconds.
SERVED_WINDOW_S = 60.0


class Ownership:
    """This replica (``own``) and, with several replicas, the watch of the live ones
    (None: this replica is alone and owns everything)."""

    def __init__(self, own: Replica, watch: ReplicaWatch | None = None) -> None:
        self.own = own
        self.watch = watch
        #: Called with the live replicas when the set changes (the parts subscribe here).
        self.listeners: list[Callable[[list[Replica]], None]] = []
        #: Calls refused because another replica owns their object.
        self.refused = 0
        # Object -> when this replica last served a call about it (monotonic s).
        self._served: dict[ObjectId, float] = {}

    def served(self, within_s: float = SERVED_WINDOW_S) -> int:
        """How many objects this replica served calls about in the last ``within_s``
        seconds (older ones are forgotten)."""
        horizon = time.monotonic() - within_s
        for obj in [obj for obj, at in self._served.items() if at < horizon]:
            del self._served[obj]
        return len(self._served)

    def live(self) -> int:
        """How many replicas are alive, this one included."""
        return 1 if self.watch is None else len(self.watch.known())

    @property
    def alone(self) -> bool:
        """Whether this replica serves every object (no placement)."""
        return self.watch is None

    def owner_of_key(self, key: str) -> Replica | None:
        """The live replica that owns ``key``."""
        return self.own if self.watch is None else self.watch.owner(key)

    def owns_key(self, key: str) -> bool:
        """Whether this replica owns ``key``."""
        return self.watch is None or self.watch.owner(key) == self.own

    def owns(self, obj: ObjectId) -> bool:
        """Whether this replica owns ``obj``."""
        return self.owns_key(object_key(obj.namespace, obj.name))

    def refusal(self, obj: ObjectId) -> NotOwner | None:
        """NotOwner naming the owner if this replica does not own ``obj``, else None."""
        if self.watch is None:
            self._served[obj] = time.monotonic()
            return None
        owner = self.watch.owner(object_key(obj.namespace, obj.name))
        if owner == self.own:
            self._served[obj] = time.monotonic()
            return None
        self.refused += 1
        if owner is None:  # cannot happen: a replica is always alive to itself
            return NotOwner(f"no live replica owns {obj.namespace!r}/{obj.name!r}")
        return NotOwner(
            f"object {obj.namespace!r}/{obj.name!r} is owned by state replica "
            f"{owner.replica_id} at {owner.address}, not {self.own.replica_id}",
            owner=owner.replica_id,
            address=owner.address,
        )

    def changed(self, live: list[Replica]) -> None:
        """The live set changed: tell the listeners."""
        for listener in self.listeners:
            listener(live)
