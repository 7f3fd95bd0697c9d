"""At-least-once delivery of connection events to workers.

An event has a reply subject of its own, ``<prefix>.ack.<gateway_id>.<connection_id>.
<sequence>``, which this gateway subscribes to with a wildcard. The events :meth:`send`
is given in one turn of the event loop go to each subject (the app's events subject, or an
object's host's) as one ``EventBatch`` at the end of the turn (:mod:`wsgate.event_batch`),
with the batch's reply subject ``<prefix>.ack.<gateway_id>.batch.<n>``, where only NATS'
no-responders status comes; a lone event goes as itself, with its own reply subject, as
every event of :meth:`deliver` does. The worker takes each event of a batch as if it had
come alone. A worker answers on the event's own reply subject with progress acks while
its handler runs (or a retry). The final ack (which may carry the messages the handler
sent to the connection) comes as an item of a ``GatewayBatch`` on the gateway's command subject
``<prefix>.gw.<gateway_id>``, after the commands the handler sent and beside the other
items the worker had for this gateway in the same turn of its event loop; the gateway's one
subscription there hands each ack to :meth:`EventDelivery.on_final_ack`, in order. Nothing
on the reply subject carries frames or moves a connection forward, so its order against
the command subject does not matter (docs/architecture.md, "Ordering").
When neither comes within ``ack_timeout_s`` (the worker died or stalled, or the message
was lost), the same event is published again, marked ``redelivered``.

Events of a durable object's connection go to the worker that holds the object's
activation once an ack (or the connect decision) named it: published on that worker's own
subject instead of the queue, they skip a forward. If that worker does not answer (no
responders, no ack in time) or asks for a retry (the object moved), the hint is dropped
and the event goes to the queue again at once, marked ``redelivered``. When no worker
subscribes at all, NATS answers at once with a 503 status and the event is retried after
a short backoff. While NATS is unreachable nothing is published; the delivery waits for
the reconnection. Every sign of a worker (a progress ack) restarts the clock; after
``delivery_timeout_s`` without one, the delivery gives up.

Timeouts are found by one sweep over the waiting events every ``sweep_s``, not by a
timer per event: at thousands of events a second the timers cost more than the sweep.

Two ways to deliver. :meth:`EventDelivery.send` is the common one, and costs no task, no
future and no wake of the caller per event: it queues the event for this turn's batch and
returns; the final
ack, in :meth:`EventDelivery.on_final_ack`, hands ACKED to the session there and then and
has the owner perform the session's actions (the ack's frames queued, then the next
queued event, if any, published the same way), and tells the owner once the session has
nothing in flight (``on_settled``). Only an outcome that needs waiting (a timeout, no
responders, a retry, NATS down) starts a task, which carries on as :meth:`deliver` does
until the session settles. :meth:`EventDelivery.deliver` is a coroutine that returns once
the session has nothing in flight (the ``Closed`` event, whose handler waits for it).

The policy above (deadlines, backoff, the hint, giving up) is each connection's
:class:`~wsgate.gateway.session.Session`'s, on an injected clock: this module is its I/O.
It publishes what the session says, matches the replies to the event in flight, and hands
each outcome (or the sweep's timeout at the session's ack deadline) back to it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Generic, TypeVar

import nats.errors
from nats.aio.msg import Msg

from wsgate import envelopes, event_batch, ids, subjects
from wsgate.bus import Bus, write_now
from wsgate.eager import resume
from wsgate.errors import InvalidEnvelope
from wsgate.gateway.session import Action, Delivered, Event, GaveUp, Publish, Reply, Session
from wsgate.supervision import Spawn, stop_task, unsupervised
from wsgate.v1 import envelope_pb2 as pb

log = logging.getLogger(__name__)

_NO_RESPONDERS = "503"

__all__ = ["EventDelivery", "Reply"]

#: Whoever owns the sessions delivered for (the gateway's connection): handed back to the
#: owner's ``perform`` and ``on_settled``.
OwnerT = TypeVar("OwnerT")


class _Waiting(Generic[OwnerT]):
    """One event waiting for its reply: a coroutine's (``future``), or, sent by
    :meth:`EventDelivery.send`, its owner's (``owner``; ``future`` None)."""

    __slots__ = ("batch", "expires_at", "future", "owner", "session", "worker")

    def __init__(
        self,
        future: asyncio.Future[Reply] | None,
        expires_at: float,
        session: Session,
        owner: OwnerT | None = None,
        batch: int = 0,
    ) -> None:
        self.future = future
        self.expires_at = expires_at
        #: The connection's session: a progress ack is handed to it in place.
        self.session = session
        self.owner = owner
        #: The number of the batch the event went in (0: published by deliver, alone).
        self.batch = batch
        #: The activation's host, as the final ack named it.
        self.worker = ""

    @property
    def open(self) -> bool:
        """Still waiting: a reply is taken. (An owner's entry leaves the table when its
        wait ends; a coroutine's when the coroutine resumes.)"""
        future = self.future
        return future is None or not future.done()


class _Batch:
    """The events :meth:`EventDelivery.send` gathers for one subject in one turn of the
    event loop."""

    __slots__ = ("events", "keys", "number", "size")

    def __init__(self, number: int) -> None:
        self.number = number
        #: Each event, serialized, and its (connection id, sequence), in the order sent.
        self.events: list[bytes] = []
        self.keys: list[tuple[str, int]] = []
        #: The batch's size in bytes, at most (each event with its largest entry overhead).
        self.size = 0


class EventDelivery(Generic[OwnerT]):
    """Delivers events and matches the replies. One per gateway; create it in a running
    event loop, then :meth:`start` the sweep.

    ``on_messages(connection_id, messages)`` receives what a final ack of :meth:`deliver`
    carries, before the delivery it completes returns. Events sent with :meth:`send` are
    their owner's: ``perform(owner, actions)`` performs a session's actions and returns the
    Publish among them, if any (which this then sends); ``on_settled(owner)`` is called each
    time the owner's session is left with nothing in flight. For metrics and logs:
    ``on_redelivery`` for each resend, ``on_stale`` for an ack that came too late,
    ``on_round_trip(seconds)`` for each acknowledged event, ``on_given_up(event)`` for
    each event given up, ``on_garbage(subject)`` for each message that is no valid ack,
    with the kind of subject it came on ("ack", or "command" for a final ack). The caller
    subscribes :meth:`on_reply` to ``ack_wildcard``, hands each final ack of its command
    subject to :meth:`on_final_ack`, and reports NATS' connection state through
    :meth:`set_bus_connected`.
    """

    def __init__(
        self,
        nc: Bus,
        *,
        events_subject: str,
        worker_events_subject: Callable[[str], str],
        ack_prefix: str,
        ack_timeout_s: float,
        delivery_timeout_s: float,
        on_messages: Callable[[str, Sequence[pb.Message]], None],
        on_redelivery: Callable[[], None] = lambda: None,
        on_stale: Callable[[], None] = lambda: None,
        on_round_trip: Callable[[float], None] = lambda seconds: None,
        on_given_up: Callable[[Event], None] = lambda event: None,
        on_garbage: Callable[[str], None] = lambda subject: None,
        perform: Callable[[OwnerT, Sequence[Action]], Publish | None] = lambda owner, actions: None,
        on_settled: Callable[[OwnerT], None] = lambda owner: None,
    ) -> None:
        self._nc = nc
        self._loop = asyncio.get_running_loop()
        self._events_subject = events_subject
        self._worker_events_subject = worker_events_subject
        self._ack_prefix = ack_prefix
        self._ack_prefix_len = len(ack_prefix) + 1
        # The timeouts themselves are the sessions' (SessionLimits): the sweep only needs
        # to look often enough for an ack deadline to be found late by at most a fifth.
        del delivery_timeout_s
        self._sweep_s = min(0.1, ack_timeout_s / 5)
        self._on_messages = on_messages
        self._on_redelivery = on_redelivery
        self._on_stale = on_stale
        self._on_round_trip = on_round_trip
        self._on_given_up = on_given_up
        self._on_garbage = on_garbage
        self._perform = perform
        self._on_settled = on_settled
        self._waiting: dict[tuple[str, int], _Waiting[OwnerT]] = {}
        #: What send gathered in this turn of the event loop, by subject, and the numbers
        #: of the batches (one per gateway lifetime each).
        self._batching: dict[str, _Batch] = {}
        self._batch_serial = 0
        self._publish_scheduled = False
        #: Nothing larger is published: NATS' max_payload (a lone event always fits: the
        #: gateway's message limit leaves room for its envelope).
        self._max_batch_bytes = nc.max_payload
        #: The tasks that carry on an owner's delivery after an outcome other than its ack.
        self._recovering: set[asyncio.Task[None]] = set()
        self._bus_up = asyncio.Event()
        self._bus_up.set()
        #: ``_bus_up.is_set()`` as a plain attribute, for send's check on every event.
        self._bus_connected = True
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def ack_wildcard(self) -> str:
        """The subscription that receives every reply meant for this gateway: one token
        for the connection id, one for the sequence (exactly what its NATS permissions
        allow it to read)."""
        return f"{self._ack_prefix}.*.*"

    def start(self, spawn: Spawn = unsupervised) -> None:
        """Start the timeout sweep (with ``spawn``: the gateway supervises it)."""
        self._sweeper = spawn("delivery_sweep", self._sweep())

    async def close(self) -> None:
        """Stop the sweep, and give up every delivery still waiting (the gateway calls it
        once its connections have drained: an ack that has not come by then will not).
        Idempotent."""
        self._closed = True
        await stop_task(self._sweeper)
        for waiting in list(self._waiting.values()):
            self._resolve(waiting, Reply.TIMEOUT)

    def set_bus_connected(self, connected: bool) -> None:
        """Called on NATS disconnects and reconnects."""
        self._bus_connected = connected
        if connected:
            self._bus_up.set()
        else:
            self._bus_up.clear()

    async def deliver(
        self,
        session: Session,
        publish: Publish,
        perform: Callable[[Sequence[Action]], Publish | None],
    ) -> None:
        """Publish ``publish`` and feed what comes back (or the lack of it) to ``session``,
        until it has no event in flight. Every decision (redeliver, back off, drop the
        worker hint, give up) is the session's (:meth:`Session.reply`); this performs its
        publishes and hands the rest of its actions to ``perform``, which returns the next
        Publish among them, if any."""
        await self._carry_on(session, await self._publish(session, publish), perform)

    async def _carry_on(
        self,
        session: Session,
        actions: list[Action],
        perform: Callable[[Sequence[Action]], Publish | None],
    ) -> None:
        """Perform ``actions`` (the session's answer to the last outcome), and go on
        delivering until the session has nothing in flight."""
        loop = self._loop
        while True:
            self._note(actions)
            next_publish = perform(actions)
            if next_publish is not None:
                actions = await self._publish(session, next_publish)
            elif (retry_at := session.retry_at) is not None:
                delay = retry_at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                actions = session.tick(loop.time())
            elif session.busy:
                # Still in flight with nothing to publish (a progress ack now extends the
                # wait in place, in on_reply): wait for the same copy again.
                actions = await self._await_reply(session, session.ack_deadline)
            else:
                return

    def _note(self, actions: Sequence[Action]) -> None:
        for action in actions:
            if type(action) is Delivered:
                self._on_round_trip(action.round_trip_s)
            elif type(action) is GaveUp:
                self._on_given_up(action.event)

    def send(self, owner: OwnerT, session: Session, publish: Publish) -> None:
        """Send ``publish`` (of ``owner``'s ``session``) and return at once; what comes
        back is handled as :meth:`deliver` does, the session's actions performed by
        ``perform(owner, ...)``, until the session has nothing in flight; then
        ``on_settled(owner)``. Never raises for the bus: a failed publish is handled as
        no responders (by a task, as every outcome other than the final ack).

        The event is not published here: every event sent to one subject in this turn of
        the event loop goes in one EventBatch at its end (:mod:`wsgate.event_batch`), a
        lone one as itself."""
        event = publish.event
        if self._closed or not self._bus_connected:
            # Giving up, or waiting for NATS: the coroutine's way.
            self._spawn(self._deliver_for(owner, session, publish))
            return
        if event.redelivered:
            self._on_redelivery()
        key = (event.connection_id, event.sequence)
        subject = (
            self._worker_events_subject(publish.worker) if publish.worker else self._events_subject
        )
        deadline = session.ack_deadline
        assert deadline is not None
        encoded = event.encode()
        size = len(encoded) + event_batch.ENTRY_OVERHEAD
        batch = self._batching.get(subject)
        if batch is None:
            batch = self._new_batch(subject)
        elif batch.size + size > self._max_batch_bytes:
            # Full: it goes now, and this event starts the next.
            self._publish_batch(subject, batch)
            batch = self._new_batch(subject)
        batch.events.append(encoded)
        batch.keys.append(key)
        batch.size += size
        self._waiting[key] = _Waiting(None, deadline, session, owner, batch.number)

    def _new_batch(self, subject: str) -> _Batch:
        """A batch for ``subject``, published at the end of this turn of the event loop
        (or once full)."""
        if not self._publish_scheduled:
            self._publish_scheduled = True
            self._loop.call_soon(self._publish_batches)
        self._batch_serial += 1
        batch = self._batching[subject] = _Batch(self._batch_serial)
        return batch

    def _publish_batches(self) -> None:
        self._publish_scheduled = False
        batching = self._batching
        self._batching = {}
        for subject, batch in batching.items():
            self._publish_batch(subject, batch)
        write_now(self._nc)  # this turn's batches leave now, not in the flusher's next step

    def _publish_batch(self, subject: str, batch: _Batch) -> None:
        """Publish ``batch`` on ``subject``: a lone event as a ConnectionEvent with its
        own reply subject, two or more as an EventBatch with the batch's."""
        if self._batching.get(subject) is batch:
            del self._batching[subject]
        if self._closed:
            return  # close() gave up every wait
        events = batch.events
        if len(events) == 1:
            connection_id, sequence = batch.keys[0]
            payload = events[0]
            reply = f"{self._ack_prefix}.{connection_id}.{sequence}"
        else:
            payload = event_batch.join(events)
            reply = f"{self._ack_prefix}.{subjects.BATCH_REPLY_TOKEN}.{batch.number}"
        # Run eagerly (as wsgate.eager.start_eagerly, inline): nats-py's publish only
        # appends to its buffer, unless that is full; then a task finishes the flush it
        # waits for (the message is in the buffer already).
        publishing = self._nc.publish(subject, payload, reply=reply)
        try:
            suspended_on = publishing.send(None)
        except StopIteration:
            pass
        except nats.errors.Error as exc:
            # Closed or over the reconnect buffer: treated like no worker for now.
            log.debug("publishing %d event(s) on %s failed: %r", len(events), subject, exc)
            self._batch_failed(batch.number, batch.keys)
        else:
            self._loop.create_task(resume(publishing, suspended_on))

    def _batch_failed(self, number: int, keys: Sequence[tuple[str, int]]) -> None:
        """No worker took batch ``number`` (of the events ``keys``): each event still
        waiting for it is handed NO_RESPONDERS."""
        for key in keys:
            waiting = self._waiting.get(key)
            if waiting is not None and waiting.batch == number and waiting.open:
                self._resolve(waiting, Reply.NO_RESPONDERS)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._recovering.add(task)
        task.add_done_callback(self._recovering.discard)

    async def _deliver_for(self, owner: OwnerT, session: Session, publish: Publish) -> None:
        await self.deliver(session, publish, functools.partial(self._perform, owner))
        self._on_settled(owner)

    async def _recover(self, owner: OwnerT, session: Session, outcome: Reply, worker: str) -> None:
        """An owner's event got ``outcome`` (not its final ack): carry on as deliver."""
        now = self._loop.time()
        if self._closed:
            actions = session.give_up(now)
        else:
            actions = session.reply(outcome, now, worker=worker)
        await self._carry_on(session, actions, functools.partial(self._perform, owner))
        self._on_settled(owner)

    def _resolve(self, waiting: _Waiting[OwnerT], outcome: Reply) -> None:
        """``outcome`` (not a final ack) for an open wait: the coroutine's future is set,
        an owner's wait ends and a task carries on."""
        future = waiting.future
        if future is not None:
            if not future.done():
                future.set_result(outcome)
            return
        flight = waiting.session.in_flight
        assert flight is not None
        key = (flight.connection_id, flight.sequence)
        if self._waiting.get(key) is waiting:
            del self._waiting[key]
            owner = waiting.owner
            assert owner is not None
            self._spawn(self._recover(owner, waiting.session, outcome, waiting.worker))

    async def _publish(self, session: Session, publish: Publish) -> list[Action]:
        event = publish.event
        if self._closed or (
            not self._bus_up.is_set() and not await self._wait_bus(session.give_up_at)
        ):
            return session.give_up(self._loop.time())
        if event.redelivered:
            self._on_redelivery()
        subject = (
            self._worker_events_subject(publish.worker) if publish.worker else self._events_subject
        )
        reply_subject = f"{self._ack_prefix}.{event.connection_id}.{event.sequence}"
        deadline = session.ack_deadline
        try:
            await self._nc.publish(subject, event.encode(), reply=reply_subject)
        except nats.errors.Error as exc:
            # Closed or over the reconnect buffer: treated like no worker for now.
            log.debug("publishing %s#%d failed: %r", event.connection_id, event.sequence, exc)
            if self._closed:
                return session.give_up(self._loop.time())
            return session.reply(Reply.NO_RESPONDERS, self._loop.time())
        return await self._await_reply(session, deadline)

    async def _await_reply(self, session: Session, deadline: float | None) -> list[Action]:
        """Wait for the reply to the event in flight (TIMEOUT at ``deadline``, by the
        sweep) and hand it to the session."""
        flight = session.in_flight
        assert flight is not None
        assert deadline is not None
        key = (flight.connection_id, flight.sequence)
        waiting: _Waiting[OwnerT] = _Waiting(self._loop.create_future(), deadline, session)
        self._waiting[key] = waiting
        assert waiting.future is not None
        try:
            outcome = await waiting.future
        finally:
            if self._waiting.get(key) is waiting:
                del self._waiting[key]
        now = self._loop.time()
        if outcome is not Reply.ACKED and self._closed:
            return session.give_up(now)
        return session.reply(outcome, now, worker=waiting.worker)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_s)
            now = self._loop.time()
            expired = [w for w in self._waiting.values() if w.expires_at <= now and w.open]
            for waiting in expired:
                self._resolve(waiting, Reply.TIMEOUT)

    async def _wait_bus(self, until: float) -> bool:
        remaining = until - self._loop.time()
        if remaining <= 0:
            return False
        try:
            async with asyncio.timeout(remaining):
                await self._bus_up.wait()
        except TimeoutError:
            return False
        return True

    async def on_reply(self, msg: Msg) -> None:
        """The subscription callback for ``ack_wildcard``. What is not an ack of this
        gateway's (an unparsable subject, a payload that is no EventAck of the subject's
        sequence) goes to ``on_garbage("ack")``; an ack of an event no longer waited for
        to ``on_stale``."""
        connection_id, _, sequence_text = msg.subject[self._ack_prefix_len :].rpartition(".")
        # Strictly digits: int() would also take "+1", " 1" and "1_0".
        if not (sequence_text.isascii() and sequence_text.isdigit() and len(sequence_text) < 20):
            self._on_garbage("ack")
            return
        sequence = int(sequence_text)
        headers = msg.headers
        no_responders = headers is not None and headers.get("Status") == _NO_RESPONDERS
        if connection_id == subjects.BATCH_REPLY_TOKEN:
            # A batch's reply subject: only NATS' no-responders status comes there.
            if not no_responders:
                self._on_garbage("ack")
                return
            # Batches are numbered from 1: 0 stands for none (deliver's lone events).
            waiting_for = self._waiting.items() if sequence else ()
            keys = [k for k, w in waiting_for if w.batch == sequence and w.open]
            if not keys:
                self._on_stale()
            self._batch_failed(sequence, keys)
            return
        waiting = self._waiting.get((connection_id, sequence))
        if no_responders:
            if waiting is not None and waiting.open:
                self._resolve(waiting, Reply.NO_RESPONDERS)
            else:
                self._on_stale()
            return
        try:
            ack = envelopes.read_event_ack(msg.data, sequence)
            if waiting is None:
                envelopes.check_connection_id("EventAck", connection_id)
                envelopes.check_sequence("EventAck", sequence)
        except InvalidEnvelope:
            self._on_garbage("ack")
            return
        if waiting is None or not waiting.open:
            # An ack for a copy we stopped waiting for (it was redelivered meanwhile).
            self._on_stale()
            return
        if ack.in_progress:
            # The worker is alive and busy: a fresh ack wait, on the same waiting entry. (Not
            # a reply that ends the wait: the final ack, on the command subject, can be
            # handled before the delivery resumes, and must find the wait still open.)
            session = waiting.session
            session.reply(Reply.PROGRESS, self._loop.time())  # fresh deadlines; no actions
            deadline = session.ack_deadline
            if deadline is not None:
                waiting.expires_at = deadline
            return
        if ack.retry:
            self._resolve(waiting, Reply.RETRY)
            return
        self._acknowledged(connection_id, ack, waiting, sequence)

    def on_final_ack(self, ack: pb.EventAck, connection_id: str | None = None) -> None:
        """A final ack, an item of a GatewayBatch on the command subject (the caller calls
        this for each, in the batch's order; ``connection_id``: the ack's, if the caller
        read it already). One that could never have been sent (see
        :func:`wsgate.envelopes.final_ack_problem`) goes to ``on_garbage("command")``; one
        of an event no longer waited for to ``on_stale``."""
        if connection_id is None:
            connection_id = ack.connection_id
        sequence = ack.sequence
        waiting = self._waiting.get((connection_id, sequence))
        if waiting is None or (waiting.future is not None and waiting.future.done()):
            # Checked only here, off the common path: garbage, or the ack of a copy we
            # stopped waiting for.
            if envelopes.final_ack_problem(ack) is not None:
                self._on_garbage("command")
            else:
                self._on_stale()
        elif ack.in_progress or ack.retry:
            self._on_garbage("command")  # progress and retry come on the reply subject
        else:
            self._acknowledged(connection_id, ack, waiting, sequence)

    def _acknowledged(
        self,
        connection_id: str,
        ack: pb.EventAck,
        waiting: _Waiting[OwnerT],
        sequence: int,
    ) -> None:
        # A worker id becomes a subject token: anything else is not taken as one.
        worker = ack.worker
        if worker and not ids.is_worker_id(worker):
            worker = ""
        # Read once: each read of a repeated field makes a new container object.
        messages = ack.messages
        future = waiting.future
        if future is not None:
            waiting.worker = worker
            if messages:
                # Queued before the delivery resumes, so before the next event goes.
                self._on_messages(connection_id, messages)
            future.set_result(Reply.ACKED)
            return
        # An owner's event: its session moves on here and now.
        del self._waiting[connection_id, sequence]
        owner = waiting.owner
        assert owner is not None
        session = waiting.session
        actions = session.reply(Reply.ACKED, self._loop.time(), worker=worker)
        self._note(actions)
        if messages:
            # Queued before the session settles, so before anything the next event makes:
            # the ack's frames go first in the one list performed. (The session's answer
            # to ACKED does not depend on its state, which performing the frames can
            # change: a slow consumer, a shed.)
            actions = session.ack_messages(messages) + actions
        publish = self._perform(owner, actions)
        if publish is not None:
            self.send(owner, session, publish)
        elif not session.busy:
            self._on_settled(owner)
