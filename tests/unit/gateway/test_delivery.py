"""The delivery's I/O (gateway/delivery.py) over an in-memory publisher: it performs what
the Session decides, matches replies to the event in flight, and times out by its sweep.
The decisions themselves are tested in test_session.py."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import nats.errors
import pytest
from nats.aio.msg import Msg

from wsgate import event_batch
from wsgate.gateway.delivery import EventDelivery
from wsgate.gateway.session import Action, Count, Event, Publish, Session, SessionLimits, Write
from wsgate.v1 import envelope_pb2 as pb

pytestmark = pytest.mark.timeout(10)

ACK_PREFIX = "wsgate.ack.gw1"
CONNECTION = "node-abcdefgh_1"


class MemoryBus:
    """What EventDelivery needs of a NATS client: ``publish``, recorded; ``failing`` raises."""

    max_payload = 1024 * 1024

    def __init__(self) -> None:
        #: Each event published, with its subject and reply subject (a batch's events each
        #: with the batch's reply subject); ``messages`` counts the NATS messages.
        self.published: list[tuple[str, pb.ConnectionEvent, str]] = []
        self.messages = 0
        self.arrived = asyncio.Event()
        self.failing = False

    async def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        if self.failing:
            raise nats.errors.ConnectionClosedError
        self.messages += 1
        events = event_batch.split(payload) if event_batch.is_batch(payload) else [payload]
        for event in events:
            self.published.append((subject, pb.ConnectionEvent.FromString(event), reply))
        self.arrived.set()

    async def next_publish(self) -> tuple[str, pb.ConnectionEvent, str]:
        count = len(self.published)
        while len(self.published) == count:
            self.arrived.clear()
            await self.arrived.wait()
        return self.published[-1]


class Recorder:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[pb.Message]]] = []
        self.redeliveries = 0
        self.round_trips: list[float] = []
        self.given_up: list[Event] = []
        self.performed: list[Action] = []


def _delivery(bus: MemoryBus, rec: Recorder, ack_timeout_s: float, **extra: Any) -> EventDelivery:
    """An EventDelivery that records into ``rec``; ``extra``: more of its arguments."""

    def on_redelivery() -> None:
        rec.redeliveries += 1

    return EventDelivery(
        bus,  # type: ignore[arg-type]
        events_subject="wsgate.events.app.gw1",
        worker_events_subject=lambda worker: f"wsgate.worker.{worker}.events.gw1",
        ack_prefix=ACK_PREFIX,
        ack_timeout_s=ack_timeout_s,
        delivery_timeout_s=30.0,
        on_messages=lambda cid, messages: rec.messages.append((cid, list(messages))),
        on_redelivery=on_redelivery,
        on_round_trip=rec.round_trips.append,
        on_given_up=rec.given_up.append,
        **extra,
    )


def _perform(rec: Recorder) -> object:
    def perform(actions: Sequence[Action]) -> Publish | None:
        rec.performed.extend(actions)
        return next((a for a in actions if isinstance(a, Publish)), None)

    return perform


def _session(limits: SessionLimits, worker: str = "") -> Session:
    session = Session(CONNECTION, "/room/a", limits)
    session.opened(asyncio.get_running_loop().time(), worker=worker)
    return session


async def test_a_final_ack_settles_the_event_and_its_messages_come_first() -> None:
    bus, rec = MemoryBus(), Recorder()
    delivery = _delivery(bus, rec, ack_timeout_s=5.0)
    delivery.start()
    session = _session(SessionLimits(ack_timeout_s=5.0), worker="w-abcdefgh")
    loop = asyncio.get_running_loop()
    publish = session.client_frame("hi", loop.time())[-1]
    assert isinstance(publish, Publish)
    task = asyncio.create_task(delivery.deliver(session, publish, _perform(rec)))  # type: ignore[arg-type]
    subject, event, reply = await bus.next_publish()
    assert subject == "wsgate.worker.w-abcdefgh.events.gw1"  # the object's host first
    assert reply == f"{ACK_PREFIX}.{CONNECTION}.1"
    assert (event.sequence, event.message.text, event.ack_wait_ms) == (1, "hi", 5000)
    ack = pb.EventAck(
        connection_id=CONNECTION, sequence=1, worker="w-ijklmnop", messages=[pb.Message(text="yo")]
    )
    delivery.on_final_ack(ack)
    assert rec.messages == [(CONNECTION, [pb.Message(text="yo")])]
    await task
    assert not session.busy
    assert session.worker == "w-ijklmnop"
    assert session.acked_through == 1
    assert len(rec.round_trips) == 1
    await delivery.close()


async def test_no_ack_in_time_publishes_the_same_event_again_marked() -> None:
    bus, rec = MemoryBus(), Recorder()
    delivery = _delivery(bus, rec, ack_timeout_s=0.05)
    delivery.start()
    session = _session(SessionLimits(ack_timeout_s=0.05))
    loop = asyncio.get_running_loop()
    took_off = loop.time()
    publish = session.client_frame("hi", took_off)[-1]
    assert isinstance(publish, Publish)
    task = asyncio.create_task(delivery.deliver(session, publish, _perform(rec)))  # type: ignore[arg-type]
    _, first, _ = await bus.next_publish()
    _, again, _ = await bus.next_publish()
    assert loop.time() >= took_off + 0.05  # not before the session's ack deadline
    assert (again.sequence, again.redelivered, first.redelivered) == (1, True, False)
    assert rec.redeliveries == 1
    # A progress ack on the copy, then its final ack.
    progress = pb.EventAck(sequence=1, in_progress=True).SerializeToString()
    reply_subject = f"{ACK_PREFIX}.{CONNECTION}.1"
    await delivery.on_reply(Msg(None, subject=reply_subject, data=progress))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    delivery.on_final_ack(pb.EventAck(connection_id=CONNECTION, sequence=1))
    await task
    assert not session.busy
    await delivery.close()


async def test_a_closed_delivery_gives_up_and_the_session_closes_with_1013() -> None:
    bus, rec = MemoryBus(), Recorder()
    delivery = _delivery(bus, rec, ack_timeout_s=5.0)
    session = _session(SessionLimits(ack_timeout_s=5.0))
    publish = session.client_frame(b"\x00", asyncio.get_running_loop().time())[-1]
    assert isinstance(publish, Publish)
    bus.failing = True  # publishing fails: treated as no responders, retried after a backoff
    task = asyncio.create_task(delivery.deliver(session, publish, _perform(rec)))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert session.busy
    assert session.retry_at is not None
    await delivery.close()
    await task
    assert [e.sequence for e in rec.given_up] == [1]
    assert not session.busy
    closed = session.close_requested
    assert closed is not None
    assert closed[1:] == (1013, "no worker acknowledged the message")
    assert not any(isinstance(a, Write) for a in rec.performed)


# -- send: the owner's events, moved on by their final ack --------------------------------


class Owner:
    """An owner of sessions: what ``perform`` and ``on_settled`` were handed, in order."""

    def __init__(self) -> None:
        self.log: list[object] = []
        self.settled = asyncio.Event()

    def on_settled(self) -> None:
        self.log.append("settled")
        self.settled.set()


def _owned_delivery(bus: MemoryBus, rec: Recorder, ack_timeout_s: float) -> EventDelivery:
    def perform(owner: Owner, actions: Sequence[Action]) -> Publish | None:
        owner.log.extend(actions)
        rec.performed.extend(actions)
        return next((a for a in actions if isinstance(a, Publish)), None)

    return _delivery(bus, rec, ack_timeout_s, perform=perform, on_settled=Owner.on_settled)


async def test_send_publishes_at_the_end_of_the_turn_and_the_final_ack_settles_in_place() -> None:
    bus, rec = MemoryBus(), Recorder()
    delivery = _owned_delivery(bus, rec, ack_timeout_s=5.0)
    delivery.start()
    session, owner = _session(SessionLimits(ack_timeout_s=5.0)), Owner()
    loop = asyncio.get_running_loop()
    publish = session.client_frame("hi", loop.time())[-1]
    assert isinstance(publish, Publish)
    delivery.send(owner, session, publish)
    # Published at the end of this turn of the event loop: alone, with its own reply subject.
    assert bus.published == []
    await bus.next_publish()
    assert [(e.sequence, e.message.text, reply) for _, e, reply in bus.published] == [
        (1, "hi", f"{ACK_PREFIX}.{CONNECTION}.1")
    ]
    # The Closed event of a socket gone meanwhile waits behind it, in the session's queue.
    assert session.transport_closed(loop.time()) == [Count("closes", "transport")]
    ack = pb.EventAck(
        connection_id=CONNECTION, sequence=1, worker="w-ijklmnop", messages=[pb.Message(text="yo")]
    )
    delivery.on_final_ack(ack)
    # In the ack's callback: its frames (dropped: the socket is gone), then the settling,
    # whose actions publish the Closed event at once; not settled yet.
    assert [type(a).__name__ for a in owner.log] == ["Count", "Delivered", "Publish"]
    assert session.acked_through == 1
    assert session.worker == "w-ijklmnop"
    await bus.next_publish()
    assert [e.WhichOneof("kind") for _, e, _ in bus.published] == ["message", "closed"]
    assert bus.published[-1][0] == "wsgate.worker.w-ijklmnop.events.gw1"
    delivery.on_final_ack(pb.EventAck(connection_id=CONNECTION, sequence=2))
    assert owner.log[-2:] == [owner.log[-2], "settled"]
    assert not session.busy
    assert len(rec.round_trips) == 2
    # A second copy of the ack is stale, and changes nothing.
    delivery.on_final_ack(pb.EventAck(connection_id=CONNECTION, sequence=2))
    assert owner.log[-1] == "settled"
    assert len(rec.round_trips) == 2
    await delivery.close()


async def test_a_sent_event_without_an_ack_in_time_is_redelivered_by_a_task_then_settles() -> None:
    bus, rec = MemoryBus(), Recorder()
    delivery = _owned_delivery(bus, rec, ack_timeout_s=0.05)
    delivery.start()
    session, owner = _session(SessionLimits(ack_timeout_s=0.05)), Owner()
    loop = asyncio.get_running_loop()
    took_off = loop.time()
    publish = session.client_frame("hi", took_off)[-1]
    assert isinstance(publish, Publish)
    delivery.send(owner, session, publish)
    await bus.next_publish()
    _, again, _ = await bus.next_publish()
    assert loop.time() >= took_off + 0.05
    assert (again.sequence, again.redelivered) == (1, True)
    assert rec.redeliveries == 1
    # The first copy's ack, late: still taken (it acknowledges the same event).
    delivery.on_final_ack(pb.EventAck(connection_id=CONNECTION, sequence=1))
    async with asyncio.timeout(5):
        await owner.settled.wait()
    assert not session.busy
    assert session.acked_through == 1
    await delivery.close()


async def test_a_sent_event_whose_publish_fails_is_retried_and_given_up_on_close() -> None:
    bus, rec = MemoryBus(), Recorder()
    delivery = _owned_delivery(bus, rec, ack_timeout_s=5.0)
    session, owner = _session(SessionLimits(ack_timeout_s=5.0)), Owner()
    publish = session.client_frame(b"\x00", asyncio.get_running_loop().time())[-1]
    assert isinstance(publish, Publish)
    bus.failing = True  # no responders, for the session: retried after a backoff
    delivery.send(owner, session, publish)
    await asyncio.sleep(0.01)
    assert session.busy
    assert session.retry_at is not None
    await delivery.close()
    async with asyncio.timeout(5):
        await owner.settled.wait()
    assert [e.sequence for e in rec.given_up] == [1]
    closed = session.close_requested
    assert closed is not None
    assert closed[1:] == (1013, "no worker acknowledged the message")


# -- batches: what send gathers in one turn of the event loop ------------------------------


def _sessions(count: int, ack_timeout_s: float = 5.0) -> list[tuple[Session, Owner]]:
    loop = asyncio.get_running_loop()
    sessions = []
    for n in range(1, count + 1):
        session = Session(f"node-abcdefgh_{n}", "/echo", SessionLimits(ack_timeout_s=ack_timeout_s))
        session.opened(loop.time())
        sessions.append((session, Owner()))
    return sessions


def _frame(session: Session, data: str | bytes) -> Publish:
    """The Publish of a client frame ``data`` that comes to an idle ``session``."""
    publish = session.client_frame(data, asyncio.get_running_loop().time())[-1]
    assert isinstance(publish, Publish)
    return publish


async def test_events_sent_in_one_turn_go_in_one_batch_and_each_is_acked_alone() -> None:
    bus, rec = MemoryBus(), Recorder()
    delivery = _owned_delivery(bus, rec, ack_timeout_s=5.0)
    delivery.start()
    sessions = _sessions(3)
    for n, (session, owner) in enumerate(sessions, 1):
        delivery.send(owner, session, _frame(session, f"m{n}"))
    await bus.next_publish()
    assert bus.messages == 1
    assert [(e.connection_id, e.message.text) for _, e, _ in bus.published] == [
        (f"node-abcdefgh_{n}", f"m{n}") for n in (1, 2, 3)
    ]
    # The batch's reply subject, which no connection id can be.
    assert {reply for _, _, reply in bus.published} == {f"{ACK_PREFIX}.batch.1"}
    # Each is acknowledged on its own, in any order.
    for n in (2, 3, 1):
        delivery.on_final_ack(pb.EventAck(connection_id=f"node-abcdefgh_{n}", sequence=1))
        session, owner = sessions[n - 1]
        assert owner.log[-1] == "settled"
        assert not session.busy
    # The next events go in a batch of their own.
    for session, owner in sessions[:2]:
        delivery.send(owner, session, _frame(session, "again"))
    await bus.next_publish()
    assert bus.messages == 2
    assert bus.published[-1][2] == f"{ACK_PREFIX}.batch.2"
    await delivery.close()


def _no_responders(subject: str) -> Msg:
    return Msg(_client=None, subject=subject, headers={"Status": "503"})  # type: ignore[arg-type]


async def test_no_responders_to_a_batch_retries_each_of_its_events_and_nothing_else() -> None:
    bus, rec = MemoryBus(), Recorder()
    delivery = _owned_delivery(bus, rec, ack_timeout_s=5.0)
    delivery.start()
    sessions = _sessions(3)
    for session, owner in sessions[:2]:
        delivery.send(owner, session, _frame(session, "x"))
    await bus.next_publish()
    # A third event, in a later batch (alone: its own reply subject).
    publish = _frame(sessions[2][0], "y")
    delivery.send(sessions[2][1], sessions[2][0], publish)
    await bus.next_publish()
    await delivery.on_reply(_no_responders(f"{ACK_PREFIX}.batch.1"))
    # The two of batch 1 are sent again after a backoff; the third is still in flight.
    while len(bus.published) < 5:
        await bus.next_publish()
    assert sorted((e.connection_id, e.redelivered) for _, e, _ in bus.published[3:]) == [
        ("node-abcdefgh_1", True),
        ("node-abcdefgh_2", True),
    ]
    # A second no-responders for the same batch finds nothing waiting for it: stale.
    stale = []
    delivery._on_stale = lambda: stale.append(1)
    await delivery.on_reply(_no_responders(f"{ACK_PREFIX}.batch.1"))
    assert stale == [1]
    await delivery.close()


async def test_no_responders_to_batch_0_is_stale_and_leaves_delivers_events_alone() -> None:
    bus, rec = MemoryBus(), Recorder()
    delivery = _delivery(bus, rec, ack_timeout_s=5.0)
    delivery.start()
    stale: list[int] = []
    delivery._on_stale = lambda: stale.append(1)
    session = _session(SessionLimits(ack_timeout_s=5.0))
    publish = _frame(session, "x")
    task = asyncio.create_task(delivery.deliver(session, publish, _perform(rec)))  # type: ignore[arg-type]
    await bus.next_publish()
    # deliver's events are in no batch (0): a no-responders there concerns none of them.
    await delivery.on_reply(_no_responders(f"{ACK_PREFIX}.batch.0"))
    assert stale == [1]
    delivery.on_final_ack(pb.EventAck(connection_id=CONNECTION, sequence=1))
    await task
    assert rec.redeliveries == 0
    assert session.acked_through == 1
    await delivery.close()


async def test_a_batch_reply_that_is_not_no_responders_is_garbage() -> None:
    bus, rec = MemoryBus(), Recorder()
    garbage: list[str] = []
    delivery = _owned_delivery(bus, rec, ack_timeout_s=5.0)
    delivery._on_garbage = garbage.append
    await delivery.on_reply(
        Msg(_client=None, subject=f"{ACK_PREFIX}.batch.1", data=b"")  # type: ignore[arg-type]
    )
    await delivery.on_reply(_no_responders(f"{ACK_PREFIX}.batch.x"))
    assert garbage == ["ack", "ack"]
    await delivery.close()


async def test_a_batch_that_fails_to_publish_retries_each_of_its_events() -> None:
    bus, rec = MemoryBus(), Recorder()
    delivery = _owned_delivery(bus, rec, ack_timeout_s=5.0)
    sessions = _sessions(2)
    bus.failing = True
    for session, owner in sessions:
        delivery.send(owner, session, _frame(session, "x"))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert all(s.busy and s.retry_at is not None for s, _ in sessions)
    bus.failing = False
    while len(bus.published) < 2:
        await bus.next_publish()
    assert all(e.redelivered for _, e, _ in bus.published)
    await delivery.close()


@pytest.mark.parametrize("extra", [0, 1])
async def test_a_batch_is_split_where_the_next_event_would_take_it_over_max_payload(
    extra: int,
) -> None:
    bus, rec = MemoryBus(), Recorder()
    sessions = _sessions(3)
    publishes = []
    for session, _ in sessions:
        publish = _frame(session, b"\x00" * 100)
        publishes.append(publish)
    entry = len(publishes[0].event.encode()) + event_batch.ENTRY_OVERHEAD
    # Room for exactly two events (at the limit), or one byte short of it.
    bus.max_payload = 2 * entry - extra
    delivery = _owned_delivery(bus, rec, ack_timeout_s=5.0)
    for (session, owner), publish in zip(sessions, publishes, strict=True):
        delivery.send(owner, session, publish)
    while len(bus.published) < 3:
        await bus.next_publish()
    assert bus.messages == (2 if extra == 0 else 3)
    await delivery.close()
