"""Whether a worker still takes requests off its subscriptions.

A worker whose intake stopped looks alive (its process runs, NATS is connected) while it
takes nothing: a subscription's delivery task ended (nats-py stops delivering to a
subscription whose task was cancelled), or every handler slot is held by handlers that do
not finish, so requests pile up unread. Either way the worker must say so: ``/readyz``
answers 503 while :meth:`IntakeWatchdog.check` names a reason, and the reason is logged.

Pure bookkeeping with the clock passed in; the worker calls :meth:`taken` each time it
takes a request, :meth:`waiting` while one waits for a slot, and :meth:`check` now and
then with its subscriptions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class Subscription(Protocol):
    """What the watchdog reads of a nats-py subscription."""

    @property
    def subject(self) -> str:
        """The subject."""
        ...

    @property
    def pending_msgs(self) -> int:
        """Messages received and not yet taken by the callback."""
        ...


class IntakeWatchdog:
    """Tells why a worker's intake stopped, or None while it works."""

    def __init__(self, stall_s: float, now: float) -> None:
        if not stall_s > 0:
            raise ValueError(f"stall_s must be > 0, got {stall_s}")
        self._stall_s = stall_s
        self._last_taken = now
        self._waiting = 0

    def taken(self, now: float) -> None:
        """A request was taken (it got a handler slot)."""
        self._last_taken = now

    def waiting(self, delta: int) -> None:
        """A request started (+1) or stopped (-1) waiting for a handler slot."""
        self._waiting += delta

    def check(self, subscriptions: Sequence[Subscription], now: float) -> str | None:
        """Why intake stopped, or None."""
        for sub in subscriptions:
            task: Any = getattr(sub, "_wait_for_msgs_task", None)
            if task is not None and task.done():
                return f"the subscription to {sub.subject} stopped delivering requests"
        queued = sum(sub.pending_msgs for sub in subscriptions) + self._waiting
        idle_s = now - self._last_taken
        if queued and idle_s >= self._stall_s:
            return (
                f"{queued} request(s) waiting and none taken for {idle_s:.1f} s "
                "(every handler slot is held by a handler that does not finish)"
            )
        return None
