"""ObjectLocks: per-object FIFO holds, with no entry left behind."""

from __future__ import annotations

import asyncio

import pytest

from wsgate.stateservice.locks import ObjectLocks


async def test_holds_are_granted_in_arrival_order() -> None:
    locks = ObjectLocks()
    order: list[int] = []
    await locks.acquire("a")

    async def take(i: int) -> None:
        async with locks.holding("a"):
            order.append(i)

    waiters = [asyncio.create_task(take(i)) for i in range(5)]
    await asyncio.sleep(0)  # let them all queue
    assert not locks.is_free("a")
    locks.release("a")
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2, 3, 4]
    assert locks.is_free("a")
    assert locks.held() == 0


async def test_objects_do_not_wait_for_each_other() -> None:
    locks = ObjectLocks()
    await locks.acquire("a")
    await asyncio.wait_for(locks.acquire("b"), timeout=1)
    locks.release("b")
    locks.release("a")
    assert locks.held() == 0


async def test_a_cancelled_waiter_gives_up_its_place() -> None:
    locks = ObjectLocks()
    await locks.acquire("a")
    cancelled = asyncio.create_task(locks.acquire("a"))
    later = asyncio.create_task(locks.acquire("a"))
    await asyncio.sleep(0)
    cancelled.cancel()
    locks.release("a")
    await later  # the hold skipped the cancelled waiter
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    locks.release("a")
    assert locks.held() == 0


async def test_releasing_what_is_not_held_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not held"):
        ObjectLocks().release("a")
