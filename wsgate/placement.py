"""Which state replica owns which durable object: rendezvous hashing over the replicas alive
on the bus.

Every state replica announces itself on ``<prefix>.state.replicas`` (a ``StateReplica``
envelope) every :data:`ANNOUNCE_FRACTION` of its timeout. Replicas and workers keep a
:class:`ReplicaDirectory` of those heard within their announcement's timeout, and the owner
of an object is the live replica with the highest hash of (replica id, object)
(highest random weight, Thaler and Ravishankar 1996). Everyone who heard the same
announcements computes the same owner without talking to anybody, and when a replica
dies or joins, only the objects it owned (or comes to own) move: about 1/N of them.

The owner grants the object's leases, group-commits its turns and runs its alarms. Views
can differ for a moment (an announcement reaches one process before another, or a timeout
runs out a little earlier here than there). Safety never depends on them agreeing: every
grant bumps the object's epoch in the database and every commit checks it in its own
transaction. A replica asked about an object it does not own says who does
(:class:`~wsgate.errors.NotOwner`), and the asker follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from wsgate.envelopes import read_replica
from wsgate.errors import InvalidEnvelope
from wsgate.subjects import replicas_subject
from wsgate.supervision import Spawn, stop_task, unsupervised
from wsgate.v1 import envelope_pb2 as envelope_pb

log = logging.getLogger(__name__)

#: A replica announces itself this often, as a fraction of its timeout: three announcements
#: may be lost before the others drop it.
ANNOUNCE_FRACTION = 0.25


@dataclass(frozen=True, order=True)
class Replica:
    """A state replica: its id (what the hash is over) and its gRPC address."""

    replica_id: str
    address: str


def object_key(namespace: str, name: str) -> str:
    """The placement key of a durable object. The namespace's length comes first, so no
    two (namespace, name) pairs share a key whatever characters they hold."""
    return f"o{len(namespace)}:{namespace}{name}"


def gateway_key(gateway_id: str) -> str:
    """The placement key of a gateway: its owner removes its members when it dies."""
    return f"g\x00{gateway_id}"


def task_key(task: str) -> str:
    """The placement key of a job that one replica runs for the whole tier (pruning)."""
    return f"t\x00{task}"


def weight(replica_id: str, key: str) -> int:
    """The rendezvous weight of ``key`` on ``replica_id``: 64 bits of BLAKE2b (stable across
    processes and versions, unlike ``hash()``)."""
    digest = hashlib.blake2b(
        f"{replica_id}\x00{key}".encode("utf-8", "surrogatepass"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big")


def owner_of(key: str, replicas: Sequence[Replica]) -> Replica | None:
    """The replica that owns ``key`` among ``replicas`` (None if there are none). Ties,
    which need equal 64-bit hashes, go to the greater id, so every caller agrees."""
    best: Replica | None = None
    best_weight = -1
    for replica in replicas:
        w = weight(replica.replica_id, key)
        if w > best_weight or (w == best_weight and best is not None and replica > best):
            best, best_weight = replica, w
    return best


class ReplicaDirectory:
    """The replicas heard within their timeouts, plus (on a replica) itself, which is
    always alive to itself. Pure bookkeeping: every method takes ``now`` (monotonic s)."""

    def __init__(self, own: Replica | None = None) -> None:
        self.own = own
        self._expires: dict[Replica, float] = {}
        self._by_id: dict[str, Replica] = {}

    def heard(self, replica: Replica, timeout_s: float, leaving: bool, now: float) -> None:
        """An announcement of ``replica``: alive until ``now + timeout_s``, or gone at once
        when ``leaving``."""
        if self.own is not None and replica.replica_id == self.own.replica_id:
            return
        previous = self._by_id.get(replica.replica_id)
        if previous is not None and previous != replica:  # restarted at another address
            self._expires.pop(previous, None)
        if leaving:
            self._expires.pop(replica, None)
            self._by_id.pop(replica.replica_id, None)
            return
        self._by_id[replica.replica_id] = replica
        self._expires[replica] = now + timeout_s

    def live(self, now: float, *, expire: bool = True) -> list[Replica]:
        """The live replicas, in id order (expired ones are forgotten; with ``expire``
        False, they are kept and counted until a later call expires them)."""
        for replica, expires in list(self._expires.items()) if expire else ():
            if expires <= now:
                del self._expires[replica]
                if self._by_id.get(replica.replica_id) == replica:
                    del self._by_id[replica.replica_id]
        replicas = list(self._expires)
        if self.own is not None:
            replicas.append(self.own)
        return sorted(replicas)

    def owner(self, key: str, now: float) -> Replica | None:
        """The live replica that owns ``key``."""
        return owner_of(key, self.live(now))


class ReplicaWatch:
    """Keeps a :class:`ReplicaDirectory` from the announcements on the bus, and tells
    ``on_change`` (with the new live list) whenever the live set changes: when a replica
    is first heard, leaves, or times out.

    ``announce`` (on a replica): also announce ``directory.own`` every
    :data:`ANNOUNCE_FRACTION` of ``timeout_s``, and announce leaving at :meth:`close`.
    An announcement that is not valid (:func:`wsgate.envelopes.read_replica`) is dropped
    and reported to ``on_garbage``.
    """

    def __init__(
        self,
        nc: Any,
        prefix: str,
        directory: ReplicaDirectory,
        *,
        timeout_s: float,
        announce: bool = False,
        on_change: Callable[[list[Replica]], None] | None = None,
        on_garbage: Callable[[], None] = lambda: None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.directory = directory
        self.timeout_s = timeout_s
        self._nc = nc
        self._subject = replicas_subject(prefix)
        self._announce = announce and directory.own is not None
        self._on_change = on_change
        self._sub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._last: list[Replica] = directory.live(time.monotonic())
        #: Announcements heard that are not valid (counted, dropped; each also reported to
        #: ``on_garbage``).
        self.garbage = 0
        self._on_garbage = on_garbage

    async def start(self, spawn: Spawn = unsupervised) -> None:
        """Subscribe, announce (on a replica) and start the timer (with ``spawn``: the
        role supervises it)."""
        self._sub = await self._nc.subscribe(self._subject, cb=self._on_message)
        if self._announce:
            await self._publish(leaving=False, hello=True)
        self._task = spawn("replica_watch", self._tick())

    async def close(self) -> None:
        """Stop; a replica announces that it leaves, so the others move its objects at once."""
        task, self._task = self._task, None
        await stop_task(task)
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:  # NATS' drain ends it all the same
                log.warning("unsubscribing from replica announcements failed: %r", exc)
            self._sub = None
        if self._announce and self._nc.is_connected:
            try:
                await self._publish(leaving=True)
                await self._nc.flush(timeout=1)
            except Exception as exc:  # the others time it out instead
                log.warning("could not announce leaving: %r", exc)

    async def settled(self, quiet_s: float) -> None:
        """Give the replicas already on the bus ``quiet_s`` to answer this one's first
        announcement (a bounded wait at start: how many will answer is unknown)."""
        await asyncio.sleep(quiet_s)
        self.check()

    def live(self) -> list[Replica]:
        """The live replicas now."""
        return self.directory.live(time.monotonic())

    def known(self) -> list[Replica]:
        """The live replicas as of the last look (an announcement heard, or the timer):
        what :meth:`owner` places over, so that placement changes exactly when
        ``on_change`` is told."""
        return self._last

    def owner(self, key: str) -> Replica | None:
        """The owner of ``key`` among :meth:`known`."""
        return owner_of(key, self._last)

    def check(self, *, expire: bool = True) -> None:
        """Look at the live set now (and tell ``on_change`` if it changed); with
        ``expire`` False, add and remove what was heard but let nobody time out (only the
        timer does that, and not right after this process stalled)."""
        live = self.directory.live(time.monotonic(), expire=expire)
        if live != self._last:
            before, self._last = self._last, live
            log.info("state replicas: %s (were %s)", _ids(live), _ids(before))
            if self._on_change is not None:
                self._on_change(live)

    async def _publish(self, *, leaving: bool, hello: bool = False) -> None:
        own = self.directory.own
        assert own is not None
        message = envelope_pb.StateReplica(
            replica_id=own.replica_id,
            address=own.address,
            timeout_ms=max(1, round(self.timeout_s * 1000)),
            leaving=leaving,
            hello=hello,
        )
        await self._nc.publish(self._subject, message.SerializeToString())

    async def _on_message(self, msg: Any) -> None:
        try:
            message = read_replica(msg.data)
        except InvalidEnvelope as exc:
            self.garbage += 1
            self._on_garbage()
            log.warning("dropped a replica announcement (%d bytes): %s", len(msg.data), exc)
            return
        replica = Replica(message.replica_id, message.address)
        now = time.monotonic()
        newcomer = not message.leaving and (
            message.hello or replica not in self.directory.live(now, expire=False)
        )
        self.directory.heard(replica, message.timeout_ms / 1000, message.leaving, now)
        # No timeouts judged here: after a stall of this process, the announcements of
        # the others may still be queued behind this one.
        self.check(expire=False)
        if newcomer and self._announce and replica != self.directory.own:
            # Answer at once, so a starting replica knows the others before it serves.
            with contextlib.suppress(Exception):
                await self._publish(leaving=False)

    async def _tick(self) -> None:
        interval = self.timeout_s * ANNOUNCE_FRACTION
        last = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            if self._announce and self._nc.is_connected:
                try:
                    await self._publish(leaving=False)
                except Exception as exc:  # reconnecting: the next tick tries again
                    log.debug("announcing failed: %r", exc)
            now = time.monotonic()
            gap, last = now - last, now
            if gap > 2 * interval:
                # This process stalled (a long GC, an overloaded loop): the announcements
                # heard meanwhile are still queued, unread. Judge at the next tick, once
                # they are in, rather than declare every other replica dead.
                log.warning("replica view: this process stalled for %.1f s", gap)
                continue
            self.check()


def _ids(replicas: Iterable[Replica]) -> str:
    return ", ".join(r.replica_id for r in replicas) or "none"
