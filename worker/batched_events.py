"""Events as they come off an events subject: one alone, or many in an EventBatch.

A gateway sends the events it has for one subject in one turn of its event loop as one
``EventBatch`` (:mod:`wsgate.event_batch`), and a lone event as itself. The worker takes
each event of a batch as if it had come alone, as a :class:`BatchedEvent`: the same
checks, its own handler slot and Task, its own progress acks and final ack.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from wsgate import event_batch
from wsgate.errors import InvalidEnvelope


@dataclass
class BatchedEvent(Msg):
    """One event of an EventBatch, as a message of its own. Its ``reply`` is the batch's
    (``<prefix>.ack.<gateway_id>.batch.<n>``) until the worker has read the event and
    checked that the batch came from the event's gateway; from then on it is the event's
    own (``<prefix>.ack.<gateway_id>.<connection_id>.<sequence>``), as a lone event's is.
    """


def unbatching(
    nc: NatsClient,
    take: Callable[[Msg], Awaitable[None]],
    on_garbage: Callable[[Msg, InvalidEnvelope], None],
) -> Callable[[Msg], Awaitable[None]]:
    """A subscription callback that hands ``take`` each event a message carries, in order:
    a lone event as it came, each event of an EventBatch as a :class:`BatchedEvent`. A
    batch that does not split goes to ``on_garbage``, and none of it to ``take``."""

    async def take_each(msg: Msg) -> None:
        data = msg.data
        if not event_batch.is_batch(data):
            await take(msg)
            return
        try:
            events = event_batch.split(data)
        except InvalidEnvelope as exc:
            on_garbage(msg, exc)
            return
        subject, reply = msg.subject, msg.reply
        for event in events:
            await take(BatchedEvent(nc, subject, reply, event))

    return take_each
