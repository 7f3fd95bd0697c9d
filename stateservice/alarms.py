"""Alarms: one per durable object; at its time a worker runs the namespace's alarm handler.

As in Cloudflare Durable Objects: ``SetAlarm`` replaces the object's alarm, ``GetAlarm``
reads it, ``DeleteAlarm`` removes it. At the alarm's time the scheduler here sends an
``AlarmEvent`` as a NATS request on ``<prefix>.alarm.<namespace>``, taken by one worker of
the namespace's queue group, and waits for its ``AlarmResult``:

- **ok**: the alarm is deleted, unless the handler (or anyone) set a new one meanwhile.
  Every ``SetAlarm`` draws a new ``firing_id``, so "what fired is still what is stored"
  is one comparison of ids, exact even when the new alarm has the same time.
- **failed** (the handler raised, or no answer within ``alarm_timeout_s``): retried after
  ``alarm_first_backoff_s``, doubling up to ``alarm_max_backoff_s``, with ``retry_count``
  one higher and the same ``firing_id`` (the handler's writes carry idempotency keys
  derived from it). After ``alarm_max_retries`` retries the alarm is dropped and logged.
- **undelivered** (no worker subscribed for the namespace, or NATS unreachable): retried
  with the same backoff, but ``retry_count`` is unchanged and the alarm is never dropped
  for it: the handler did not run, so nothing failed, and an alarm must outlive a
  deployment that briefly has no worker for its namespace.

Delivery is at least once. The alarm row is only changed *after* the outcome is known, and
every change is a durable SQLite write: if the state service dies at any point, the row is
still there, due, and fires again when it restarts (alarms due at start fire at once). A
handler that finished but whose answer was lost, or that outlived the timeout, runs again.

Timing: the scheduler sleeps until the earliest stored alarm (woken early when a
``SetAlarm`` sets an earlier one) and fires every due alarm, at most
:data:`MAX_CONCURRENT_FIRINGS` at once. An alarm never fires before its time (wall clock,
milliseconds since the Unix epoch). An object's alarm never runs twice at once from one
state service: an alarm set while the object's previous one is firing waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.errors
from nats.aio.client import Client as NatsClient

from wsgate.clock import now_ms
from wsgate.config import StateConfig
from wsgate.envelopes import read_alarm_result
from wsgate.errors import InvalidEnvelope, InvalidObjectId, ObjectActive
from wsgate.stateservice.component import StateContext
from wsgate.stateservice.leases import ObjectLeases
from wsgate.stateservice.ownership import Ownership
from wsgate.stateservice.quotas import Quotas
from wsgate.stateservice.rpc import object_id, refuse, refuse_active, require_owner, stored
from wsgate.stateservice.storage import DATABASE_ERRORS, ObjectId, Operation, Sql, Storage
from wsgate.subjects import alarm_subject
from wsgate.supervision import Spawn, stop_task, unsupervised
from wsgate.v1 import envelope_pb2 as envelope_pb
from wsgate.v1 import state_pb2 as pb
from wsgate.v1 import state_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")


#: Rows read at a time while looking past other replicas' alarms for this one's.
OWNED_SCAN_PAGE = 512
#: Alarms firing at once (awaiting their workers' answers); more due ones wait their turn.
MAX_CONCURRENT_FIRINGS = 128
#: The scheduler looks at the clock at least this often, so a jump of the wall clock (NTP)
#: delays nothing for long.
MAX_SLEEP_S = 30.0
#: After a storage failure the scheduler waits this long before it tries again, instead
#: of spinning on a broken disk.
ERROR_PAUSE_S = 1.0
#: An AlarmResult's error is cut to this many characters in the log.
MAX_LOGGED_ERROR_CHARS = 2000


def new_firing_id() -> str:
    """A fresh firing id: 128 random bits, hex (safe in idempotency keys and logs)."""
    return uuid.uuid4().hex


# -- stored alarms and their operations ---------------------------------------------------


@dataclass(frozen=True)
class StoredAlarm:
    """One row of the alarms table."""

    namespace: str
    name: str
    scheduled_ms: int
    at_ms: int
    retry_count: int
    backoff_step: int
    firing_id: str

    @property
    def key(self) -> tuple[str, str]:
        """The object, as a dictionary key."""
        return (self.namespace, self.name)


_COLUMNS = "namespace, name, scheduled_ms, at_ms, retry_count, backoff_step, firing_id"


def _row(row: tuple[Any, ...]) -> StoredAlarm:
    return StoredAlarm(*row)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: the n-th try that did not succeed (n from 0) waits
    ``first_ms * 2**n``, at most ``max_ms``; a failing handler is retried ``max_retries``
    times, then given up."""

    first_ms: int
    max_ms: int
    max_retries: int

    @classmethod
    def from_config(cls, config: StateConfig) -> RetryPolicy:
        """The policy a state service is configured with."""
        return cls(
            first_ms=max(1, round(config.alarm_first_backoff_s * 1000)),
            max_ms=max(1, round(config.alarm_max_backoff_s * 1000)),
            max_retries=config.alarm_max_retries,
        )

    def delay_ms(self, step: int) -> int:
        """The wait after the ``step``-th unsuccessful try (0-based)."""
        # Capping the exponent keeps the integer small; 2**40 ms is already 35 years.
        return min(self.max_ms, self.first_ms << min(max(step, 0), 40))


@dataclass(frozen=True)
class PutAlarm:
    """Set (or replace) an object's alarm as a new firing: retries start from zero."""

    obj: ObjectId
    at_ms: int
    firing_id: str
    writes = True

    def __call__(self, conn: Sql) -> None:
        conn.execute(
            f"INSERT INTO alarms ({_COLUMNS}) VALUES (?, ?, ?, ?, 0, 0, ?) "
            "ON CONFLICT (namespace, name) DO UPDATE SET "
            "scheduled_ms = excluded.scheduled_ms, at_ms = excluded.at_ms, retry_count = 0, "
            "backoff_step = 0, firing_id = excluded.firing_id",
            (self.obj.namespace, self.obj.name, self.at_ms, self.at_ms, self.firing_id),
        )


@dataclass(frozen=True)
class ReadAlarm:
    """An object's alarm, or None."""

    obj: ObjectId
    writes = False

    def __call__(self, conn: Sql) -> StoredAlarm | None:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM alarms WHERE namespace = ? AND name = ?",
            (self.obj.namespace, self.obj.name),
        ).fetchone()
        return None if row is None else _row(row)


@dataclass(frozen=True)
class RemoveAlarm:
    """Delete an object's alarm; returns whether it had one."""

    obj: ObjectId
    writes = True

    def __call__(self, conn: Sql) -> bool:
        cursor = conn.execute(
            "DELETE FROM alarms WHERE namespace = ? AND name = ?",
            (self.obj.namespace, self.obj.name),
        )
        return cursor.rowcount > 0


@dataclass(frozen=True)
class EarliestAlarms:
    """The ``limit`` alarms with the earliest next try, earliest first; with ``after`` (an
    ``(at_ms, namespace, name)`` of a row read before), those that come after it."""

    limit: int
    after: tuple[int, str, str] | None = None
    writes = False

    def __call__(self, conn: Sql) -> list[StoredAlarm]:
        if self.after is None:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM alarms ORDER BY at_ms, namespace, name LIMIT ?",
                (self.limit,),
            ).fetchall()
        else:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM alarms WHERE (at_ms, namespace, name) > (?, ?, ?) "
                "ORDER BY at_ms, namespace, name LIMIT ?",
                (*self.after, self.limit),
            ).fetchall()
        return [_row(row) for row in rows]


@dataclass(frozen=True)
class FinishAlarm:
    """The firing ``firing_id`` succeeded: delete the alarm if it is still that firing (a
    new alarm set meanwhile stays). Returns whether it was deleted."""

    obj: ObjectId
    firing_id: str
    writes = True

    def __call__(self, conn: Sql) -> bool:
        cursor = conn.execute(
            "DELETE FROM alarms WHERE namespace = ? AND name = ? AND firing_id = ?",
            (self.obj.namespace, self.obj.name, self.firing_id),
        )
        return cursor.rowcount > 0


class RetryOutcome(enum.Enum):
    """What :class:`RetryAlarm` did."""

    RESCHEDULED = "rescheduled"
    GAVE_UP = "gave_up"  # the alarm was deleted: retries exhausted
    REPLACED = "replaced"  # the alarm was set again or deleted meanwhile: nothing to retry


@dataclass(frozen=True)
class Retried:
    """The outcome of :class:`RetryAlarm`, with the alarm's next try when rescheduled."""

    outcome: RetryOutcome
    at_ms: int = 0
    retry_count: int = 0


@dataclass(frozen=True)
class RetryAlarm:
    """The firing ``firing_id`` did not succeed at ``now_ms``: schedule its next try.

    ``counted``: the handler ran (or may have) and failed, so ``retry_count`` grows and
    the firing is given up after ``policy.max_retries`` retries; otherwise (undelivered)
    only the backoff grows.
    """

    obj: ObjectId
    firing_id: str
    now_ms: int
    counted: bool
    policy: RetryPolicy
    writes = True

    def __call__(self, conn: Sql) -> Retried:
        row = conn.execute(
            "SELECT retry_count, backoff_step, firing_id FROM alarms "
            "WHERE namespace = ? AND name = ?",
            (self.obj.namespace, self.obj.name),
        ).fetchone()
        if row is None or row[2] != self.firing_id:
            return Retried(RetryOutcome.REPLACED)
        retry_count, step = int(row[0]), int(row[1])
        if self.counted and retry_count >= self.policy.max_retries:
            conn.execute(
                "DELETE FROM alarms WHERE namespace = ? AND name = ?",
                (self.obj.namespace, self.obj.name),
            )
            return Retried(RetryOutcome.GAVE_UP, retry_count=retry_count)
        at_ms = self.now_ms + self.policy.delay_ms(step)
        retry_count += 1 if self.counted else 0
        conn.execute(
            "UPDATE alarms SET at_ms = ?, retry_count = ?, backoff_step = ? "
            "WHERE namespace = ? AND name = ?",
            (at_ms, retry_count, step + 1, self.obj.namespace, self.obj.name),
        )
        return Retried(RetryOutcome.RESCHEDULED, at_ms=at_ms, retry_count=retry_count)


# -- the scheduler -----------------------------------------------------------------------


class Delivery(enum.Enum):
    """How one try of an alarm ended."""

    OK = "ok"
    FAILED = "failed"  # the handler raised, timed out, or answered garbage
    UNDELIVERED = "undelivered"  # no worker took it: the handler did not run


class AlarmScheduler:
    """Fires stored alarms when they are due, on NATS; see the module's docstring.

    :meth:`start` starts the loop (alarms already due fire at once); :meth:`close` stops it
    and abandons the firings in flight: their alarms stay stored and fire again after a
    restart. :meth:`alarm_set` must be told about every SetAlarm once it is durable.
    """

    def __init__(
        self,
        storage: Storage,
        nc: NatsClient,
        config: StateConfig,
        *,
        max_concurrent: int = MAX_CONCURRENT_FIRINGS,
        owns: Callable[[ObjectId], bool] | None = None,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self._storage = storage
        self._owns = owns
        self._nc = nc
        self._prefix = config.prefix
        self._timeout_s = config.alarm_timeout_s
        self._policy = RetryPolicy.from_config(config)
        self._max_concurrent = max_concurrent
        #: object -> firing id of the alarms being fired now.
        self._in_flight: dict[tuple[str, str], str] = {}
        self._firings: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        # The loop's next planned look at the table (ms), and whether it is reading it
        # now: a SetAlarm before the planned time, or during the read (which may not see
        # it), wakes the loop.
        self._planned_ms: float = float("inf")
        self._reading = False
        self._task: asyncio.Task[None] | None = None
        #: Answers to alarm events that were no AlarmResult (each failed the firing).
        self.garbage = 0

    def start(self, spawn: Spawn = unsupervised) -> None:
        """Start the loop (with ``spawn``). Call once, on the event loop."""
        if self._task is None:
            self._task = spawn("alarm_scheduler", self._run())

    async def close(self) -> None:
        """Stop the loop and the firings in flight (their alarms stay stored). Idempotent."""
        tasks = [t for t in (self._task, *self._firings) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            await stop_task(task)

    def alarm_set(self, at_ms: int) -> None:
        """A SetAlarm for ``at_ms`` is durable: look again if it is due before the plan."""
        if self._reading or at_ms < self._planned_ms:
            self._wake.set()

    def firing_id_in_flight(self, obj: ObjectId) -> str | None:
        """The firing id of ``obj``'s alarm if its handler is being run now."""
        return self._in_flight.get((obj.namespace, obj.name))

    @property
    def in_flight(self) -> int:
        """How many alarms are firing now."""
        return len(self._in_flight)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            self._reading = True
            free = self._max_concurrent - len(self._in_flight)
            try:
                # In-flight alarms are still stored (and due): read past them.
                rows = await self._earliest_owned(len(self._in_flight) + free + 1)
            except (*DATABASE_ERRORS, RuntimeError):
                log.exception("reading alarms failed; trying again in %g s", ERROR_PAUSE_S)
                rows = None
            finally:
                self._reading = False
            if rows is None:
                await asyncio.sleep(ERROR_PAUSE_S)
                continue
            now = now_ms()
            planned: float = float("inf")
            for alarm in rows:
                if alarm.key in self._in_flight:
                    continue  # a firing's end wakes the loop, which then sees its successor
                if alarm.at_ms > now:
                    planned = alarm.at_ms
                    break
                if free == 0:
                    break  # the next firing to end wakes the loop
                free -= 1
                self._dispatch(alarm)
            self._planned_ms = planned
            delay_s = MAX_SLEEP_S if planned == float("inf") else (planned - now_ms()) / 1000
            # At least 1 ms: timers may fire a little early, and the loop re-checks the
            # time anyway (an alarm never fires before its time).
            delay_s = min(max(delay_s, 0.001), MAX_SLEEP_S)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await self._wake.wait()

    async def _earliest_owned(self, limit: int) -> list[StoredAlarm]:
        """The ``limit`` earliest alarms of the objects this replica owns (all of them when
        it is alone), read a page at a time past the other replicas' alarms."""
        owns = self._owns
        if owns is None:
            return await self._storage.run(EarliestAlarms(limit))
        page = max(limit, OWNED_SCAN_PAGE)
        found: list[StoredAlarm] = []
        after: tuple[int, str, str] | None = None
        while len(found) < limit:
            rows = await self._storage.run(EarliestAlarms(page, after))
            found.extend(a for a in rows if owns(ObjectId(a.namespace, a.name)))
            if len(rows) < page:
                break
            last = rows[-1]
            after = (last.at_ms, last.namespace, last.name)
        return found[:limit]

    def wake(self) -> None:
        """Look at the table again now (the objects this replica owns changed)."""
        self._wake.set()

    def _dispatch(self, alarm: StoredAlarm) -> None:
        self._in_flight[alarm.key] = alarm.firing_id
        task = asyncio.get_running_loop().create_task(self._fire(alarm))
        self._firings.add(task)
        task.add_done_callback(self._firings.discard)

    async def _fire(self, alarm: StoredAlarm) -> None:
        try:
            delivery, error = await self._deliver(alarm)
            await self._settle(alarm, delivery, error)
        except Exception:
            # The row was not changed: the alarm is still due and fires again, after a pause
            # so that a broken disk does not turn into a storm of handler runs.
            log.exception("settling the alarm of %r/%r failed", alarm.namespace, alarm.name)
            await asyncio.sleep(ERROR_PAUSE_S)
        finally:
            self._in_flight.pop(alarm.key, None)
            self._wake.set()

    async def _deliver(self, alarm: StoredAlarm) -> tuple[Delivery, str]:
        """Send one try and wait for its answer."""
        if not self._nc.is_connected:
            return Delivery.UNDELIVERED, "NATS is not connected"
        event = envelope_pb.AlarmEvent(
            namespace=alarm.namespace,
            name=alarm.name,
            scheduled_ms=alarm.scheduled_ms,
            retry_count=alarm.retry_count,
            firing_id=alarm.firing_id,
        )
        subject = alarm_subject(self._prefix, alarm.namespace)
        try:
            reply = await self._nc.request(
                subject, event.SerializeToString(), timeout=self._timeout_s
            )
        except nats.errors.NoRespondersError:
            return Delivery.UNDELIVERED, "no worker runs this namespace's alarms"
        except nats.errors.TimeoutError:
            if not self._nc.is_connected:
                # Lost with the connection; most likely the handler never saw it.
                return Delivery.UNDELIVERED, "NATS disconnected while waiting"
            return Delivery.FAILED, f"no answer within {self._timeout_s:g} s"
        except nats.errors.Error as exc:  # closed, draining, reconnecting: not sent
            return Delivery.UNDELIVERED, f"not sent: {exc!r}"
        try:
            result = read_alarm_result(reply.data)
        except InvalidEnvelope as exc:
            self.garbage += 1
            return Delivery.FAILED, f"unreadable answer: {exc}"
        if result.ok:
            return Delivery.OK, ""
        return Delivery.FAILED, result.error or "the handler failed"

    async def _settle(self, alarm: StoredAlarm, delivery: Delivery, error: str) -> None:
        obj = ObjectId(alarm.namespace, alarm.name)
        where = f"{alarm.namespace!r}/{alarm.name!r}"
        if delivery is Delivery.OK:
            deleted = await self._storage.run(FinishAlarm(obj, alarm.firing_id))
            log.debug("alarm of %s ran%s", where, "" if deleted else "; a new one is set")
            return
        retried = await self._storage.run(
            RetryAlarm(obj, alarm.firing_id, now_ms(), delivery is Delivery.FAILED, self._policy)
        )
        error = error[:MAX_LOGGED_ERROR_CHARS]
        if retried.outcome is RetryOutcome.GAVE_UP:
            log.error(
                "alarm of %s (firing %s) dropped after %d retries; last error: %s",
                where,
                alarm.firing_id,
                retried.retry_count,
                error,
            )
        elif retried.outcome is RetryOutcome.RESCHEDULED:
            # Undelivered tries are routine while a namespace has no worker: keep them quiet.
            level = logging.WARNING if delivery is Delivery.FAILED else logging.INFO
            log.log(
                level,
                "alarm of %s %s (%s); next try in %d ms (retry %d)",
                where,
                delivery.value,
                error,
                retried.at_ms - now_ms(),
                retried.retry_count,
            )


# -- the gRPC service --------------------------------------------------------------------


class AlarmsServicer(state_pb2_grpc.AlarmsServicer):
    """``wsgate.v1.Alarms``: SetAlarm is durable when answered; GetAlarm, as in Cloudflare,
    reports no alarm while the object's alarm handler runs, unless a new alarm was set."""

    def __init__(
        self,
        storage: Storage,
        scheduler: AlarmScheduler,
        leases: ObjectLeases,
        ownership: Ownership | None = None,
        quotas: Quotas | None = None,
    ) -> None:
        self._ownership = ownership
        #: Object names are checked against its limit (None: not checked).
        self._quotas = quotas
        self._storage = storage
        self._scheduler = scheduler
        self._leases = leases

    async def SetAlarm(self, request: pb.SetAlarmRequest, context: Any) -> pb.SetAlarmResponse:
        """Replace the object's alarm with one at ``at_ms`` (a past time fires at once)."""
        obj = await self._object(context, request.object)
        await require_owner(context, self._ownership, obj)
        await self._outside_write(context, obj, PutAlarm(obj, request.at_ms, new_firing_id()))
        self._scheduler.alarm_set(request.at_ms)
        return pb.SetAlarmResponse()

    async def GetAlarm(self, request: pb.GetAlarmRequest, context: Any) -> pb.GetAlarmResponse:
        """The object's alarm time (the one set, not a retry's)."""
        obj = await self._object(context, request.object)
        await require_owner(context, self._ownership, obj)
        alarm = await stored(context, self._storage.run(ReadAlarm(obj)))
        if alarm is None or alarm.firing_id == self._scheduler.firing_id_in_flight(obj):
            return pb.GetAlarmResponse(set=False)
        return pb.GetAlarmResponse(set=True, at_ms=alarm.scheduled_ms)

    async def DeleteAlarm(
        self, request: pb.DeleteAlarmRequest, context: Any
    ) -> pb.DeleteAlarmResponse:
        """Delete the object's alarm. Deleted while its handler runs, a failing handler is
        not retried."""
        obj = await self._object(context, request.object)
        await require_owner(context, self._ownership, obj)
        deleted = await self._outside_write(context, obj, RemoveAlarm(obj))
        return pb.DeleteAlarmResponse(deleted=deleted)

    async def _outside_write(self, context: Any, obj: ObjectId, op: Operation[T]) -> T:
        """Store ``op`` unless an activation holds the object (FAILED_PRECONDITION): its
        alarm is then set and deleted by its own turns."""
        await stored(context, self._leases.check_outside_writes([obj]))
        try:
            self._leases.admit_outside_write(obj, time.monotonic())
        except ObjectActive as exc:
            await refuse_active(context, exc)
        return await stored(context, self._storage.submit(op))

    async def _object(self, context: Any, message: pb.ObjectId) -> ObjectId:
        try:
            if self._quotas is not None:
                return self._quotas.object_id(message)
            return object_id(message)
        except InvalidObjectId as exc:
            await refuse(context, exc)


class AlarmsComponent:
    """The alarms part of the state service: its gRPC service and its scheduler."""

    def __init__(self, context: StateContext) -> None:
        self.context = context
        ownership = context.ownership
        self.scheduler = AlarmScheduler(
            context.storage,
            context.nc,
            context.config,
            owns=None if ownership.alone else ownership.owns,
        )
        # Objects that moved here may have alarms due: look at once.
        ownership.listeners.append(lambda _live: self.scheduler.wake())
        self.servicer = AlarmsServicer(
            context.storage, self.scheduler, context.leases, context.ownership, context.quotas
        )

    def register(self, server: Any) -> None:
        """Add ``wsgate.v1.Alarms`` to the server."""
        state_pb2_grpc.add_AlarmsServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        """Start firing alarms; those already due (after a restart) fire at once."""
        self.scheduler.start(self.context.spawn)

    async def close(self) -> None:
        """Stop firing; alarms in flight stay stored and fire again after a restart."""
        await self.scheduler.close()
