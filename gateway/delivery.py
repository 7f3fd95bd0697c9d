"""At-least-once delivery of connection events to workers.

An event is published on the app's events subject with a reply subject of its own,
``<prefix>.ack.<gateway_id>.<connection_id>.<sequence>``, which this gateway subscribes to
with a wildcard. A worker answers there: with progress acks while its handler runs, then
with the final ack. When neither comes within ``ack_timeout_s`` (the worker died, or the
message was lost), the same event is published again, marked ``redelivered``. When no
worker subscribes at all, NATS answers at once with a 503 status and the event is retried
after a short backoff. While NATS is unreachable nothing is published; the delivery waits
for the reconnection. Every sign of a worker (a progress ack) restarts the clock; after
``delivery_timeout_s`` without one, the delivery gives up.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable

import nats.errors
from google.protobuf.message import DecodeError
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from wsgate.v1 import envelope_pb2 as pb

log = logging.getLogger(__name__)

_NO_RESPONDERS = "503"
_MAX_BACKOFF_S = 1.0


class Reply(enum.Enum):
    """What came back for one published copy of an event."""

    ACKED = "acked"
    PROGRESS = "progress"
    NO_RESPONDERS = "no_responders"
    TIMEOUT = "timeout"


class EventDelivery:
    """Delivers events and matches the replies. One per gateway.

    ``on_redelivery`` is called for each resend (for metrics). The caller subscribes
    :meth:`on_reply` to ``ack_wildcard`` and reports NATS' connection state through
    :meth:`set_bus_connected`.
    """

    def __init__(
        self,
        nc: NatsClient,
        *,
        events_subject: str,
        ack_prefix: str,
        ack_timeout_s: float,
        delivery_timeout_s: float,
        on_redelivery: Callable[[], None] = lambda: None,
    ) -> None:
        self._nc = nc
        self._events_subject = events_subject
        self._ack_prefix = ack_prefix
        self._ack_timeout_s = ack_timeout_s
        self._delivery_timeout_s = delivery_timeout_s
        self._on_redelivery = on_redelivery
        self._waiting: dict[tuple[str, int], asyncio.Future[Reply]] = {}
        self._bus_up = asyncio.Event()
        self._bus_up.set()
        self.late_replies = 0

    @property
    def ack_wildcard(self) -> str:
        """The subscription that receives every reply meant for this gateway."""
        return f"{self._ack_prefix}.>"

    def set_bus_connected(self, connected: bool) -> None:
        """Called on NATS disconnects and reconnects."""
        if connected:
            self._bus_up.set()
        else:
            self._bus_up.clear()

    async def deliver(self, event: pb.ConnectionEvent) -> bool:
        """Publish ``event`` until a worker acknowledges it. True once acknowledged; False
        after ``delivery_timeout_s`` without any sign of a worker."""
        loop = asyncio.get_running_loop()
        key = (event.connection_id, event.sequence)
        reply_subject = f"{self._ack_prefix}.{event.connection_id}.{event.sequence}"
        event.ack_wait_ms = int(self._ack_timeout_s * 1000)
        give_up_at = loop.time() + self._delivery_timeout_s
        backoff_s = 0.05
        attempt = 0
        try:
            while True:
                if not self._bus_up.is_set() and not await _wait(self._bus_up, give_up_at):
                    return False
                event.redelivered = attempt > 0
                if attempt:
                    self._on_redelivery()
                attempt += 1
                future = loop.create_future()
                self._waiting[key] = future
                try:
                    await self._nc.publish(
                        self._events_subject, event.SerializeToString(), reply=reply_subject
                    )
                except nats.errors.Error as exc:
                    # Closed or over the reconnect buffer: treated like no worker for now.
                    log.debug("publishing %s#%d failed: %r", *key, exc)
                    outcome = Reply.NO_RESPONDERS
                else:
                    outcome = await self._await_reply(key, future, give_up_at)
                if outcome is Reply.ACKED:
                    return True
                if loop.time() >= give_up_at:
                    return False
                if outcome is Reply.NO_RESPONDERS:
                    # No worker subscribed right now (all restarting): retry soon, not at once.
                    await asyncio.sleep(min(backoff_s, max(0.0, give_up_at - loop.time())))
                    backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)
        finally:
            self._waiting.pop(key, None)

    async def _await_reply(
        self, key: tuple[str, int], future: asyncio.Future[Reply], give_up_at: float
    ) -> Reply:
        """Wait for the final ack, extending the wait on each progress ack."""
        loop = asyncio.get_running_loop()
        while True:
            timeout = min(self._ack_timeout_s, give_up_at - loop.time())
            timer = loop.call_later(max(timeout, 0.0), _settle, future, Reply.TIMEOUT)
            try:
                outcome = await future
            finally:
                timer.cancel()
            if outcome is not Reply.PROGRESS:
                return outcome
            # The worker is alive and busy: a fresh wait, and a fresh deadline.
            give_up_at = loop.time() + self._delivery_timeout_s
            future = loop.create_future()
            self._waiting[key] = future

    async def on_reply(self, msg: Msg) -> None:
        """The subscription callback for ``ack_wildcard``."""
        connection_id, _, sequence = msg.subject[len(self._ack_prefix) + 1 :].rpartition(".")
        try:
            key = (connection_id, int(sequence))
        except ValueError:
            self.late_replies += 1
            return
        future = self._waiting.get(key)
        if future is None or future.done():
            # An ack for a copy we stopped waiting for (it was redelivered meanwhile).
            self.late_replies += 1
            return
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
            future.set_result(Reply.NO_RESPONDERS)
            return
        try:
            ack = pb.EventAck.FromString(msg.data)
        except DecodeError:
            self.late_replies += 1
            return
        future.set_result(Reply.PROGRESS if ack.in_progress else Reply.ACKED)


def _settle(future: asyncio.Future[Reply], outcome: Reply) -> None:
    if not future.done():
        future.set_result(outcome)


async def _wait(event: asyncio.Event, until: float) -> bool:
    remaining = until - asyncio.get_running_loop().time()
    if remaining <= 0:
        return False
    try:
        async with asyncio.timeout(remaining):
            await event.wait()
    except TimeoutError:
        return False
    return True
