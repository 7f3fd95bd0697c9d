"""The per-socket outbound queue (gateway/outbox.py) over an in-memory socket: order, the
slow-consumer bound at the limit and one byte over, close frames, the budget's sum."""

from __future__ import annotations

import asyncio

import pytest

from wsgate.gateway.budget import OutboundBudget
from wsgate.gateway.outbox import CloseFrame, Outbox, OutboxPolicy

pytestmark = pytest.mark.timeout(10)


class MemorySocket:
    """What Outbox needs of a WebSocketResponse; ``stall()`` holds writes until ``flow()``."""

    def __init__(self) -> None:
        self.written: list[object] = []
        self._open = asyncio.Event()
        self._open.set()
        self.fail = False

    def stall(self) -> None:
        self._open.clear()

    def flow(self) -> None:
        self._open.set()

    async def _send(self, frame: object) -> None:
        if not self._open.is_set():
            await self._open.wait()
        if self.fail:
            raise ConnectionResetError("gone")
        self.written.append(frame)

    async def send_str(self, data: str) -> None:
        await self._send(data)

    async def send_bytes(self, data: bytes) -> None:
        await self._send(data)

    async def close(self, *, code: int, message: bytes) -> bool:
        self.written.append(("close", code, message.decode()))
        return True


class Counters:
    def __init__(self) -> None:
        self.dropped = 0
        self.overflows = 0

    def on_dropped(self, n: int) -> None:
        self.dropped += n

    def on_overflow(self, key: str) -> None:
        assert key == "c1"
        self.overflows += 1


def _outbox(
    socket: MemorySocket, counters: Counters, budget: OutboundBudget, max_bytes: int = 10
) -> Outbox:
    policy = OutboxPolicy(
        max_bytes=max_bytes,
        budget=budget,
        close_timeout_s=1.0,
        on_dropped=counters.on_dropped,
        on_overflow=counters.on_overflow,
    )
    return Outbox(socket, policy, "c1", transport=None)  # type: ignore[arg-type]


async def test_an_idle_socket_is_written_at_once_without_a_task() -> None:
    socket, counters, budget = MemorySocket(), Counters(), OutboundBudget(100)
    outbox = _outbox(socket, counters, budget)
    outbox.push("a")
    outbox.push(b"b")
    assert socket.written == ["a", b"b"]  # before any await: no writer task
    assert outbox._writer is None
    assert (outbox.queued_bytes, budget.total) == (0, 0)


async def test_frames_queue_in_order_behind_a_stalled_write() -> None:
    socket, counters, budget = MemorySocket(), Counters(), OutboundBudget(100)
    outbox = _outbox(socket, counters, budget)
    socket.stall()
    frames: list[str | bytes] = ["1", b"22", "333"]
    for frame in frames:
        outbox.push(frame)
    assert (outbox.queued_bytes, budget.total) == (6, 6)
    socket.flow()
    await outbox.flush()
    assert socket.written == ["1", b"22", "333"]
    assert (outbox.queued_bytes, budget.total, counters.dropped) == (0, 0, 0)


async def test_the_slow_consumer_bound_at_the_limit_and_one_byte_over() -> None:
    socket, counters, budget = MemorySocket(), Counters(), OutboundBudget(100)
    outbox = _outbox(socket, counters, budget, max_bytes=10)
    socket.stall()
    outbox.push("x" * 4)
    outbox.push(b"y" * 6)  # 10 bytes: at the limit, kept
    assert (outbox.queued_bytes, counters.overflows) == (10, 0)
    outbox.push("z")  # one over: refused, the owner told
    assert (outbox.queued_bytes, counters.overflows, counters.dropped) == (10, 1, 1)
    socket.flow()
    await outbox.flush()
    assert socket.written == ["x" * 4, b"y" * 6]


async def test_nothing_goes_after_a_close_frame() -> None:
    socket, counters, budget = MemorySocket(), Counters(), OutboundBudget(100)
    outbox = _outbox(socket, counters, budget)
    outbox.push("last")
    outbox.push(CloseFrame(1000, "bye"))
    outbox.push("too late")
    await outbox.flush()
    assert socket.written == ["last", ("close", 1000, "bye")]
    assert counters.dropped == 1


async def test_force_close_drops_the_queue_and_closes_ahead_of_it() -> None:
    socket, counters, budget = MemorySocket(), Counters(), OutboundBudget(100)
    outbox = _outbox(socket, counters, budget)
    socket.stall()
    for frame in ["a", "b", "c"]:
        outbox.push(frame)
    outbox.force_close(1008, "slow consumer")
    assert (outbox.queued_bytes, budget.total) == (0, 0)
    assert counters.dropped == 2  # "b" and "c"; "a" was being written
    socket.flow()
    await outbox.flush()
    assert socket.written[-1] == ("close", 1008, "slow consumer")
    assert "b" not in socket.written
    assert "c" not in socket.written


async def test_a_failed_write_drops_the_rest_and_frees_the_budget() -> None:
    socket, counters, budget = MemorySocket(), Counters(), OutboundBudget(100)
    outbox = _outbox(socket, counters, budget)
    socket.stall()
    outbox.push("a")
    outbox.push("b")
    socket.fail = True
    socket.flow()
    await outbox.flush()
    assert (counters.dropped, outbox.queued_bytes, budget.total) == (2, 0, 0)
    outbox.push("after")
    assert counters.dropped == 3


async def test_the_budget_is_the_sum_over_outboxes() -> None:
    budget = OutboundBudget(5)
    sockets = [MemorySocket(), MemorySocket()]
    outboxes = [_outbox(s, Counters(), budget) for s in sockets]
    for socket in sockets:
        socket.stall()
    outboxes[0].push("abc")
    outboxes[1].push(b"defg")
    assert budget.total == 7
    assert budget.over
    for socket in sockets:
        socket.flow()
    await asyncio.gather(*(o.flush() for o in outboxes))
    assert budget.total == 0
    assert not budget.over


class MemoryTransport:
    """What the direct path needs of a transport: its bytes, a pause switch."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.writing_paused = False

    def get_protocol(self) -> MemoryTransport:
        return self  # the protocol's writing_paused is this transport's

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes) -> None:
        self.data += data


class PreparedSocket(MemorySocket):
    closed = False
    prepared = True


async def test_an_idle_socket_gets_its_frames_straight_on_the_transport() -> None:
    """RFC 6455 framing for each length class: 7-bit, 16-bit and 64-bit lengths."""
    socket, counters, budget = PreparedSocket(), Counters(), OutboundBudget(1 << 20)
    transport = MemoryTransport()
    policy = OutboxPolicy(
        max_bytes=1 << 20,
        budget=budget,
        close_timeout_s=1.0,
        on_dropped=counters.on_dropped,
        on_overflow=counters.on_overflow,
    )
    outbox = Outbox(socket, policy, "c1", transport=transport)  # type: ignore[arg-type]
    big = b"b" * 70_000
    outbox.push("é")
    outbox.push(b"x" * 200)
    outbox.push(big)
    assert transport.data == (
        b"\x81\x02" + "é".encode() + b"\x82\x7e\x00\xc8" + b"x" * 200
        + b"\x82\x7f" + (70_000).to_bytes(8, "big") + big
    )  # fmt: skip
    assert socket.written == []
    assert outbox.queued_bytes == 0
    assert budget.total == 0

    # Paused at its high-water mark: aiohttp's send, queued behind as before.
    transport.writing_paused = True
    socket.stall()
    outbox.push(b"1")
    outbox.push(b"2")
    assert outbox.queued_bytes == 2
    transport.writing_paused = False
    outbox.push(b"3")  # something is queued: it waits its turn, never overtakes
    socket.flow()
    await outbox.flush()
    assert socket.written == [b"1", b"2", b"3"]
    assert outbox.queued_bytes == 0
    outbox.push(b"4")  # the queue is empty again: straight to the transport
    assert transport.data.endswith(b"\x82\x014")
    assert socket.written == [b"1", b"2", b"3"]
