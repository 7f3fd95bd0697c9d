"""An asyncio event loop on a background thread, for tests that drive async code from
synchronous code (Hypothesis runs its examples synchronously)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """One asyncio event loop running on a background thread until :meth:`close`."""

    def __init__(self, name: str, step_timeout_s: float) -> None:
        self.loop = asyncio.new_event_loop()
        self.step_timeout_s = step_timeout_s
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coro`` on the loop and return its result (or raise its exception); a step
        that takes longer than ``timeout_s`` (default: the step timeout) is cancelled and
        fails the test."""
        timeout_s = self.step_timeout_s if timeout_s is None else timeout_s
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            if future.done():
                raise  # the coroutine's own TimeoutError (StateTimeout, say)
            future.cancel()
            raise AssertionError(f"a step did not finish within {timeout_s} s") from None

    def close(self) -> None:
        """Cancel what is left on the loop, stop it, and close it."""

        async def cancel_the_rest() -> None:
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()
            await self.loop.shutdown_default_executor()

        try:
            self.run(cancel_the_rest())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()
