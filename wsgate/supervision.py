"""How every role starts, stops and watches its background work.

Three small pieces, shared by the gateway, the worker and the state service:

- :class:`Teardown`: each step of a role's ``start()`` registers its undo as soon as it has
  succeeded; ``close()`` unwinds them newest first. A step that fails is logged with its
  name and the unwinding goes on, so one failure never skips the NATS drain or the gRPC
  close behind it. Unwinding is idempotent (a second caller waits for the first), and it
  undoes exactly what was started, however far ``start()`` got.
- :class:`Supervisor`: the role's named background loops (sweeps, leases, announcements).
  A loop that ends with an exception (anything but its cancellation at close) is logged
  with its traceback, counted, and turns the role's ``/readyz`` to 503 naming the loop:
  a role whose sweep is dead must not look healthy.
- :func:`stop_task` and :func:`cancel_and_wait`: cancel tasks and wait, bounded, until
  they have finished, logging those that refuse to.

Components that run a loop take a ``spawn`` (:data:`Spawn`) and start it through it; on
their own (in unit tests) they default to :func:`unsupervised`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import traceback
from collections.abc import Awaitable, Callable, Collection, Coroutine
from typing import Any

log = logging.getLogger(__name__)

#: How long tasks cancelled at a drain's deadline get to finish (their ``finally`` and
#: ``except CancelledError`` blocks) before the close goes on without them.
OVERDUE_TASK_WAIT_S = 5.0

#: Starts a named background task: ``spawn(name, coroutine)``.
Spawn = Callable[[str, Coroutine[Any, Any, None]], "asyncio.Task[None]"]

#: An undo: a function returning an awaitable (``close``) or nothing (``cancel``).
Undo = Callable[[], Awaitable[object] | None]


def unsupervised(name: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """A plain named Task: the default :data:`Spawn` of a component used on its own."""
    return asyncio.get_running_loop().create_task(coro, name=name)


class Teardown:
    """A stack of named undo steps, unwound newest first, every step run.

    ``owner`` names the role in the log lines (``"gateway"``).
    """

    def __init__(self, owner: str, logger: logging.Logger | None = None) -> None:
        self._owner = owner
        self._log = logger or log
        self._steps: list[tuple[str, Undo]] = []
        self._unwinding: asyncio.Future[list[str]] | None = None

    @property
    def pending(self) -> list[str]:
        """The names of the steps not undone yet, newest first."""
        return [name for name, _ in reversed(self._steps)]

    def push(self, name: str, undo: Undo) -> None:
        """Register ``undo`` (run by :meth:`unwind`) for the step ``name`` just done."""
        self._steps.append((name, undo))

    async def unwind(self) -> list[str]:
        """Run every undo newest first, each even when one before it failed. Returns the
        names of the steps that failed (each logged with its traceback).

        Idempotent: a call while an unwinding is under way waits for it and returns its
        result; a later one runs only steps pushed since. If the caller is cancelled
        meanwhile, the remaining steps still run, then CancelledError is raised.
        """
        if self._unwinding is not None and not self._unwinding.done():
            return await asyncio.shield(self._unwinding)
        self._unwinding = asyncio.get_running_loop().create_future()
        failed: list[str] = []
        cancelled = False
        task = asyncio.current_task()
        try:
            while self._steps:
                name, undo = self._steps.pop()
                try:
                    result = undo()
                    if inspect.isawaitable(result):
                        await result
                except asyncio.CancelledError:
                    if task is not None and task.cancelling():
                        # close() itself was cancelled: finish undoing, then say so.
                        cancelled = True
                        task.uncancel()
                        continue
                    # A step awaited a task that was cancelled: the step did not finish.
                    failed.append(name)
                    self._log.error("%s: undoing %s was cancelled", self._owner, name)
                except Exception:
                    failed.append(name)
                    self._log.exception("%s: undoing %s failed", self._owner, name)
        finally:
            self._unwinding.set_result(failed)
        if cancelled:
            raise asyncio.CancelledError
        return failed


class Supervisor:
    """The named background tasks of one role, and whether one of them crashed.

    ``on_crash(name)`` counts a crash (the role's
    ``wsgate_<role>_background_crashes_total{task}``). :meth:`not_ready_reason` is what
    the role's ``/readyz`` answers 503 with once a task crashed (it stays so: a dead
    loop does not come back by itself; the process must be restarted).
    """

    def __init__(
        self,
        role: str,
        on_crash: Callable[[str], None] = lambda name: None,
        logger: logging.Logger | None = None,
    ) -> None:
        self._role = role
        self._on_crash = on_crash
        self._log = logger or log
        self._tasks: dict[asyncio.Task[None], str] = {}
        #: Crashed tasks, by name: a one-line description of what ended them.
        self.crashed: dict[str, str] = {}

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Start ``coro`` as the supervised background task ``name`` (a :data:`Spawn`)."""
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._role} {name}")
        self.watch(name, task)
        return task

    def watch(self, name: str, task: asyncio.Task[Any]) -> None:
        """Supervise a task started elsewhere."""
        self._tasks[task] = name
        task.add_done_callback(self._done)

    @property
    def running(self) -> list[str]:
        """The names of the supervised tasks not finished yet."""
        return sorted(self._tasks.values())

    def not_ready_reason(self) -> str | None:
        """None while no task crashed; else which did (for ``/readyz``)."""
        if not self.crashed:
            return None
        names = ", ".join(sorted(self.crashed))
        return f"background task crashed: {names}"

    def _done(self, task: asyncio.Task[Any]) -> None:
        name = self._tasks.pop(task, "?")
        if task.cancelled():
            return  # stopped at close, by its owner
        exc = task.exception()
        if exc is None:
            return  # finished its work
        self.crashed[name] = "".join(traceback.format_exception_only(exc)).strip()
        self._on_crash(name)
        self._log.error(
            "%s: background task %s crashed; /readyz is 503 from now on",
            self._role,
            name,
            exc_info=exc,
        )


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait until it has finished. Its crash, if it crashed, is not
    raised (its supervisor logged it); the caller's own cancellation is."""
    if task is None:
        return
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()  # retrieved: asyncio logs no "exception was never retrieved"


async def cancel_and_wait(
    tasks: Collection[asyncio.Task[Any]],
    timeout_s: float,
    what: str,
    logger: logging.Logger | None = None,
) -> set[asyncio.Task[Any]]:
    """Cancel ``tasks`` and wait up to ``timeout_s`` for them to finish; returns (and logs,
    naming each) those still running then: they ignore their cancellation. ``what``
    names them in the log line (``"handler task"``)."""
    if not tasks:
        return set()
    for task in tasks:
        task.cancel()
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # their failures were the caller's to report
    if pending:
        (logger or log).error(
            "%d %s(s) still running %.3g s after their cancellation: %s",
            len(pending),
            what,
            timeout_s,
            ", ".join(sorted(t.get_name() for t in pending)),
        )
    return pending
