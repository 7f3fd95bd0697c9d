"""The worker's alarm runner without NATS: a fake bus hands it AlarmEvents and records
its answers. The state service owns the clock and the retries (with backoff); the
runner's part is to run each event it is given once, answer ``ok`` only when the handler
returned and its writes are durable, and answer a failure (logged) otherwise, which
makes the state service retry the same firing later."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest
from nats.aio.msg import Msg

from wsgate import subjects
from wsgate.errors import StateError
from wsgate.v1 import envelope_pb2 as pb
from wsgate.worker.alarm_runner import MAX_ERROR_CHARS, AlarmRunner
from wsgate.worker.alarms_client import AlarmInfo
from wsgate.worker.app import App
from wsgate.worker.durable import DurableObject
from wsgate.worker.env import Env
from wsgate.worker.gate import current_gate
from wsgate.worker.work import Work

PREFIX = "t"
REPLY = "t.inbox.state.r1.x.1"
WAIT_S = 5.0


class FakeSubscription:
    def __init__(self) -> None:
        self.unsubscribed = False

    async def unsubscribe(self) -> None:
        self.unsubscribed = True


class FakeBus:
    """What the runner uses of a NATS client: subscribe, flush, publish (answers)."""

    def __init__(self) -> None:
        self.subscriptions: dict[str, tuple[str, Callable[[Msg], Awaitable[None]]]] = {}
        self.subs: list[FakeSubscription] = []
        self.flushes = 0
        self.answers: asyncio.Queue[tuple[str, pb.AlarmResult]] = asyncio.Queue()

    async def subscribe(
        self, subject: str, queue: str = "", cb: Callable[[Msg], Awaitable[None]] | None = None
    ) -> FakeSubscription:
        assert cb is not None
        self.subscriptions[subject] = (queue, cb)
        self.subs.append(FakeSubscription())
        return self.subs[-1]

    async def flush(self) -> None:
        self.flushes += 1

    async def publish(self, subject: str, payload: bytes, headers: object = None) -> None:
        self.answers.put_nowait((subject, pb.AlarmResult.FromString(payload)))

    async def deliver(self, namespace: str, data: bytes, reply: str = REPLY) -> None:
        """What NATS does with a message on ``namespace``'s alarm subject."""
        subject = subjects.alarm_subject(PREFIX, namespace)
        _, cb = self.subscriptions[subject]
        await cb(Msg(_client=self, subject=subject, reply=reply, data=data))  # type: ignore[arg-type]

    async def answer(self) -> pb.AlarmResult:
        subject, result = await asyncio.wait_for(self.answers.get(), WAIT_S)
        assert subject == REPLY
        return result


def _event(namespace: str = "rooms", *, retry: int = 0, firing: str = "f1") -> bytes:
    return pb.AlarmEvent(
        namespace=namespace, name="lobby", scheduled_ms=1_700_000_000_000, retry_count=retry,
        firing_id=firing,
    ).SerializeToString()  # fmt: skip


def _runner(bus: FakeBus, app: App, **kwargs: object) -> AlarmRunner:
    options: dict[str, object] = {"max_concurrent": 4, "drain_timeout_s": WAIT_S} | kwargs
    return AlarmRunner(bus, app, Env.__new__(Env), prefix=PREFIX, **options)  # type: ignore[arg-type]


async def test_it_subscribes_for_each_namespace_with_a_handler_in_its_queue_group() -> None:
    app = App()

    @app.on_alarm("rooms")
    async def ring(alarm: AlarmInfo) -> None: ...

    bus = FakeBus()
    runner = _runner(bus, app)
    await runner.start()
    assert runner.namespaces == ("rooms",)
    assert bus.subscriptions[subjects.alarm_subject(PREFIX, "rooms")][0] == "alarms-rooms"
    assert bus.flushes == 1  # NATS has the subscription before the worker says it is ready
    await runner.close()
    assert all(sub.unsubscribed for sub in bus.subs)

    idle = FakeBus()
    await _runner(idle, App()).start()
    assert (idle.subscriptions, idle.flushes) == ({}, 0)


async def test_an_alarm_runs_once_and_is_ok_once_its_writes_are_durable() -> None:
    app = App()
    seen: list[tuple[AlarmInfo, str]] = []
    write: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @app.on_alarm("rooms")
    async def ring(alarm: AlarmInfo) -> None:
        gate = current_gate.get()
        assert gate is not None
        seen.append((alarm, gate.next_key()))
        gate.hold(write)  # a storage write still in flight when the handler returns

    bus = FakeBus()
    runner = _runner(bus, app)
    await runner.start()
    await bus.deliver("rooms", _event())
    await asyncio.sleep(0)
    assert bus.answers.empty()  # not before the write is durable
    write.set_result(None)
    assert (await bus.answer()).ok
    [(info, key)] = seen
    assert (info.namespace, info.name, info.retry_count, info.firing_id) == (
        "rooms",
        "lobby",
        0,
        "f1",
    )
    assert info.scheduled_ms == 1_700_000_000_000
    assert not info.is_retry
    assert key == "alarm:f1:1"  # a retry of this firing writes under the same keys
    await runner.close()


async def test_a_raising_handler_answers_its_error_is_logged_and_its_retry_runs_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = App()
    tries: list[int] = []

    @app.on_alarm("rooms")
    async def ring(alarm: AlarmInfo) -> None:
        tries.append(alarm.retry_count)
        if not alarm.is_retry:
            raise ValueError("boom")

    bus = FakeBus()
    runner = _runner(bus, app)
    await runner.start()
    with caplog.at_level(logging.ERROR, logger="wsgate.worker.alarm_runner"):
        await bus.deliver("rooms", _event())
        failed = await bus.answer()
    assert (failed.ok, failed.error) == (False, "ValueError: boom")
    assert "alarm handler failed for 'rooms'/'lobby' (retry 0)" in caplog.text
    # The state service sends the same firing again later (its backoff): it runs again.
    await bus.deliver("rooms", _event(retry=1))
    assert (await bus.answer()).ok
    assert tries == [0, 1]
    await runner.close()


@pytest.mark.parametrize(("length", "cut"), [(MAX_ERROR_CHARS, False), (MAX_ERROR_CHARS + 1, True)])
async def test_the_error_answered_is_cut_at_its_limit(length: int, cut: bool) -> None:
    app = App()
    message = "x" * (length - len("ValueError: "))

    @app.on_alarm("rooms")
    async def ring(alarm: AlarmInfo) -> None:
        raise ValueError(message)

    bus = FakeBus()
    runner = _runner(bus, app)
    await runner.start()
    await bus.deliver("rooms", _event())
    error = (await bus.answer()).error
    assert len(error) == MAX_ERROR_CHARS
    assert error.endswith("x" if cut else message[-10:])
    assert (error == f"ValueError: {message}") is not cut
    await runner.close()


async def test_a_failed_write_fails_the_alarm_though_the_handler_returned() -> None:
    app = App()

    @app.on_alarm("rooms")
    async def ring(alarm: AlarmInfo) -> None:
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        failed.set_exception(StateError("not durable"))
        gate = current_gate.get()
        assert gate is not None
        gate.hold(failed)

    bus = FakeBus()
    runner = _runner(bus, app)
    await runner.start()
    await bus.deliver("rooms", _event())
    result = await bus.answer()
    assert not result.ok
    assert "not durable" in result.error
    await runner.close()


@pytest.mark.parametrize(
    ("data", "reply", "answered"),
    [
        (b"\xff not an envelope", REPLY, True),
        (_event(firing=""), REPLY, True),  # no firing id
        (_event(namespace="other"), REPLY, True),  # no handler for that namespace
        (_event(), "", False),  # no reply subject: nowhere to answer
    ],
)
async def test_what_is_no_alarm_of_a_handled_namespace_is_counted_and_refused(
    data: bytes, reply: str, answered: bool
) -> None:
    app = App()
    ran: list[AlarmInfo] = []

    @app.on_alarm("rooms")
    async def ring(alarm: AlarmInfo) -> None:
        ran.append(alarm)

    bus, garbage = FakeBus(), []
    runner = _runner(bus, app, on_garbage=lambda: garbage.append(1))
    await runner.start()
    await bus.deliver("rooms", data, reply=reply)
    assert garbage == [1]
    assert ran == []
    if answered:
        assert not (await bus.answer()).ok
    assert bus.answers.empty()
    await runner.close()


async def test_max_concurrent_bounds_the_handlers_running_at_once() -> None:
    with pytest.raises(ValueError, match="max_concurrent"):
        _runner(FakeBus(), App(), max_concurrent=0)
    app = App()
    release, started = asyncio.Event(), asyncio.Event()
    running: list[str] = []

    @app.on_alarm("rooms")
    async def ring(alarm: AlarmInfo) -> None:
        running.append(alarm.firing_id)
        started.set()
        await release.wait()

    bus = FakeBus()
    runner = _runner(bus, app, max_concurrent=1)  # the limit: one at a time
    await runner.start()
    await bus.deliver("rooms", _event(firing="a"))
    await asyncio.wait_for(started.wait(), WAIT_S)
    second = asyncio.ensure_future(bus.deliver("rooms", _event(firing="b")))
    await asyncio.sleep(0)  # NATS' callback for "b" runs: it waits for a slot
    assert running == ["a"]
    assert not second.done()
    release.set()
    assert (await bus.answer()).ok
    await asyncio.wait_for(second, WAIT_S)
    assert (await bus.answer()).ok
    assert running == ["a", "b"]
    await runner.close()


async def test_close_cancels_a_handler_past_the_drain_timeout_and_refuses_late_alarms() -> None:
    app = App()
    started = asyncio.Event()

    @app.on_alarm("rooms")
    async def ring(alarm: AlarmInfo) -> None:
        started.set()
        await asyncio.Event().wait()  # never returns by itself

    bus = FakeBus()
    runner = _runner(bus, app, drain_timeout_s=0.05)
    await runner.start()
    await bus.deliver("rooms", _event())
    await asyncio.wait_for(started.wait(), WAIT_S)
    await asyncio.wait_for(runner.close(), WAIT_S)
    cancelled = await bus.answer()
    assert (cancelled.ok, cancelled.error) == (False, "cancelled: the worker shut down")
    await runner.close()  # idempotent
    await bus.deliver("rooms", _event(firing="late"))  # taken while closing
    late = await bus.answer()
    assert (late.ok, late.error) == (False, "worker shutting down")


async def test_a_durable_class_alarm_is_a_turn_of_its_objects_activation() -> None:
    app = App()

    @app.durable("/room/{name}")
    class Room(DurableObject):
        namespace = "rooms"

        async def on_alarm(self) -> None: ...

    submitted: list[tuple[type, str, Work]] = []
    turned = asyncio.Event()

    class FakeActivations:
        def submit(self, cls: type, name: str, work: Work) -> None:
            submitted.append((cls, name, work))
            work.done.set_result(None)  # the activation answers, once the turn committed
            turned.set()

    bus = FakeBus()
    runner = _runner(bus, app, activations=FakeActivations(), worker_id="w1")
    await runner.start()
    assert subjects.worker_subject(PREFIX, "w1", "alarm") in bus.subscriptions
    await bus.deliver("rooms", _event())
    await asyncio.wait_for(turned.wait(), WAIT_S)
    [(cls, name, _work)] = submitted
    assert (cls, name) == (Room, "lobby")
    assert bus.answers.empty()  # the runner does not answer for the turn
    await runner.close()
