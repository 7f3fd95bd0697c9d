"""wsgate.supervision on its own: the undo stack every role's close() unwinds, the
supervisor of background loops that fails readiness on a crash, and the bounded wait for
cancelled tasks. Pure asyncio: no sockets, no bus."""

from __future__ import annotations

import asyncio
import logging

import pytest

from wsgate.supervision import Supervisor, Teardown, cancel_and_wait, stop_task


async def test_unwind_runs_every_step_newest_first_and_logs_each_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []
    teardown = Teardown("role")

    async def close(name: str) -> None:
        ran.append(name)

    def fail(name: str) -> None:
        ran.append(name)
        raise RuntimeError(f"{name} broke")

    teardown.push("nats", lambda: close("nats"))
    teardown.push("sync", lambda: fail("sync"))
    teardown.push("grpc", lambda: close("grpc"))
    teardown.push("presence", lambda: close("presence"))
    teardown.push("broken", lambda: fail("broken"))
    assert teardown.pending == ["broken", "presence", "grpc", "sync", "nats"]
    with caplog.at_level(logging.ERROR):
        failed = await teardown.unwind()
    assert ran == ["broken", "presence", "grpc", "sync", "nats"]
    assert failed == ["broken", "sync"]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["role: undoing broken failed", "role: undoing sync failed"]
    assert all(r.exc_info is not None for r in caplog.records)  # with the traceback
    assert teardown.pending == []


async def test_unwind_is_idempotent_and_a_second_caller_waits_for_the_first() -> None:
    release = asyncio.Event()
    calls = 0

    async def slow() -> None:
        nonlocal calls
        calls += 1
        await release.wait()

    teardown = Teardown("role")
    teardown.push("slow", slow)
    first = asyncio.create_task(teardown.unwind())
    second = asyncio.create_task(teardown.unwind())
    await asyncio.sleep(0)  # both started: the first is in the step, the second waits
    assert not second.done()
    release.set()
    assert await first == []
    assert await second == []
    assert await teardown.unwind() == []
    assert calls == 1


async def test_a_cancelled_unwind_still_runs_the_rest_then_raises() -> None:
    entered = asyncio.Event()
    ran: list[str] = []

    async def hangs() -> None:
        entered.set()
        await asyncio.Event().wait()

    teardown = Teardown("role")
    teardown.push("last", lambda: ran.append("last"))
    teardown.push("hangs", hangs)
    task = asyncio.create_task(teardown.unwind())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ran == ["last"]


async def test_a_step_that_awaits_a_cancelled_task_is_a_failure_not_a_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    victim = asyncio.create_task(asyncio.Event().wait())
    await asyncio.sleep(0)
    victim.cancel()
    teardown = Teardown("role")
    ran: list[str] = []
    teardown.push("after", lambda: ran.append("after"))
    teardown.push("awaits", lambda: victim)
    with caplog.at_level(logging.ERROR):
        assert await teardown.unwind() == ["awaits"]
    assert ran == ["after"]
    assert "role: undoing awaits was cancelled" in caplog.text


async def test_a_crashed_task_is_logged_counted_and_named_until_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counted: list[str] = []
    supervisor = Supervisor("gateway", on_crash=counted.append)
    go = asyncio.Event()

    async def sweep() -> None:
        await go.wait()
        raise ValueError("sweep broke")

    task = supervisor.spawn("sweep", sweep())
    assert task.get_name() == "gateway sweep"
    assert supervisor.running == ["sweep"]
    assert supervisor.not_ready_reason() is None
    with caplog.at_level(logging.ERROR):
        go.set()
        await asyncio.wait([task])
    assert counted == ["sweep"]
    assert supervisor.not_ready_reason() == "background task crashed: sweep"
    assert supervisor.crashed == {"sweep": "ValueError: sweep broke"}
    assert supervisor.running == []
    (record,) = caplog.records
    assert record.getMessage() == (
        "gateway: background task sweep crashed; /readyz is 503 from now on"
    )
    assert record.exc_info is not None
    assert record.exc_info[1] is task.exception()


async def test_cancellation_and_a_normal_end_are_no_crash() -> None:
    counted: list[str] = []
    supervisor = Supervisor("worker", on_crash=counted.append)
    forever = supervisor.spawn("forever", asyncio.Event().wait())  # type: ignore[arg-type]

    async def done() -> None:
        return None

    finished = supervisor.spawn("finished", done())
    await asyncio.sleep(0)
    await stop_task(forever)
    await finished
    assert forever.cancelled()
    assert counted == []
    assert supervisor.not_ready_reason() is None
    assert supervisor.running == []


async def test_stop_task_does_not_raise_the_crash_but_does_raise_its_own_cancellation() -> None:
    async def crash() -> None:
        raise RuntimeError("boom")

    crashed = asyncio.create_task(crash())
    await asyncio.wait([crashed])
    await stop_task(crashed)  # already reported by its supervisor: not raised again
    await stop_task(None)

    refusing_release = asyncio.Event()

    async def refuses() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await refusing_release.wait()

    stubborn = asyncio.create_task(refuses())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(stop_task(stubborn))
    await asyncio.sleep(0)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    refusing_release.set()
    await stubborn


async def test_cancelled_tasks_are_awaited_and_those_that_refuse_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cleaned = asyncio.Event()
    release = asyncio.Event()

    async def polite() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits
            cleaned.set()

    async def stubborn() -> None:
        while True:
            try:
                await release.wait()
                return
            except asyncio.CancelledError:
                continue  # ignores its cancellation

    tasks = {
        asyncio.create_task(polite(), name="polite"),
        asyncio.create_task(stubborn(), name="stubborn"),
    }
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR):
        pending = await cancel_and_wait(tasks, 0.05, "handler task")
    assert cleaned.is_set()  # awaited, not only cancelled
    assert [t.get_name() for t in pending] == ["stubborn"]
    assert "1 handler task(s) still running 0.05 s after their cancellation: stubborn" in (
        caplog.text
    )
    release.set()
    await asyncio.wait(pending)
    assert await cancel_and_wait(set(), 0.05, "handler task") == set()
