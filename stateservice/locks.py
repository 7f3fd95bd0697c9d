"""Per-object exclusive holds, first come first served.

A transaction holds its object from begin to commit; a plain write to a held object waits
for its turn behind it (and behind transactions queued before it), then is submitted to
storage and no longer needs the hold: storage applies submissions in order. So writes
and transactions on one object take effect in one order, and objects never wait for each
other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Hashable


class _Queue:
    __slots__ = ("held", "waiters")

    def __init__(self) -> None:
        self.held = False
        self.waiters: deque[asyncio.Future[None]] = deque()


class ObjectLocks:
    """FIFO locks keyed by object; an entry exists only while held or waited for."""

    def __init__(self) -> None:
        self._queues: dict[Hashable, _Queue] = {}

    def is_free(self, key: Hashable) -> bool:
        """Nobody holds ``key`` or waits for it: a write may go straight to storage."""
        return key not in self._queues

    def held(self) -> int:
        """How many objects are held or waited for (for metrics and tests)."""
        return len(self._queues)

    async def acquire(self, key: Hashable) -> None:
        """Wait until ``key`` is ours. Cancellation while waiting gives up the place."""
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue()
        if not queue.held and not queue.waiters:
            queue.held = True
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # We were handed the hold just as we were cancelled: pass it on.
                self.release(key)
            else:
                # release() may already have dropped it while skipping cancelled waiters.
                if waiter in queue.waiters:
                    queue.waiters.remove(waiter)
                self._forget_if_unused(key, queue)
            raise

    def release(self, key: Hashable) -> None:
        """Give ``key`` to the next waiter, or forget it. Raises RuntimeError if not held."""
        queue = self._queues.get(key)
        if queue is None or not queue.held:
            raise RuntimeError(f"{key!r} is not held")
        while queue.waiters:
            waiter = queue.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # stays held: ownership passes to the waiter
                return
        queue.held = False
        self._forget_if_unused(key, queue)

    @contextlib.asynccontextmanager
    async def holding(self, key: Hashable) -> AsyncIterator[None]:
        """``async with locks.holding(obj):`` hold ``key`` for the block."""
        await self.acquire(key)
        try:
            yield
        finally:
            self.release(key)

    def _forget_if_unused(self, key: Hashable, queue: _Queue) -> None:
        if not queue.held and not queue.waiters and self._queues.get(key) is queue:
            del self._queues[key]
