"""The lifecycle every role shares: ``start()``, an idempotent ``close()``,
``wait_closed()`` and ``async with``, over one forward-only :class:`ServicePhase`."""

from __future__ import annotations

import asyncio
import enum
from types import TracebackType
from typing import Self


class ServicePhase(enum.Enum):
    """Where a service is. Moves only forward: NEW → RUNNING → CLOSING → CLOSED."""

    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class StartsAndCloses:
    """``async with`` for anything with ``start()`` and ``close()``: start on the way in,
    close on the way out (also on an exception)."""

    async def start(self) -> None:
        """Acquire resources and begin serving. Call once."""
        raise NotImplementedError

    async def close(self) -> None:
        """Stop and release everything. Idempotent."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class Service(StartsAndCloses):
    """Base of the roles' servers (Gateway, Worker, StateServer).

    Subclasses implement :meth:`start`, beginning with :meth:`_enter_running`, and
    :meth:`close`, beginning with ``if not await self._enter_closing(): return`` and
    ending (in a ``finally``) with :meth:`_mark_closed`.
    """

    def __init__(self) -> None:
        self.phase = ServicePhase.NEW
        self._closed_event = asyncio.Event()

    async def wait_closed(self) -> None:
        """Return once :meth:`close` has finished."""
        await self._closed_event.wait()

    def _enter_running(self) -> None:
        if self.phase is not ServicePhase.NEW:
            raise RuntimeError(f"{type(self).__name__} already {self.phase.value}")
        self.phase = ServicePhase.RUNNING

    async def _enter_closing(self) -> bool:
        """Move to CLOSING; False (after waiting for the close under way) if already past."""
        if self.phase in (ServicePhase.CLOSING, ServicePhase.CLOSED):
            await self._closed_event.wait()
            return False
        self.phase = ServicePhase.CLOSING
        return True

    def _mark_closed(self) -> None:
        self.phase = ServicePhase.CLOSED
        self._closed_event.set()
