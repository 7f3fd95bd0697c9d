"""The worker's per-event policy without NATS: what an event's outcome makes of the
handler's frames, the close and the ack (event_policy.settle), and the runtime carrying
it out on a real Connection, SendBuffer and OutputGate with a recording sink."""

from __future__ import annotations

import asyncio

import pytest

from wsgate.batches import final_ack_entry
from wsgate.closecodes import CloseCode
from wsgate.errors import StateError
from wsgate.v1 import envelope_pb2 as pb
from wsgate.worker.connection import Connection
from wsgate.worker.env import Env
from wsgate.worker.event_policy import (
    EVENT_KINDS,
    HANDLER_FAILED,
    ROUTE_GONE,
    Close,
    EventKind,
    HandlerOutcome,
    Settlement,
    settle,
)
from wsgate.worker.gate import OutputGate
from wsgate.worker.runtime import carry_out

CONN = "node-abcdefgh_7"
MESSAGE, CLOSED = EventKind.MESSAGE, EventKind.CLOSED
RETURNED, FAILED, NO_ROUTE = HandlerOutcome.RETURNED, HandlerOutcome.FAILED, HandlerOutcome.NO_ROUTE


@pytest.mark.parametrize(
    ("kind", "outcome", "closed", "release", "close", "leave"),
    [
        # A handler that returned: its frames go, nothing more.
        (MESSAGE, RETURNED, False, True, None, False),
        (MESSAGE, RETURNED, True, True, None, False),  # it closed the connection itself
        (CLOSED, RETURNED, True, True, None, True),  # then the connection leaves its objects
        # A handler that failed: its frames are dropped; the connection ends with 1011
        # unless it is closed already.
        (MESSAGE, FAILED, False, False, HANDLER_FAILED, False),
        (MESSAGE, FAILED, True, False, None, False),
        (CLOSED, FAILED, True, False, None, True),
        # A route no longer served: a message ends the connection; a close just leaves.
        (MESSAGE, NO_ROUTE, False, True, ROUTE_GONE, False),
        (CLOSED, NO_ROUTE, True, True, None, True),
    ],
)
def test_settle(
    kind: EventKind,
    outcome: HandlerOutcome,
    closed: bool,
    release: bool,
    close: Close | None,
    leave: bool,
) -> None:
    assert settle(kind, outcome, closed=closed) == Settlement(
        release_output=release, close=close, leave_objects=leave
    )


def test_the_closes_the_worker_sends() -> None:
    assert (HANDLER_FAILED.code, HANDLER_FAILED.reason) == (
        CloseCode.INTERNAL_ERROR,
        "internal error",
    )
    assert HANDLER_FAILED.best_effort  # the event is acked even if the close is lost
    assert (ROUTE_GONE.code, ROUTE_GONE.reason) == (
        CloseCode.INTERNAL_ERROR,
        "route no longer served",
    )
    assert not ROUTE_GONE.best_effort  # lost: the event is not acked and comes again


def test_every_kind_of_connection_event_has_a_policy() -> None:
    kinds = pb.ConnectionEvent.DESCRIPTOR.oneofs_by_name["kind"].fields
    assert set(EVENT_KINDS) == {field.name for field in kinds}


def test_the_final_ack_names_the_event_and_carries_the_frames() -> None:
    entry = final_ack_entry(CONN, 12, [pb.Message(text="a").SerializeToString(), b"\x12\x01b"])
    (item,) = pb.GatewayBatch.FromString(entry).items
    ack = item.ack
    assert (ack.connection_id, ack.sequence, ack.in_progress) == (CONN, 12, False)
    assert [m.WhichOneof("data") for m in ack.messages] == ["text", "binary"]


# -- the runtime carrying a settlement out on a handle --------------------------------------


class RecordingSink:
    def __init__(self, fail: bool = False) -> None:
        self.commands: list[pb.GatewayCommand] = []
        self.fail = fail

    async def send_command(self, connection_id: str, command: pb.GatewayCommand) -> None:
        if self.fail:
            raise ConnectionError("bus gone")
        self.commands.append(command)


def _handle(sink: RecordingSink, gate: OutputGate, *, closed: bool = False) -> Connection:
    return Connection(
        CONN, "/echo", {}, sink=sink, env=Env.__new__(Env), sequence=5, gate=gate, closed=closed
    )


async def test_released_frames_ride_the_ack_once_the_writes_are_durable() -> None:
    sink, gate = RecordingSink(), OutputGate("c:5")
    conn = _handle(sink, gate)
    await conn.send("one")
    await conn.send(b"two")
    messages = await carry_out(settle(MESSAGE, RETURNED, closed=False), conn, gate)
    assert [pb.Message.FromString(m) for m in messages] == [
        pb.Message(text="one"),
        pb.Message(binary=b"two"),
    ]
    assert sink.commands == []


async def test_a_failed_write_drops_the_frames_and_closes_with_1011() -> None:
    sink, gate = RecordingSink(), OutputGate("c:5")
    conn = _handle(sink, gate)
    write: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    gate.hold(write)
    await conn.send("must not leave")
    write.set_exception(StateError("lost"))
    with pytest.raises(StateError):
        await gate.open()  # what the runtime's handler call meets: FAILED
    assert await carry_out(settle(MESSAGE, FAILED, closed=conn.closed), conn, gate) == []
    [command] = sink.commands
    assert command.WhichOneof("action") == "close"
    assert (command.close.code, command.close.reason) == (1011, "internal error")
    assert command.in_reply_to == 5


async def test_a_best_effort_close_that_fails_still_acks_but_a_lost_route_close_raises() -> None:
    gate = OutputGate("c:5")
    conn = _handle(RecordingSink(fail=True), gate)
    assert await carry_out(settle(MESSAGE, FAILED, closed=False), conn, gate) == []
    conn = _handle(RecordingSink(fail=True), gate)
    with pytest.raises(ConnectionError):
        await carry_out(settle(MESSAGE, NO_ROUTE, closed=False), conn, gate)


async def test_a_failed_close_handler_sends_nothing() -> None:
    sink, gate = RecordingSink(), OutputGate("c:5")
    conn = _handle(sink, gate, closed=True)
    assert await carry_out(settle(CLOSED, FAILED, closed=conn.closed), conn, gate) == []
    assert sink.commands == []
