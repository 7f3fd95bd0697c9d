"""A connection's send buffer on its own: the order it keeps, its limit, its three ways
out (take, finish, flush), and discard, with a recording sink and no bus."""

from __future__ import annotations

import asyncio

import pytest

from wsgate.errors import StateError
from wsgate.v1 import envelope_pb2 as pb
from wsgate.worker.connection import Connection
from wsgate.worker.env import Env
from wsgate.worker.gate import OutputGate
from wsgate.worker.send_buffer import MAX_BUFFERED_BYTES, SendBuffer

CONN = "node-abcdefgh_7"


class RecordingSink:
    """Collects commands; each publish can be held on an event, to see what overlaps it."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, pb.GatewayCommand]] = []
        self.release = asyncio.Event()
        self.release.set()

    async def send_command(self, connection_id: str, command: pb.GatewayCommand) -> None:
        await self.release.wait()
        self.commands.append((connection_id, command))

    @property
    def texts(self) -> list[str]:
        return [command.send.text for _, command in self.commands]


def _text(s: str) -> bytes:
    """A text message as it is buffered: its serialized envelope."""
    return pb.Message(text=s).SerializeToString()


async def test_take_returns_everything_in_order_and_empties_it() -> None:
    buffer = SendBuffer(RecordingSink(), CONN)
    buffer.append(_text("a"), 1)
    buffer.append(pb.Message(binary=b"bb").SerializeToString(), 2)
    assert (buffer.pending, buffer.buffered_bytes) == (2, 3)
    assert [m.WhichOneof("data") for m in buffer.take()] == ["text", "binary"]
    assert (buffer.pending, buffer.buffered_bytes) == (0, 0)
    assert await buffer.finish() == []


def test_append_says_when_the_buffer_is_over_its_limit() -> None:
    buffer = SendBuffer(RecordingSink(), CONN)
    assert buffer.append(_text("x"), MAX_BUFFERED_BYTES) is False  # at the limit
    assert buffer.append(_text("y"), 1) is True  # just over it


async def test_flush_publishes_commands_in_order_for_the_event() -> None:
    sink = RecordingSink()
    buffer = SendBuffer(sink, CONN, sequence=9)
    for text in ("1", "2", "3"):
        buffer.append(_text(text), 1)
    await buffer.flush()
    assert sink.texts == ["1", "2", "3"]
    assert {(cid, tuple(c.connection_ids), c.in_reply_to) for cid, c in sink.commands} == {
        (CONN, (CONN,), 9)
    }
    assert buffer.pending == 0


async def test_flush_soon_runs_only_if_the_handler_yields_to_the_loop() -> None:
    sink = RecordingSink()
    buffer = SendBuffer(sink, CONN, loop=asyncio.get_running_loop())
    buffer.append(_text("early"), 5)
    buffer.flush_soon()
    buffer.flush_soon()  # scheduled once
    assert await buffer.finish() == [_text("early")]  # returned first: it rides the ack
    await asyncio.sleep(0)
    assert sink.commands == []

    buffer.append(_text("streamed"), 8)
    buffer.flush_soon()
    await asyncio.sleep(0)  # the handler waits on something: the flush starts
    buffer.append(_text("while flushing"), 14)
    # finish() waits for the flush in flight, which takes what came meanwhile too.
    assert await buffer.finish() == []
    assert sink.texts == ["streamed", "while flushing"]


async def test_a_flush_waits_for_the_one_in_flight_so_order_holds() -> None:
    sink = RecordingSink()
    buffer = SendBuffer(sink, CONN)
    buffer.append(_text("first"), 5)
    buffer.flush_soon()
    sink.release.clear()
    await asyncio.sleep(0)  # the scheduled flush has taken "first" and is held
    buffer.append(_text("second"), 6)
    flushing = asyncio.ensure_future(buffer.flush())
    await asyncio.sleep(0)
    assert not flushing.done()
    sink.release.set()
    await asyncio.wait_for(flushing, 5)
    assert sink.texts == ["first", "second"]


async def test_flush_waits_for_the_gate_and_a_failed_write_keeps_the_output() -> None:
    sink = RecordingSink()
    gate = OutputGate("conn:1")
    write: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    gate.hold(write)
    buffer = SendBuffer(sink, CONN, gate=gate)
    buffer.append(_text("after the write"), 5)
    flushing = asyncio.ensure_future(buffer.flush())
    await asyncio.sleep(0)
    assert sink.commands == []  # the write is not durable yet
    write.set_exception(StateError("lost"))
    with pytest.raises(StateError):
        await asyncio.wait_for(flushing, 5)
    assert sink.commands == []


async def test_discard_drops_the_buffer_and_cancels_a_flush_in_flight() -> None:
    sink = RecordingSink()
    buffer = SendBuffer(sink, CONN)
    buffer.append(_text("held"), 4)
    buffer.flush_soon()
    sink.release.clear()
    await asyncio.sleep(0)  # the flush is publishing "held"
    buffer.append(_text("queued"), 6)
    buffer.discard()
    assert (buffer.pending, buffer.buffered_bytes) == (0, 0)
    sink.release.set()
    assert await buffer.finish() == []
    await asyncio.sleep(0)
    assert sink.commands == []


async def test_flush_of_an_empty_buffer_publishes_nothing() -> None:
    sink = RecordingSink()
    await SendBuffer(sink, CONN).flush()
    assert sink.commands == []


# -- as its Connection uses it ---------------------------------------------------------------


def _handle(sink: RecordingSink, *, connecting: bool = False) -> Connection:
    return Connection(CONN, "/echo", {}, sink=sink, env=Env.__new__(Env), connecting=connecting)


async def test_a_handle_publishes_at_once_just_over_the_limit_not_at_it() -> None:
    sink = RecordingSink()
    conn = _handle(sink)
    await conn.send("x" * MAX_BUFFERED_BYTES)  # at the limit: it waits for the ack
    assert sink.commands == []
    await conn.send("y")  # just over: everything leaves now, in order
    assert [len(text) for text in sink.texts] == [MAX_BUFFERED_BYTES, 1]
    assert await conn.end_event() == []


async def test_in_on_connect_everything_waits_for_the_accept_whatever_its_size() -> None:
    sink = RecordingSink()
    conn = _handle(sink, connecting=True)
    await conn.send(b"x" * (MAX_BUFFERED_BYTES + 1))
    assert sink.commands == []
    assert [len(m.binary) for m in conn.end_connect()] == [MAX_BUFFERED_BYTES + 1]
    assert not conn.closed  # open from now on
