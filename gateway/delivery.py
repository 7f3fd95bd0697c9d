"""At-least-once delivery of connection events to workers.

An event is published on the app's events subject with a reply subject of its own,
``<prefix>.ack.<gateway_id>.<connection_id>.<sequence>``, which this gateway subscribes to
with a wildcard. A worker answers there with progress acks while its handler runs (or a
retry). The final ack (which may carry the messages the handler sent to the connection)
comes as an item of a ``GatewayBatch`` on the gateway's command subject
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
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import nats.errors
from nats.aio.msg import Msg

from wsgate import envelopes, ids
from wsgate.bus import Bus
from wsgate.errors import InvalidEnvelope
from wsgate.v1 import envelope_pb2 as pb

log = logging.getLogger(__name__)

_NO_RESPONDERS = "503"
_MAX_BACKOFF_S = 1.0


class Reply(enum.Enum):
    """What came back for one published copy of an event."""

    ACKED = "acked"
    NO_RESPONDERS = "no_responders"
    TIMEOUT = "timeout"
    RETRY = "retry"


class Routed(Protocol):
    """Where a connection's events go: ``worker`` is the id of the worker that holds its
    object's activation ("" for the queue). Delivery updates it from the acks."""

    worker: str


class _Waiting:
    """One event waiting for its reply."""

    __slots__ = ("expires_at", "future", "progressed_at", "worker")

    def __init__(self, future: asyncio.Future[Reply], expires_at: float) -> None:
        self.future = future
        self.expires_at = expires_at
        #: When the last progress ack came (loop time; 0.0: none yet).
        self.progressed_at = 0.0
        #: The activation's host, as the final ack named it.
        self.worker = ""


class EventDelivery:
    """Delivers events and matches the replies. One per gateway; create it in a running
    event loop, then :meth:`start` the sweep.

    ``on_messages(connection_id, messages)`` receives what a final ack carries, before the
    delivery it completes returns. For metrics and logs: ``on_redelivery`` for each
    resend, ``on_stale`` for an ack that came too late, ``on_round_trip(seconds)``
    for each acknowledged event, ``on_given_up(event)`` for each event given up,
    ``on_garbage(subject)`` for each message that is no valid ack, with the kind of subject
    it came on ("ack", or "command" for a final ack). The caller subscribes :meth:`on_reply`
    to ``ack_wildcard``, hands each final ack of its command subject to
    :meth:`on_final_ack`, and reports NATS' connection state through
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
        on_given_up: Callable[[pb.ConnectionEvent], None] = lambda event: None,
        on_garbage: Callable[[str], None] = lambda subject: None,
    ) -> None:
        self._nc = nc
        self._loop = asyncio.get_running_loop()
        self._events_subject = events_subject
        self._worker_events_subject = worker_events_subject
        self._ack_prefix = ack_prefix
        self._ack_prefix_len = len(ack_prefix) + 1
        self._ack_timeout_s = ack_timeout_s
        self._ack_wait_ms = int(ack_timeout_s * 1000)
        self._delivery_timeout_s = delivery_timeout_s
        self._sweep_s = min(0.1, ack_timeout_s / 5)
        self._on_messages = on_messages
        self._on_redelivery = on_redelivery
        self._on_stale = on_stale
        self._on_round_trip = on_round_trip
        self._on_given_up = on_given_up
        self._on_garbage = on_garbage
        self._waiting: dict[tuple[str, int], _Waiting] = {}
        self._bus_up = asyncio.Event()
        self._bus_up.set()
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def ack_wildcard(self) -> str:
        """The subscription that receives every reply meant for this gateway: one token
        for the connection id, one for the sequence (exactly what its NATS permissions
        allow it to read)."""
        return f"{self._ack_prefix}.*.*"

    def start(self) -> None:
        """Start the timeout sweep."""
        self._sweeper = self._loop.create_task(self._sweep())

    async def close(self) -> None:
        """Stop the sweep, and give up every delivery still waiting (no ack can come any
        more: NATS is drained by then). Idempotent."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for waiting in list(self._waiting.values()):
            if not waiting.future.done():
                waiting.future.set_result(Reply.TIMEOUT)

    def set_bus_connected(self, connected: bool) -> None:
        """Called on NATS disconnects and reconnects."""
        if connected:
            self._bus_up.set()
        else:
            self._bus_up.clear()

    async def deliver(self, event: pb.ConnectionEvent, route: Routed | None = None) -> bool:
        """Publish ``event`` until a worker acknowledges it. True once acknowledged; False
        after ``delivery_timeout_s`` without any sign of a worker. ``route``, if given, says
        which worker to try first, and learns it from the ack."""
        loop = self._loop
        key = (event.connection_id, event.sequence)
        reply_subject = f"{self._ack_prefix}.{event.connection_id}.{event.sequence}"
        event.ack_wait_ms = self._ack_wait_ms
        started = loop.time()
        give_up_at = started + self._delivery_timeout_s
        backoff_s = 0.05
        attempt = 0
        try:
            while True:
                if self._closed:
                    self._on_given_up(event)
                    return False
                if not self._bus_up.is_set() and not await self._wait_bus(give_up_at):
                    self._on_given_up(event)
                    return False
                if attempt:
                    event.redelivered = True
                    self._on_redelivery()
                attempt += 1
                hinted = route is not None and bool(route.worker)
                subject = (
                    self._worker_events_subject(route.worker)
                    if route is not None and route.worker
                    else self._events_subject
                )
                waiting = _Waiting(loop.create_future(), loop.time() + self._ack_timeout_s)
                self._waiting[key] = waiting
                try:
                    await self._nc.publish(subject, event.SerializeToString(), reply=reply_subject)
                except nats.errors.Error as exc:
                    # Closed or over the reconnect buffer: treated like no worker for now.
                    log.debug("publishing %s#%d failed: %r", *key, exc)
                    outcome = Reply.NO_RESPONDERS
                else:
                    outcome = await waiting.future
                    if waiting.progressed_at:
                        # The worker was alive and busy: the deadline counts from then.
                        give_up_at = max(
                            give_up_at, waiting.progressed_at + self._delivery_timeout_s
                        )
                if outcome is Reply.ACKED:
                    if route is not None:
                        route.worker = waiting.worker
                    self._on_round_trip(loop.time() - started)
                    return True
                if self._closed or loop.time() >= give_up_at:
                    self._on_given_up(event)
                    return False
                if hinted and route is not None:
                    # The activation's host did not take it: back to the queue, at once.
                    route.worker = ""
                    if outcome is not Reply.TIMEOUT:
                        continue
                if outcome in (Reply.NO_RESPONDERS, Reply.RETRY):
                    # No worker subscribed right now (all restarting), or the object is
                    # moving: retry soon, not at once.
                    await asyncio.sleep(min(backoff_s, max(0.0, give_up_at - loop.time())))
                    backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)
        finally:
            self._waiting.pop(key, None)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_s)
            now = self._loop.time()
            for waiting in self._waiting.values():
                if waiting.expires_at <= now and not waiting.future.done():
                    waiting.future.set_result(Reply.TIMEOUT)

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
        waiting = self._waiting.get((connection_id, sequence))
        headers = msg.headers
        no_responders = headers is not None and headers.get("Status") == _NO_RESPONDERS
        if no_responders:
            if waiting is not None and not waiting.future.done():
                waiting.future.set_result(Reply.NO_RESPONDERS)
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
        if waiting is None or waiting.future.done():
            # An ack for a copy we stopped waiting for (it was redelivered meanwhile).
            self._on_stale()
            return
        if ack.in_progress:
            # The worker is alive and busy: a fresh ack wait, on the same waiting entry. (Not
            # a reply that ends the wait: the final ack, on the command subject, can be
            # handled before the delivery resumes, and must find the wait still open.)
            waiting.progressed_at = now = self._loop.time()
            waiting.expires_at = now + self._ack_timeout_s
            return
        if ack.retry:
            waiting.future.set_result(Reply.RETRY)
            return
        self._acknowledged(connection_id, ack, waiting)

    def on_final_ack(self, ack: pb.EventAck) -> None:
        """A final ack, an item of a GatewayBatch on the command subject (the caller calls
        this for each, in the batch's order). One that could never have been sent (see
        :func:`wsgate.envelopes.final_ack_problem`) goes to ``on_garbage("command")``; one
        of an event no longer waited for to ``on_stale``."""
        waiting = self._waiting.get((ack.connection_id, ack.sequence))
        if waiting is None or waiting.future.done():
            # Checked only here, off the common path: garbage, or the ack of a copy we
            # stopped waiting for.
            if envelopes.final_ack_problem(ack) is not None:
                self._on_garbage("command")
            else:
                self._on_stale()
        elif ack.in_progress or ack.retry:
            self._on_garbage("command")  # progress and retry come on the reply subject
        else:
            self._acknowledged(ack.connection_id, ack, waiting)

    def _acknowledged(self, connection_id: str, ack: pb.EventAck, waiting: _Waiting) -> None:
        # A worker id becomes a subject token: anything else is not taken as one.
        waiting.worker = ack.worker if ids.is_worker_id(ack.worker) else ""
        if ack.messages:
            # Queued before the read loop resumes, so before the next event is dispatched.
            self._on_messages(connection_id, ack.messages)
        waiting.future.set_result(Reply.ACKED)
