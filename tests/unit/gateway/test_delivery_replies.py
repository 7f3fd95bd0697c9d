"""Replies to one event that come on two subscriptions: a progress ack on the event's reply
subject, and its final ack on the command subject, handled back to back before the
delivery resumes (nothing orders the two subscriptions' callbacks)."""

from __future__ import annotations

import asyncio
import random

from nats.aio.msg import Msg

from tests.unit.gateway.reordering_bus import ReorderingBus
from wsgate.gateway.delivery import EventDelivery
from wsgate.gateway.session import Action, Publish, Session, SessionLimits
from wsgate.v1 import envelope_pb2 as pb

CONN = "edge-1-abcd1234_1"
ACK_PREFIX = "wsgate.ack.edge-1.edge-1-abcd1234"


async def _no_request(subject: str, payload: bytes) -> bytes:
    raise AssertionError("no requests here")


async def test_a_final_ack_right_after_a_progress_ack_completes_the_delivery() -> None:
    published: list[pb.ConnectionEvent] = []
    sent = asyncio.Event()

    def on_publish(subject: str, payload: bytes, reply: str) -> None:
        published.append(pb.ConnectionEvent.FromString(payload))
        sent.set()

    bus = ReorderingBus(random.Random(0), on_publish=on_publish, on_request=_no_request)
    stale: list[None] = []
    delivery = EventDelivery(
        bus,
        events_subject="wsgate.events.main.edge-1.edge-1-abcd1234",
        worker_events_subject=lambda worker: f"wsgate.worker.{worker}.events",
        ack_prefix=ACK_PREFIX,
        ack_timeout_s=30.0,
        delivery_timeout_s=60.0,
        on_messages=lambda connection_id, messages: None,
        on_stale=lambda: stale.append(None),
    )
    delivery.start()
    try:
        loop = asyncio.get_running_loop()
        session = Session(CONN, "/room/a", SessionLimits(ack_timeout_s=30.0))
        session.opened(loop.time())
        publish = session.client_frame("x", loop.time())[-1]
        assert isinstance(publish, Publish)
        performed: list[Action] = []

        def perform(actions: list[Action]) -> Publish | None:
            performed.extend(actions)
            return next((a for a in actions if isinstance(a, Publish)), None)

        delivering = asyncio.ensure_future(delivery.deliver(session, publish, perform))
        async with asyncio.timeout(10):
            await sent.wait()
        progress = pb.EventAck(sequence=1, in_progress=True).SerializeToString()
        await delivery.on_reply(
            Msg(_client=None, subject=f"{ACK_PREFIX}.{CONN}.1", data=progress)  # type: ignore[arg-type]
        )
        # No yield in between: the delivery has not resumed since the progress ack.
        delivery.on_final_ack(pb.EventAck(connection_id=CONN, sequence=1))
        async with asyncio.timeout(10):  # far below the 30 s ack wait a lost ack would cost
            await delivering
        assert not session.busy
        assert session.acked_through == 1
        assert stale == []
        assert len(published) == 1  # never redelivered
    finally:
        await delivery.close()
