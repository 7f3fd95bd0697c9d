"""An app for tests of asyncio inside handlers: every handler kind runs :func:`probe`, which
uses ``asyncio.timeout``, ``asyncio.wait_for``, a ``TaskGroup`` and cancellation as a plain
asyncio program would, and says how each went (:data:`ALL_OK` when all went well), to be
compared with what it says in a plain asyncio program.

- ``/fn/{name}``, a function route: ``on_connect`` sends ``connect <result>``; messages are
  ``probe`` (reply ``message <result>``), ``alarm`` (set the alarm of ``probe-alarm``/name a
  few ms ahead; reply ``alarm set``), ``cancel-self`` (the handler cancels its own Task),
  ``hang`` (wait for :data:`released`), ``stop-intake`` (cancel nats-py's subscription
  tasks, as if they had died) and anything else, echoed. ``on_close`` and the alarm store
  their result in the object ``probe``/name, under ``close`` and ``alarm``. The alarm of
  ``probe-alarm``/``release`` sets :data:`released` instead.
- ``/obj/{name}``, a durable object (namespace ``probe-obj``) with the same commands (but
  ``hang`` and ``stop-intake``), storing its close and alarm results in its own storage.
"""

from __future__ import annotations

import asyncio
import time

from wsgate import Accept, AlarmInfo, App, Connection, ConnectRequest, DurableObject

app = App()

#: How :func:`probe`'s result starts when every construct behaved.
ALL_OK = "timeout=ok wait_for=ok cancel=ok taskgroup=ok"
#: The namespace of the function route's alarms and of the durable object.
ALARM_NAMESPACE = "probe-alarm"
OBJECT_NAMESPACE = "probe-obj"
#: Where the function route's close and alarm handlers store their results.
RESULTS_NAMESPACE = "probe"
#: The qualified name of the coroutine nats-py runs a subscription's callbacks in.
SUBSCRIPTION_TASK = "Subscription._wait_for_msgs"

#: What ``hang`` waits for; set by the alarm of ``probe-alarm``/``release``.
released = asyncio.Event()

#: A timeout's deadline, and the longest a construct may take to be called done.
SHORT_S = 0.05
LONG_S = 10.0
FAST_ENOUGH_S = 2.0


def _not_cancelled() -> bool:
    """Whether the running Task (the handler's) is not being cancelled itself."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


async def _timeout() -> str:
    started = time.monotonic()
    try:
        async with asyncio.timeout(SHORT_S):
            await asyncio.sleep(LONG_S)
    except TimeoutError:
        if time.monotonic() - started > FAST_ENOUGH_S:
            return "late"
        return "ok" if _not_cancelled() else "still-cancelling"
    return "no-timeout"


async def _wait_for() -> str:
    started = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.sleep(LONG_S), SHORT_S)
    except TimeoutError:
        if time.monotonic() - started > FAST_ENOUGH_S:
            return "late"
        return "ok" if _not_cancelled() else "still-cancelling"
    return "no-timeout"


async def _cancel() -> str:
    child = asyncio.create_task(asyncio.sleep(LONG_S))
    await asyncio.sleep(0)  # the child starts
    child.cancel()
    try:
        await child
    except asyncio.CancelledError:
        if not child.cancelled():
            return "child-not-cancelled"
        return "ok" if _not_cancelled() else "handler-cancelled"
    return "not-raised"


async def _taskgroup() -> str:
    sibling_cancelled = False

    async def failing() -> None:
        await asyncio.sleep(0.01)
        raise ValueError("failing as asked")

    async def sibling() -> None:
        nonlocal sibling_cancelled
        try:
            await asyncio.sleep(LONG_S)
        except asyncio.CancelledError:
            sibling_cancelled = True
            raise

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(failing())
            group.create_task(sibling())
    except ExceptionGroup as error:
        _, others = error.split(ValueError)
        if others is not None:
            return f"unexpected-{others!r}"
        return "ok" if sibling_cancelled else "sibling-not-cancelled"
    return "no-error"


async def probe() -> str:
    """``timeout=… wait_for=… cancel=… taskgroup=… cancelling=N``: ``ok`` for each
    construct that behaved as in a plain asyncio program, else what went wrong; then the
    running Task's ``cancelling()`` count at the end.

    The TaskGroup comes last, and the count is only reported, not judged: on Python 3.11 a
    TaskGroup whose child fails while it waits for its children leaves its parent Task's
    count at 1 (CPython's TaskGroup cancels the parent and never uncancels it; fixed in
    later versions). A handler's Task must show what a plain Task shows, whatever it is.
    """
    parts = []
    for name, check in (
        ("timeout", _timeout),
        ("wait_for", _wait_for),
        ("cancel", _cancel),
        ("taskgroup", _taskgroup),
    ):
        try:
            outcome = await check()
        except BaseException as exc:  # reported, not raised: the test shows what went wrong
            if isinstance(exc, asyncio.CancelledError) and not _not_cancelled():
                raise  # the handler itself is being cancelled (the worker shutting down)
            outcome = f"raised-{type(exc).__name__}"
        parts.append(f"{name}={outcome}")
    task = asyncio.current_task()
    parts.append(f"cancelling={task.cancelling() if task is not None else None}")
    return " ".join(parts)


async def cancel_self() -> None:
    """Cancel the running Task (the handler's own) and wait to be cancelled."""
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    await asyncio.sleep(1)


def stop_intake() -> int:
    """Cancel every nats-py subscription task, as if each had died; how many there were."""
    stopped = 0
    for task in asyncio.all_tasks():
        if getattr(task.get_coro(), "__qualname__", "") == SUBSCRIPTION_TASK:
            task.cancel()
            stopped += 1
    return stopped


# -- a function route ----------------------------------------------------------------------

fn = app.route("/fn/{name}")


@fn.on_connect
async def fn_connect(conn: Connection, request: ConnectRequest) -> Accept:
    await conn.send(f"connect {await probe()}")
    return Accept()


@fn.on_message
async def fn_message(conn: Connection, message: str | bytes) -> None:
    name = conn.params["name"]
    if message == "probe":
        await conn.send(f"message {await probe()}")
    elif message == "alarm":
        await conn.env.alarm(ALARM_NAMESPACE, name).set(time.time() + SHORT_S)
        await conn.send("alarm set")
    elif message == "cancel-self":
        await cancel_self()
    elif message == "hang":
        await released.wait()
        await conn.send("released")
    elif message == "stop-intake":
        await conn.send(f"stopped {stop_intake()}")
    else:
        await conn.send(message)


@fn.on_close
async def fn_close(conn: Connection, code: int, reason: str) -> None:
    result = await probe()
    await conn.env.storage(RESULTS_NAMESPACE, conn.params["name"]).put("close", result)


@app.on_alarm(ALARM_NAMESPACE)
async def fn_alarm(alarm: AlarmInfo) -> None:
    if alarm.name == "release":
        released.set()
        return
    result = await probe()
    await alarm.env.storage(RESULTS_NAMESPACE, alarm.name).put("alarm", result)


# -- a durable object ----------------------------------------------------------------------


@app.durable("/obj/{name}")
class ProbeObject(DurableObject):
    """The same probes as the function route's, each in a turn of the object."""

    namespace = OBJECT_NAMESPACE

    async def on_connect(self, conn: Connection, request: ConnectRequest) -> Accept:
        await conn.send(f"connect {await probe()}")
        return Accept()

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        if message == "probe":
            await conn.send(f"message {await probe()}")
        elif message == "alarm":
            await self.alarm.set(time.time() + SHORT_S)
            await conn.send("alarm set")
        elif message == "cancel-self":
            await cancel_self()
        else:
            await conn.send(message)

    async def on_close(self, conn: Connection, code: int, reason: str) -> None:
        await self.storage.put("close", await probe())

    async def on_alarm(self) -> None:
        await self.storage.put("alarm", await probe())
