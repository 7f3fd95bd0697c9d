"""The gateway's lease on its connections' memberships.

Every ``presence_interval_s`` the gateway publishes ``wsgate.v1.GatewayPresence`` (its id
and a lease of :data:`LEASE_INTERVALS` intervals) on its own presence subject,
``<prefix>.presence.<node>.<gateway_id>`` (NATS lets its identity publish there only). The state
service removes every member of a gateway from every object once its lease has run out
without a renewal (the gateway died, e.g. ``kill -9``, and sent no close events), or at
once when the gateway announces that it is leaving, which it does at the end of its
drain, after its connections are closed and their close events delivered.

Consequence for operators: a gateway cut off from NATS for longer than its lease (5
presence intervals, 10 s by default) may have lost its members' memberships, although
its sockets stayed open; the app sees those connections in no object until they join
again. A lease of several intervals lets announcements be lost or late now and then.
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors

from wsgate import subjects
from wsgate.bus import Bus
from wsgate.supervision import Spawn, stop_task, unsupervised
from wsgate.v1 import envelope_pb2 as pb

log = logging.getLogger(__name__)

#: A lease lasts this many presence intervals.
LEASE_INTERVALS = 5

#: The largest lease the wire carries (a uint32 of milliseconds).
_MAX_LEASE_MS = 2**32 - 1

#: How long the leaving announcement may take to reach NATS at close.
LEAVING_FLUSH_TIMEOUT_S = 2


def lease_ms(interval_s: float) -> int:
    """The lease announced for a presence interval: :data:`LEASE_INTERVALS` of them."""
    return min(max(round(interval_s * LEASE_INTERVALS * 1000), 1), _MAX_LEASE_MS)


class PresenceAnnouncer:
    """Announces one gateway on its presence subject every ``interval_s``.

    :meth:`start` announces at once, then periodically; :meth:`close` stops and announces
    ``leaving`` (call it after the gateway's connections are closed and their close events
    delivered, before NATS is drained). Announcements that cannot be published (NATS is
    away) are logged and skipped; the next one renews the lease.
    """

    def __init__(self, nc: Bus, prefix: str, gateway_id: str, interval_s: float) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._nc = nc
        self._subject = subjects.presence_subject(prefix, gateway_id)
        self._interval_s = interval_s
        self._alive = pb.GatewayPresence(
            gateway_id=gateway_id, lease_ms=lease_ms(interval_s)
        ).SerializeToString()
        self._leaving = pb.GatewayPresence(gateway_id=gateway_id, leaving=True).SerializeToString()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: Announcements published so far (the leaving one included).
        self.announcements = 0

    def start(self, spawn: Spawn = unsupervised) -> None:
        """Start announcing (the first announcement goes at once), with ``spawn``."""
        if self._task is None and not self._closed:
            self._task = spawn("presence", self._run())

    async def close(self) -> None:
        """Stop announcing and say that this gateway is leaving. Idempotent."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        await stop_task(task)
        if not self._nc.is_connected:
            # Not now: the lease runs out on its own, and the drain is not held up.
            log.info("NATS is away: not announcing leaving; the lease will run out")
            return
        try:
            await self._nc.publish(self._subject, self._leaving)
            await self._nc.flush(timeout=LEAVING_FLUSH_TIMEOUT_S)
            self.announcements += 1
        except (TimeoutError, nats.errors.Error) as exc:
            # The lease then runs out on its own; the members go a little later.
            log.warning("could not announce leaving: %r", exc)

    async def _run(self) -> None:
        while True:
            try:
                await self._nc.publish(self._subject, self._alive)
                self.announcements += 1
            except nats.errors.Error as exc:
                log.warning("presence announcement not published: %r", exc)
            # A period, not a wait for an event: the lease is renewed on a clock.
            await asyncio.sleep(self._interval_s)
