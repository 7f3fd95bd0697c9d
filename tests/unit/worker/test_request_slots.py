"""The worker's handler slots, taken and given back through its own bookkeeping (its
spawner, its set of Tasks, the in-flight gauge), with no bus: first come, first served; a
slot comes back when a request's Task ends, however it ends."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from wsgate.config import WorkerConfig
from wsgate.worker.app import App
from wsgate.worker.runtime import Worker


def _worker(slots: int) -> Worker:
    worker = Worker(WorkerConfig(max_concurrent_events=slots), App())
    worker._loop = asyncio.get_running_loop()  # what start() sets; no bus is needed here
    return worker


async def test_requests_wait_for_a_slot_in_order_and_a_failure_gives_it_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = _worker(1)
    release = asyncio.Event()
    ran: list[str] = []

    async def handler(msg: Any) -> None:
        ran.append(msg)
        if msg == "first":
            await release.wait()
            raise RuntimeError("the handler's own failure")

    spawn = worker._spawner(handler)
    await spawn("first")
    waiting = [asyncio.ensure_future(spawn(name)) for name in ("second", "third")]
    await asyncio.sleep(0)
    assert ran == ["first"]
    assert not any(w.done() for w in waiting)
    assert worker.metrics.in_flight.value == 1
    release.set()
    await asyncio.wait_for(asyncio.gather(*waiting), 5)
    while worker._tasks:
        await asyncio.wait(set(worker._tasks.values()))
    assert ran == ["first", "second", "third"]
    assert "request handling failed" in caplog.text
    assert (worker._free_slots, worker.metrics.in_flight.value) == (1, 0)


async def test_a_request_cancelled_before_its_first_step_gives_its_slot_back() -> None:
    worker = _worker(1)
    ran: list[str] = []

    async def handler(msg: Any) -> None:
        ran.append(msg)

    spawn = worker._spawner(handler)
    await spawn("cancelled")
    (task,) = worker._tasks.values()
    if task.done():  # pragma: no cover - eager tasks (Python 3.12+) start at once
        pytest.skip("the Task ran its first step when it was made")
    task.cancel()
    await asyncio.wait([task])
    assert ran == []
    assert task.cancelled()
    worker._settle_unstarted()  # what the drain does after cancelling
    assert (worker._tasks, worker._free_slots, worker.metrics.in_flight.value) == ({}, 1, 0)
    await asyncio.wait_for(spawn("next"), 5)  # the slot is free: taken at once
    while worker._tasks:
        await asyncio.wait(set(worker._tasks.values()))
    assert ran == ["next"]


async def test_a_request_cancelled_while_it_waits_for_a_slot_takes_none() -> None:
    worker = _worker(1)
    release = asyncio.Event()
    ran: list[str] = []

    async def handler(msg: Any) -> None:
        ran.append(msg)
        await release.wait()

    spawn = worker._spawner(handler)
    await spawn("running")
    given_up = asyncio.ensure_future(spawn("given up"))
    later = asyncio.ensure_future(spawn("later"))
    await asyncio.sleep(0)
    release.set()  # the running handler ends first: its slot passes the cancelled wait by
    given_up.cancel()
    with pytest.raises(asyncio.CancelledError):
        await given_up
    await asyncio.wait_for(later, 5)
    while worker._tasks:
        await asyncio.wait(set(worker._tasks.values()))
    assert ran == ["running", "later"]
    assert (worker._free_slots, worker.metrics.in_flight.value) == (1, 0)
