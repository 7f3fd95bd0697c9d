"""Running a coroutine eagerly: up to its first real suspension, in the caller's step.

Python 3.12 has eager tasks; wsgate supports 3.11. On the hot path most coroutines finish
without ever waiting (a write into a socket buffer that has room), and creating and
scheduling a Task for each costs more than the work. So the coroutine is started here, and
only if it does suspend is it handed to a Task that carries on from where it stopped.

Never for user code: a coroutine started here runs inside the caller's Task, so an
``asyncio.timeout`` in it would cancel the caller. Handlers get a Task of their own
(:func:`start_task`).
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: Python 3.12's Tasks can run their first step at once, as real Tasks.
_EAGER_TASKS = sys.version_info >= (3, 12)


def start_task(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, T],
    *,
    context: contextvars.Context | None = None,
) -> asyncio.Task[T]:
    """A Task of its own for ``coro``: what user handlers run in, so that
    ``asyncio.timeout``, ``asyncio.wait_for``, ``TaskGroup`` and cancellation inside them
    concern them alone, as in any asyncio program. On Python 3.12 and later the Task runs
    its first step at once (an eager task), as :func:`start_eagerly` does without a Task.
    """
    if _EAGER_TASKS:  # pragma: no cover - depends on the interpreter
        return asyncio.Task(coro, loop=loop, context=context, eager_start=True)  # type: ignore[call-arg]
    return loop.create_task(coro, context=context)


def start_eagerly(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]
) -> asyncio.Task[None] | None:
    """Run ``coro`` until it suspends. None if it finished (its exception, if any, is
    raised here); otherwise the Task that finishes it."""
    try:
        suspended_on = coro.send(None)
    except StopIteration:
        return None
    return loop.create_task(resume(coro, suspended_on))


async def resume(coro: Coroutine[Any, Any, Any], suspended_on: Any) -> Any:
    """Run ``coro`` to its end from where it suspended (awaiting ``suspended_on``), as an
    asyncio Task would: wait for that future, then send its outcome into the coroutine.
    Cancelling the caller cancels the coroutine."""
    while True:
        try:
            if suspended_on is None:  # a bare yield, as in asyncio.sleep(0)
                await asyncio.sleep(0)
            else:
                # What a Task does with a future its coroutine yielded: take it as awaited.
                suspended_on._asyncio_future_blocking = False
                await suspended_on
        except BaseException as exc:  # the future failed, or the caller was cancelled
            try:
                suspended_on = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            suspended_on = coro.send(None)
        except StopIteration as stop:
            return stop.value
