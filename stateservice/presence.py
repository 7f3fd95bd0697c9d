"""Gateway leases: members of a gateway that died leave every object.

A connection leaves its objects when the worker handles its close event (LeaveAll). A
gateway killed with ``kill -9`` sends no close events, so its connections would stay
members for ever. Instead every gateway announces itself on its own presence subject,
``<prefix>.presence.<node>.<gateway_id>`` (:class:`wsgate.v1.GatewayPresence`), every
presence interval, with a lease of a few intervals; the state service keeps, per
gateway, when its lease runs out, and removes all members of a gateway whose lease ran
out (or that said it is leaving) from every object.

Rules (:class:`GatewayLeases`, pure bookkeeping with the clock passed in):

- An announcement renews the lease to ``now + lease_ms``; ``leaving`` ends it at once.
- A gateway never heard from (members loaded at start, or a first member of an unknown
  gateway joining) gets a grace lease of :data:`GRACE_S` (or the longest lease heard, if
  longer) from that moment, so that live gateways have time to be heard after a restart of
  the state service.
- A gateway is swept only if members may have joined it since its last sweep: each join
  is noted (:meth:`GatewayLeases.member_joined`), so an expired gateway with nothing to
  remove costs nothing. A member joining a gateway whose lease already ran out (a late
  worker) is swept at the next sweep.
- While the state service is cut off from NATS it hears nobody, so it sweeps nobody by
  expiry; once reconnected, every lease is extended to a grace lease from then.
- An announcement is taken only on the subject of the gateway it names: NATS lets a
  gateway's identity publish on its own presence subjects only, so one that speaks for
  another gateway (a fake ``leaving`` would evict that gateway's members) is an impostor's,
  dropped and counted (``impostors``).

:class:`PresenceMonitor` runs it: it subscribes, and sweeps every :func:`sweep_interval`
(a quarter of the shortest lease heard, at most :data:`MAX_SWEEP_INTERVAL_S`), or at once
when a gateway says it is leaving. What it sweeps is logged and counted (``stats``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from wsgate import subjects
from wsgate.envelopes import read_presence
from wsgate.errors import InvalidEnvelope
from wsgate.supervision import Spawn, stop_task, unsupervised

log = logging.getLogger(__name__)

#: The lease of a gateway not heard from yet. Above the default lease (5 x 2 s), so a live
#: gateway with the default presence interval is heard well before it runs out.
GRACE_S = 30.0

#: Sweeps are at least this frequent ...
MAX_SWEEP_INTERVAL_S = 0.5
#: ... and at most this frequent (a lease of a few ms would otherwise spin).
MIN_SWEEP_INTERVAL_S = 0.02

#: A gateway with nothing left to sweep is forgotten this long after its lease ran out
#: (until then a late member of it is swept at the next sweep, not after a grace lease).
FORGET_AFTER_S = 300.0


@dataclass
class _Lease:
    expires_at: float
    #: Joins noted since the last sweep of this gateway; 0: it holds no members.
    joins: int = 0
    heard: bool = False
    leaving: bool = False


@dataclass
class PresenceStats:
    """What the monitor heard and swept since it started."""

    announcements: int = 0
    garbage: int = 0
    #: Announcements naming another gateway than the subject they came on.
    impostors: int = 0
    #: Sweeps run (whether or not anything was due).
    sweeps: int = 0
    #: Gateways whose members were removed (once per lease that ended).
    gateways_swept: int = 0
    members_swept: int = 0
    sweep_failures: int = 0


class GatewayLeases:
    """Per gateway: when its lease runs out, and whether it may hold members.

    Pure bookkeeping; every method takes ``now`` (monotonic seconds). Not thread-safe (the
    event loop's).
    """

    def __init__(self, *, grace_s: float = GRACE_S) -> None:
        if not grace_s > 0:
            raise ValueError(f"grace_s must be > 0, got {grace_s}")
        self._grace_s = grace_s
        self._leases: dict[str, _Lease] = {}
        self._longest_lease_s = 0.0
        self._shortest_lease_s: float | None = None

    @property
    def grace_s(self) -> float:
        """The lease a gateway not heard from gets: :data:`GRACE_S` or the longest lease
        heard, whichever is longer."""
        return max(self._grace_s, self._longest_lease_s)

    @property
    def shortest_lease_s(self) -> float | None:
        """The shortest lease any gateway announced (None before any)."""
        return self._shortest_lease_s

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, gateway_id: object) -> bool:
        return gateway_id in self._leases

    def expires_at(self, gateway_id: str) -> float | None:
        """When ``gateway_id``'s lease runs out (None if unknown)."""
        lease = self._leases.get(gateway_id)
        return None if lease is None else lease.expires_at

    def is_leaving(self, gateway_id: str) -> bool:
        """Whether ``gateway_id`` announced that it is leaving."""
        lease = self._leases.get(gateway_id)
        return lease is not None and lease.leaving

    def heard(self, gateway_id: str, lease_s: float, leaving: bool, now: float) -> None:
        """``gateway_id`` announced itself: renew its lease, or end it if ``leaving``."""
        lease = self._leases.get(gateway_id)
        if lease is None:
            lease = self._leases[gateway_id] = _Lease(expires_at=now)
        lease.heard = True
        lease.leaving = leaving
        if leaving:
            lease.expires_at = now
            return
        lease.expires_at = now + lease_s
        self._longest_lease_s = max(self._longest_lease_s, lease_s)
        if self._shortest_lease_s is None or lease_s < self._shortest_lease_s:
            self._shortest_lease_s = lease_s

    def member_joined(self, gateway_id: str, now: float) -> None:
        """A connection of ``gateway_id`` joined an object (or was found stored at start).

        An unknown gateway gets a grace lease from ``now``; a known one keeps its lease
        (an expired one is swept again at the next sweep).
        """
        lease = self._leases.get(gateway_id)
        if lease is None:
            lease = self._leases[gateway_id] = _Lease(expires_at=now + self.grace_s)
        lease.joins += 1

    def due(self, now: float) -> list[tuple[str, int]]:
        """Gateways to sweep now, each with its join count, to pass to :meth:`swept`:
        those that may hold members and whose lease ran out or that are leaving."""
        return [
            (gateway_id, lease.joins)
            for gateway_id, lease in self._leases.items()
            if lease.joins and (lease.leaving or lease.expires_at <= now)
        ]

    def swept(self, gateway_id: str, joins: int) -> None:
        """All members of ``gateway_id`` that had joined when :meth:`due` returned
        ``joins`` are removed. Members that joined since keep it due."""
        lease = self._leases.get(gateway_id)
        if lease is not None:
            lease.joins = max(lease.joins - joins, 0)

    def extend_all(self, now: float) -> None:
        """After an outage in which nothing could be heard: every gateway that is not
        leaving gets a grace lease from ``now`` (if its own runs out sooner)."""
        until = now + self.grace_s
        for lease in self._leases.values():
            if not lease.leaving and lease.expires_at < until:
                lease.expires_at = until

    def forget_old(self, now: float, after_s: float = FORGET_AFTER_S) -> int:
        """Forget gateways with nothing to sweep whose lease ran out over ``after_s`` ago;
        returns how many."""
        old = [
            gateway_id
            for gateway_id, lease in self._leases.items()
            if not lease.joins and lease.expires_at + after_s <= now
        ]
        for gateway_id in old:
            del self._leases[gateway_id]
        return len(old)


def sweep_interval(shortest_lease_s: float | None) -> float:
    """How often to sweep: a quarter of the shortest lease heard, so a dead gateway's
    members are gone within 1.25 leases, bounded to [MIN, MAX]_SWEEP_INTERVAL_S."""
    if shortest_lease_s is None:
        return MAX_SWEEP_INTERVAL_S
    return min(MAX_SWEEP_INTERVAL_S, max(MIN_SWEEP_INTERVAL_S, shortest_lease_s / 4))


class PresenceMonitor:
    """Hears gateways' presence and sweeps the members of the dead ones.

    ``remove_members(gateway_id)`` removes every member of a gateway from every object and
    returns how many it removed; an exception leaves the gateway due (retried at the next
    sweep). ``clock`` is monotonic seconds.
    """

    def __init__(
        self,
        nc: NatsClient,
        prefix: str,
        remove_members: Callable[[str], Awaitable[int]],
        *,
        grace_s: float = GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nc = nc
        self._subject = subjects.presence_subject(prefix, subjects.ANY)
        self._remove_members = remove_members
        self._clock = clock
        self.leases = GatewayLeases(grace_s=grace_s)
        self.stats = PresenceStats()
        self._wake = asyncio.Event()
        self._subscription: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._reconnects = 0
        self._cut_off = False

    async def start(
        self, gateways_with_members: Iterable[str], spawn: Spawn = unsupervised
    ) -> None:
        """Give the gateways that hold stored members a grace lease from now, subscribe,
        and start sweeping (with ``spawn``)."""
        now = self._clock()
        for gateway_id in gateways_with_members:
            self.leases.member_joined(gateway_id, now)
        self._reconnects = self._nc.stats["reconnects"]
        self._subscription = await self._nc.subscribe(self._subject, cb=self._on_presence)
        self._task = spawn("presence_sweep", self._sweep_loop())

    async def close(self) -> None:
        """Stop sweeping and listening. Idempotent."""
        task, self._task = self._task, None
        await stop_task(task)
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            try:
                await subscription.unsubscribe()
            except Exception as exc:  # NATS' drain ends it all the same
                log.warning("unsubscribing from gateways' presence failed: %r", exc)

    def member_joined(self, gateway_id: str) -> None:
        """Note that a connection of ``gateway_id`` is joining an object. Call it before
        the join is submitted to storage, so that a sweep running meanwhile leaves the
        gateway due."""
        self.leases.member_joined(gateway_id, self._clock())

    async def sweep(self) -> int:
        """Sweep the due gateways now; returns how many members were removed."""
        now = self._clock()
        self._notice_outage(now)
        removed_total = 0
        for gateway_id, joins in self.leases.due(now):
            try:
                removed = await self._remove_members(gateway_id)
            except Exception:
                self.stats.sweep_failures += 1
                log.exception("removing the members of gateway %s failed; retrying", gateway_id)
                continue
            self.leases.swept(gateway_id, joins)
            self.stats.gateways_swept += 1
            self.stats.members_swept += removed
            removed_total += removed
            if removed:
                log.info(
                    "gateway %s %s: removed its %d member(s) from every object",
                    gateway_id,
                    "left" if self.leases.is_leaving(gateway_id) else "is gone (lease ran out)",
                    removed,
                )
        self.leases.forget_old(now)
        self.stats.sweeps += 1
        return removed_total

    def _notice_outage(self, now: float) -> None:
        """While cut off from NATS nobody is heard, so no lease may run out: they are
        extended at every sweep meanwhile, and once more when NATS is back (a reconnect
        between two sweeps counts too)."""
        reconnects = self._nc.stats["reconnects"]
        connected = self._nc.is_connected
        if connected and reconnects == self._reconnects:
            return
        if not connected and not self._cut_off:
            log.warning("presence: cut off from NATS; gateways' leases are held until it is back")
        self._cut_off = not connected
        self._reconnects = reconnects
        self.leases.extend_all(now)
        if connected:
            log.info("presence: NATS is back; every lease extended by the grace period")

    async def _sweep_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wake.wait(), sweep_interval(self.leases.shortest_lease_s)
                )
            self._wake.clear()
            try:
                await self.sweep()
            except Exception:  # never let the sweeper die
                log.exception("presence sweep failed")

    async def _on_presence(self, msg: Msg) -> None:
        try:
            presence = read_presence(msg.data)
        except InvalidEnvelope as exc:
            self.stats.garbage += 1
            log.warning("dropped a presence announcement (%d bytes): %s", len(msg.data), exc)
            return
        if not subjects.sent_by(msg.subject, presence.gateway_id):
            self.stats.impostors += 1
            log.warning(
                "dropped a presence announcement for gateway %s that came on %s",
                presence.gateway_id,
                msg.subject[:200],
            )
            return
        self.stats.announcements += 1
        self.leases.heard(
            presence.gateway_id, presence.lease_ms / 1000, presence.leaving, self._clock()
        )
        if presence.leaving:
            log.info("gateway %s is leaving", presence.gateway_id)
            self._wake.set()  # its leftovers go now, not at the next sweep
