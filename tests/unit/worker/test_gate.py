"""OutputGate: output waits for every write of the run; a failure closes it for good."""

from __future__ import annotations

import asyncio

import pytest

from wsgate.worker.gate import OutputGate


def test_keys_number_the_writes_of_a_run() -> None:
    gate = OutputGate("c_1:7")
    assert [gate.next_key(), gate.next_key()] == ["c_1:7:1", "c_1:7:2"]
    assert OutputGate(None).next_key() == ""
    event_gate = OutputGate("c_1", 7)  # an event's: its prefix made at the first write
    assert [event_gate.next_key(), event_gate.next_key()] == ["c_1:7:1", "c_1:7:2"]


async def test_open_waits_for_writes_registered_before_and_during_the_wait() -> None:
    loop = asyncio.get_running_loop()
    gate = OutputGate("k")
    first: asyncio.Future[None] = loop.create_future()
    second: asyncio.Future[None] = loop.create_future()
    assert not gate.holds_writes  # a handler that wrote nothing does not wait at all
    gate.hold(first)
    assert gate.holds_writes
    opening = asyncio.create_task(gate.open())
    await asyncio.sleep(0)
    gate.hold(second)  # a write started while output already waits
    first.set_result(None)
    await asyncio.sleep(0)
    assert not opening.done()
    assert gate.closed
    second.set_result(None)
    await opening
    assert not gate.closed


async def test_every_waiter_sees_a_failure() -> None:
    loop = asyncio.get_running_loop()
    gate = OutputGate("k")
    write: asyncio.Future[None] = loop.create_future()
    gate.hold(write)
    waiters = [asyncio.create_task(gate.open()) for _ in range(2)]
    await asyncio.sleep(0)
    write.set_exception(ConnectionError("state service gone"))
    for waiter in waiters:
        with pytest.raises(ConnectionError):
            await waiter
    with pytest.raises(ConnectionError):  # and later ones
        await gate.open()


async def test_abandon_stops_gating_without_unretrieved_exceptions() -> None:
    loop = asyncio.get_running_loop()
    gate = OutputGate("k")
    write: asyncio.Future[None] = loop.create_future()
    gate.hold(write)
    gate.abandon()
    await asyncio.wait_for(gate.open(), timeout=1)
    write.set_exception(ConnectionError("lost"))
    await asyncio.sleep(0)  # the done-callback retrieves it
    assert write.done()
