"""Eagerly started coroutines: finished at once, or resumed in a task when they wait."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from wsgate.eager import resume as _resume
from wsgate.eager import start_eagerly


def _start(coro: Coroutine[Any, Any, Any]) -> Any:
    return coro.send(None)


async def test_a_suspended_write_finishes_with_its_result() -> None:
    loop = asyncio.get_running_loop()
    first, second = loop.create_future(), loop.create_future()
    steps: list[str] = []

    async def write() -> None:
        steps.append(f"got {await first}")
        await asyncio.sleep(0)
        steps.append(f"got {await second}")

    coro = write()
    suspended_on = _start(coro)
    assert suspended_on is first
    loop.call_soon(first.set_result, 1)
    loop.call_soon(loop.call_soon, second.set_result, 2)
    await _resume(coro, suspended_on)
    assert steps == ["got 1", "got 2"]


async def test_a_failure_reaches_the_coroutine() -> None:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    async def write() -> str:
        try:
            await fut
        except ConnectionResetError:
            raise ConnectionError("lost") from None
        return "unreachable"

    coro = write()
    suspended_on = _start(coro)
    loop.call_soon(fut.set_exception, ConnectionResetError())
    with pytest.raises(ConnectionError, match="lost"):
        await _resume(coro, suspended_on)


async def test_cancelling_the_resumer_cancels_the_coroutine() -> None:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    cleaned = asyncio.Event()

    async def write() -> None:
        try:
            await fut
        finally:
            cleaned.set()

    coro = write()
    task = loop.create_task(_resume(coro, _start(coro)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned.is_set()


async def test_start_eagerly_runs_at_once_when_nothing_waits() -> None:
    ran: list[int] = []

    async def quick() -> None:
        ran.append(1)

    assert start_eagerly(asyncio.get_running_loop(), quick()) is None
    assert ran == [1]


async def test_start_eagerly_hands_a_waiting_coroutine_to_a_task() -> None:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    ran: list[str] = []

    async def slow() -> None:
        ran.append("start")
        ran.append(await fut)

    task = start_eagerly(loop, slow())
    assert ran == ["start"]
    assert task is not None
    fut.set_result("end")
    await task
    assert ran == ["start", "end"]
