"""The worker's side of alarms: take AlarmEvents from NATS, run the app's alarm handlers,
answer with an AlarmResult.

For each namespace with a handler (``App.on_alarm``) the runner subscribes to
``<prefix>.alarm.<namespace>`` in queue group ``alarms-<namespace>``, so each alarm goes to
one worker of the namespace. The state service keeps the alarm until an ``ok`` answer;
anything else (an exception, no answer) makes it retry later, so a handler runs at least
once and may run again after a crash or a lost answer.

Each run has its own output gate keyed ``alarm:<firing_id>``: its storage writes carry
idempotency keys that a retry of the same firing reuses, and ``ok`` is answered only once
those writes are durable.

The alarms of a durable object class's namespace are not run here: each is a turn of its
object's activation (:mod:`wsgate.worker.activations`), which answers once the turn committed.
The runner also takes those forwarded to this worker, the holder of their object's
activation, on ``<prefix>.worker.<worker_id>.alarm``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from wsgate import envelopes, subjects
from wsgate.errors import InvalidEnvelope
from wsgate.supervision import OVERDUE_TASK_WAIT_S, cancel_and_wait
from wsgate.v1 import envelope_pb2 as pb
from wsgate.worker.alarms_client import AlarmInfo
from wsgate.worker.app import AlarmHandler, App
from wsgate.worker.env import Env
from wsgate.worker.gate import OutputGate, current_gate
from wsgate.worker.work import Work

if TYPE_CHECKING:
    from wsgate.worker.activations import Activations
    from wsgate.worker.durable import DurableObject

log = logging.getLogger(__name__)

#: An AlarmResult's error (what the state service logs) is cut to this many characters.
MAX_ERROR_CHARS = 1000


class AlarmRunner:
    """Runs ``app``'s alarm handlers for AlarmEvents on ``nc``.

    :meth:`start` subscribes (nothing if the app has no alarm handler); :meth:`close`
    unsubscribes, lets running handlers finish and answer for up to ``drain_timeout_s``,
    then cancels the rest (their alarms are retried by the state service). At most
    ``max_concurrent`` handlers run at once; more alarms wait in NATS' buffer. A message
    that is no alarm of a namespace with a handler (see :func:`wsgate.envelopes.read_alarm_event`)
    is answered as failed, if it has a reply subject, and reported to ``on_garbage``.
    """

    def __init__(
        self,
        nc: NatsClient,
        app: App,
        env: Env,
        *,
        prefix: str,
        max_concurrent: int,
        drain_timeout_s: float,
        activations: Activations | None = None,
        worker_id: str = "",
        on_garbage: Callable[[], None] = lambda: None,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self._nc = nc
        self._on_garbage = on_garbage
        self._handlers = dict(app.alarm_handlers)
        self._env = env
        self._prefix = prefix
        self._slots = asyncio.Semaphore(max_concurrent)
        self._drain_timeout_s = drain_timeout_s
        self._subscriptions: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._activations = activations
        self._worker_id = worker_id

    @property
    def namespaces(self) -> tuple[str, ...]:
        """The namespaces whose alarms this runner takes."""
        return tuple(self._handlers)

    async def start(self) -> None:
        """Subscribe for every namespace with a handler, and make sure NATS has the
        subscriptions before returning (so the worker is ready when it says so)."""
        for namespace in self._handlers:
            self._subscriptions.append(
                await self._nc.subscribe(
                    subjects.alarm_subject(self._prefix, namespace),
                    queue=subjects.alarm_queue(namespace),
                    cb=self._take,
                )
            )
        if self._subscriptions and self._activations is not None and self._worker_id:
            self._subscriptions.append(
                await self._nc.subscribe(
                    subjects.worker_subject(self._prefix, self._worker_id, "alarm"),
                    cb=self._take,
                )
            )
        if self._subscriptions:
            await self._nc.flush()
            log.info("running alarms of %d namespace(s)", len(self._handlers))

    async def close(self) -> None:
        """Stop taking alarms, wait for running handlers (up to the drain timeout), cancel
        the rest. Idempotent; NATS must still be open (handlers answer on it)."""
        if self._closed:
            return
        self._closed = True
        for sub in self._subscriptions:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        self._subscriptions.clear()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=self._drain_timeout_s)
            # Awaited once cancelled (each answers "cancelled"), bounded: one that ignores
            # its cancellation is logged and left.
            await cancel_and_wait(pending, OVERDUE_TASK_WAIT_S, "alarm handler task", log)

    async def _take(self, msg: Msg) -> None:
        """NATS callback (one message at a time per subscription): waiting for a slot here
        is what pushes back when too many handlers run."""
        try:
            event = envelopes.read_alarm_event(msg.data)
            handler = self._handlers.get(event.namespace)
            if handler is None:
                raise InvalidEnvelope("AlarmEvent", f"no handler for {event.namespace[:80]!r}")
            if not msg.reply:
                raise InvalidEnvelope("AlarmEvent", "no reply subject")
        except InvalidEnvelope as exc:
            self._on_garbage()
            log.warning("dropped an alarm event (%d bytes): %s", len(msg.data), exc)
            if msg.reply:
                # The protocol's error answer: the state service retries with backoff.
                failed = pb.AlarmResult(ok=False, error=str(exc)[:MAX_ERROR_CHARS])
                with contextlib.suppress(nats.errors.Error):
                    await msg.respond(failed.SerializeToString())
            return
        await self._slots.acquire()
        if self._closed:  # taken while closing: let another worker have it soon
            self._slots.release()
            with contextlib.suppress(nats.errors.Error):
                await msg.respond(
                    pb.AlarmResult(ok=False, error="worker shutting down").SerializeToString()
                )
            return
        durable_class = getattr(handler, "durable_class", None)
        if durable_class is not None and self._activations is not None:
            coro = self._run_as_turn(Work.for_alarm(msg, event), durable_class, event.name)
        else:
            # A Task per alarm: its context (and so its output gate) is its own.
            coro = self._run(msg, event, handler)
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _run_as_turn(self, work: Work, cls: type[DurableObject], name: str) -> None:
        assert self._activations is not None
        self._activations.submit(cls, name, work)
        await work.done

    async def _run(self, msg: Msg, event: pb.AlarmEvent, handler: AlarmHandler) -> None:
        gate = OutputGate(f"alarm:{event.firing_id}")
        current_gate.set(gate)
        info = AlarmInfo(
            namespace=event.namespace,
            name=event.name,
            scheduled_ms=event.scheduled_ms,
            retry_count=event.retry_count,
            firing_id=event.firing_id,
            env=self._env,
        )
        try:
            await handler(info)
            # "ok" deletes the alarm: only once what the handler wrote is durable.
            await gate.open()
            result = pb.AlarmResult(ok=True)
        except asyncio.CancelledError:
            # Cut off by the drain timeout: say so, so that the state service retries now
            # rather than after its alarm timeout.
            gate.abandon()
            failed = pb.AlarmResult(ok=False, error="cancelled: the worker shut down")
            with contextlib.suppress(nats.errors.Error):
                await msg.respond(failed.SerializeToString())
            raise
        except Exception as exc:
            gate.abandon()
            log.exception(
                "alarm handler failed for %r/%r (retry %d)",
                event.namespace,
                event.name,
                event.retry_count,
            )
            result = pb.AlarmResult(
                ok=False, error=f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
            )
        try:
            await msg.respond(result.SerializeToString())
        except nats.errors.Error as exc:
            # The state service times out and tries again: at least once, maybe twice.
            log.warning("answer to the alarm of %r/%r lost: %r", event.namespace, event.name, exc)
