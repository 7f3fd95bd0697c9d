"""Durable objects' alarms, as handlers use them.

::

    @app.on_alarm("room")
    async def tick(alarm: AlarmInfo) -> None:
        await alarm.storage.put("last_tick", alarm.scheduled_ms)
        await alarm.alarm.set(time.time() + 60)     # again in a minute

    # from any handler:
    await conn.env.alarm("room", "lobby").set(datetime.now(UTC) + timedelta(seconds=30))

An object has at most one alarm; setting it replaces the previous one. At its time one
worker runs the namespace's alarm handler (registered with ``App.on_alarm``), at least once:
a handler that raises (or outlives the state service's alarm timeout) is retried with
exponential backoff, with :attr:`AlarmInfo.retry_count` one higher each time, and given up
after the configured number of retries (6 by default, as on Cloudflare).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from wsgate.v1 import state_pb2 as pb

if TYPE_CHECKING:
    from wsgate.worker.env import Env
    from wsgate.worker.object_storage import ObjectStorage
    from wsgate.worker.state_client import StateClient

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
#: The wire's int64 milliseconds, as a range of seconds a float may name.
_MAX_ABS_SECONDS = (2**63 - 1) / 1000


def to_epoch_ms(when: datetime | float) -> int:
    """Milliseconds since the Unix epoch of ``when``: an aware datetime, or seconds since
    the epoch (as ``time.time()`` gives).

    Raises ValueError for a naive datetime (its time zone would be a guess) or a
    non-finite number, TypeError for anything else (bool included).
    """
    if isinstance(when, datetime):
        if when.tzinfo is None or when.utcoffset() is None:
            raise ValueError("alarm time must be an aware datetime (e.g. datetime.now(UTC))")
        # Exact integer arithmetic: no float rounding of far-away times.
        return (when - _EPOCH) // _MS
    if isinstance(when, bool) or not isinstance(when, (int, float)):
        raise TypeError(
            f"alarm time must be a datetime or epoch seconds, not {type(when).__name__}"
        )
    if not math.isfinite(when) or abs(when) > _MAX_ABS_SECONDS:
        raise ValueError(f"alarm time out of range: {when!r}")
    return round(when * 1000)


def from_epoch_ms(ms: int) -> datetime:
    """The aware (UTC) datetime ``ms`` milliseconds after the Unix epoch."""
    return _EPOCH + timedelta(milliseconds=ms)


class ObjectAlarm:
    """The alarm of one durable object. Cheap to make; each method is one call to the
    state service and raises StateUnavailable, StateTimeout or InvalidObjectId (an empty
    namespace) like storage calls do."""

    def __init__(self, client: StateClient, namespace: str, name: str) -> None:
        self._client = client
        self.namespace = namespace
        self.name = name
        self._object = pb.ObjectId(namespace=namespace, name=name)

    def __repr__(self) -> str:
        return f"<ObjectAlarm {self.namespace!r}/{self.name!r}>"

    async def get_ms(self) -> int | None:
        """The alarm's time in milliseconds since the epoch, or None if none is set.

        Inside the object's own alarm handler this is None (the alarm is running) unless
        the handler has set a new one, as on Cloudflare.
        """
        response = await self._client.alarms.get(pb.GetAlarmRequest(object=self._object))
        return int(response.at_ms) if response.set else None

    async def get(self) -> datetime | None:
        """The alarm's time as an aware UTC datetime, or None (see :meth:`get_ms`)."""
        ms = await self.get_ms()
        return None if ms is None else from_epoch_ms(ms)

    async def set(self, when: datetime | float) -> None:
        """Set the alarm to ``when`` (an aware datetime or epoch seconds), replacing any
        previous one; a time in the past fires at once. Durable once this returns.

        Raises ValueError or TypeError for a bad ``when`` (see :func:`to_epoch_ms`),
        before any call.
        """
        request = pb.SetAlarmRequest(object=self._object, at_ms=to_epoch_ms(when))
        await self._client.alarms.set(request)

    async def delete(self) -> bool:
        """Remove the alarm; returns whether there was one. Durable once this returns.

        Called in the object's alarm handler, it also stops that firing from being retried
        if the handler then fails.
        """
        response = await self._client.alarms.delete(pb.DeleteAlarmRequest(object=self._object))
        return bool(response.deleted)


@dataclass(frozen=True)
class AlarmInfo:
    """What an alarm handler gets: which object's alarm fired, and for when.

    ``firing_id`` names this firing across its retries (the handler's storage writes
    carry idempotency keys derived from it, so a retry applies each of them once).
    """

    namespace: str
    name: str
    #: The time the alarm was set for, in milliseconds since the Unix epoch.
    scheduled_ms: int
    #: 0 on the first try, then the number of failed tries before this one.
    retry_count: int
    firing_id: str
    env: Env

    @property
    def scheduled_time(self) -> datetime:
        """The time the alarm was set for, as an aware UTC datetime."""
        return from_epoch_ms(self.scheduled_ms)

    @property
    def is_retry(self) -> bool:
        """Whether an earlier try of this firing failed (Cloudflare's ``isRetry``)."""
        return self.retry_count > 0

    @property
    def storage(self) -> ObjectStorage:
        """The object's storage."""
        return self.env.storage(self.namespace, self.name)

    @property
    def alarm(self) -> ObjectAlarm:
        """The object's alarm, to set the next one."""
        return self.env.alarm(self.namespace, self.name)
