"""Durable object alarms end to end: a real nats-server, the state service and workers as
separate processes (tests/apps/alarms.py is their app), and the workers' own client; the
state service on each database in turn (SQLite, then PostgreSQL: ``module_backend``).

The state service runs with short backoffs (100 ms doubling to 400 ms) so that retries
happen within a test; the handlers record each run in the object's storage, which the
tests read back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.backends import Backend
from tests.harness import Stack, eventually, stack_context
from wsgate.bus import connect_bus
from wsgate.config import StateConfig
from wsgate.errors import InvalidObjectId
from wsgate.stateservice.alarms import AlarmScheduler, PutAlarm, ReadAlarm
from wsgate.stateservice.storage import ObjectId
from wsgate.v1 import envelope_pb2 as envelope_pb
from wsgate.worker.alarms_client import ObjectAlarm, from_epoch_ms
from wsgate.worker.state_client import StateClient

pytestmark = pytest.mark.timeout(90)

T = TypeVar("T")

APP = "tests.apps.alarms:app"
LATE_APP = "tests.apps.alarms:late_app"
STATE_ARGS = (
    "--alarm-first-backoff-s", "0.1",
    "--alarm-max-backoff-s", "0.4",
    "--alarm-timeout-s", "10",
    "--alarm-max-retries", "6",
)  # fmt: skip


def alarm_stack(log_dir: Path, backend: Backend) -> Iterator[Stack]:
    """nats-server, the state service (short backoffs) on ``backend``'s database and one
    worker of APP; no gateway: alarms need none. Stopped and checked after."""
    state_args = (*backend.state_args(), *STATE_ARGS)
    yield from stack_context(log_dir, app=APP, gateway=False, state_args=state_args)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, module_backend: Backend) -> Iterator[Stack]:
    yield from alarm_stack(tmp_path_factory.mktemp("alarms"), module_backend)


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[StateClient]:
    assert stack.state is not None
    async with StateClient(str(stack.state.info["address"]), timeout_s=10) as client:
        yield client


def unique(prefix: str = "obj") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def firings(client: StateClient, namespace: str, name: str, count: int = 1) -> Any:
    """The object's recorded firings, once there are at least ``count``."""

    async def probe() -> Any:
        found = await client.storage(namespace, name).get("firings", [])
        return found if len(found) >= count else None

    return await eventually(probe, f"{count} firing(s) of {namespace}/{name}")


async def alarm_gone(alarm: ObjectAlarm) -> None:
    async def probe() -> bool:
        return await alarm.get_ms() is None

    await eventually(probe, f"{alarm} to be deleted")


# -- the API -------------------------------------------------------------------------------


async def test_set_get_delete_round_trip(client: StateClient) -> None:
    alarm = ObjectAlarm(client, "record", unique())
    assert await alarm.get() is None
    assert await alarm.delete() is False
    in_an_hour = now_ms() + 3_600_000
    await alarm.set(in_an_hour / 1000)
    assert await alarm.get_ms() == in_an_hour
    assert await alarm.get() == from_epoch_ms(in_an_hour)
    later = from_epoch_ms(in_an_hour + 60_000)
    await alarm.set(later)  # one alarm per object: replaced
    assert await alarm.get() == later
    assert await alarm.delete() is True
    assert await alarm.get() is None
    assert await alarm.delete() is False
    with pytest.raises(InvalidObjectId):
        await ObjectAlarm(client, "", "x").set(in_an_hour / 1000)


# -- firing --------------------------------------------------------------------------------


async def test_an_alarm_fires_at_its_time_on_a_worker(stack: Stack, client: StateClient) -> None:
    name = unique()
    alarm = ObjectAlarm(client, "record", name)
    at = now_ms() + 200
    await alarm.set(at / 1000)
    assert await alarm.get_ms() == at  # not fired yet: it is in the future
    (fired,) = await firings(client, "record", name)
    assert fired["scheduled_ms"] == at
    assert fired["fired_ms"] >= at, "fired before its time"
    assert fired["retry_count"] == 0
    assert fired["pid"] == stack.workers[0].pid
    await alarm_gone(alarm)  # done: deleted once the handler succeeded
    assert len(await client.storage("record", name).get("firings")) == 1


async def test_a_failing_handler_is_retried_with_backoff(client: StateClient) -> None:
    name = f"{unique()}-3"  # fails 3 tries, succeeds on the 4th
    alarm = ObjectAlarm(client, "flaky", name)
    at = now_ms()
    await alarm.set(at / 1000)
    (fired,) = await firings(client, "flaky", name)
    attempts = await client.storage("flaky", name).get("attempts")
    tries = [*attempts, fired]
    assert [t["retry_count"] for t in tries] == [0, 1, 2, 3]
    assert {t["firing_id"] for t in tries} == {fired["firing_id"]}  # one firing throughout
    assert {t["scheduled_ms"] for t in tries} == {at}
    # Backoff of 100 ms doubling to the 400 ms cap: each retry waits at least that long.
    gaps = [b["fired_ms"] - a["fired_ms"] for a, b in itertools.pairwise(tries)]
    assert all(gap >= wait for gap, wait in zip(gaps, [100, 200, 400], strict=True)), gaps
    await alarm_gone(alarm)


async def test_a_handler_that_sets_a_new_alarm_keeps_it(client: StateClient) -> None:
    name = unique()
    alarm = ObjectAlarm(client, "chain", name)
    await alarm.set(time.time() + 0.2)
    first, second = await firings(client, "chain", name, count=2)
    # During its own run the alarm reads as unset (as on Cloudflare).
    assert first["alarm_during"] is None
    # The alarm the first run set was not deleted by that run's success: it fired.
    next_ms = await client.storage("chain", name).get("next_ms")
    assert second["scheduled_ms"] == next_ms
    assert second["fired_ms"] >= next_ms
    assert second["firing_id"] != first["firing_id"]
    assert second["alarm_during"] is None
    await alarm_gone(alarm)
    assert len(await client.storage("chain", name).get("firings")) == 2


async def test_an_alarm_without_a_worker_is_retried_until_one_starts(
    stack: Stack, client: StateClient
) -> None:
    name = unique()
    alarm = ObjectAlarm(client, "late", name)
    await alarm.set(time.time())
    state_log = stack.log_dir / "state.log"

    async def retried_twice() -> bool:
        text = state_log.read_text(errors="replace")
        return text.count(f"'late'/'{name}' undelivered") >= 2

    await eventually(retried_twice, "the alarm to go undelivered twice")
    assert await alarm.get_ms() is not None  # kept, waiting for a worker
    stack.start_worker(LATE_APP)
    (fired,) = await firings(client, "late", name)
    assert fired["pid"] == stack.workers[-1].pid
    # Nobody ran it before: undelivered tries are not failed runs.
    assert fired["retry_count"] == 0
    await alarm_gone(alarm)


async def test_an_alarm_survives_kill_9_of_the_state_service(
    tmp_path_factory: pytest.TempPathFactory, backend: Backend
) -> None:
    log_dir = tmp_path_factory.mktemp("restart")
    with contextlib.contextmanager(alarm_stack)(log_dir, backend) as stack:
        assert stack.state is not None
        address = str(stack.state.info["address"])
        port = address.rsplit(":", 1)[1]
        name = unique()
        async with StateClient(address, timeout_s=15) as client:
            alarm = ObjectAlarm(client, "record", name)
            at = now_ms() + 300
            await alarm.set(at / 1000)  # durable once acknowledged
            os.kill(stack.state.pid, signal.SIGKILL)
            stack.state.process.wait()
            # Same database and port (the worker knows the service by its address).
            stack.start_state(None, *backend.state_args(), *STATE_ARGS, "--port", port)
            (fired,) = await firings(client, "record", name)
            assert fired["scheduled_ms"] == at
            assert fired["fired_ms"] >= at
            await alarm_gone(alarm)


# -- the scheduler in-process: concurrency -------------------------------------------------


async def test_many_due_alarms_fire_concurrently_within_the_bound(
    backend: Backend, nats_url: str
) -> None:
    """20 due alarms, at most 4 firing at once: a real NATS subscriber answers each only
    once 4 are waiting, so the scheduler must have sent 4 at once, and never a 5th."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    config = StateConfig(nats_url=nats_url, prefix=prefix, probe_port=0, **backend.state_settings())
    waiting: list[Any] = []
    not_in_flight: list[str] = []  # firings the scheduler did not count as in flight
    peak = 0
    answered = 0
    all_answered = asyncio.Event()

    async with backend.storage() as storage:
        nc = await connect_bus(config, "test-responder", role="state")
        scheduler = AlarmScheduler(storage, nc, config, max_concurrent=4)
        try:

            async def answer(msg: Any) -> None:
                nonlocal peak, answered
                waiting.append(msg)
                peak = max(peak, len(waiting))
                if len(waiting) == 4 or answered + len(waiting) == 20:
                    batch, waiting[:] = list(waiting), []
                    for held in batch:
                        event = envelope_pb.AlarmEvent.FromString(held.data)
                        obj = ObjectId(event.namespace, event.name)
                        if scheduler.firing_id_in_flight(obj) != event.firing_id:
                            not_in_flight.append(event.firing_id)
                        await held.respond(envelope_pb.AlarmResult(ok=True).SerializeToString())
                    answered += len(batch)
                    if answered == 20:
                        all_answered.set()

            await nc.subscribe(f"{prefix}.alarm.bulk", queue="alarms-bulk", cb=answer)
            await nc.flush()
            for i in range(20):
                await storage.run(PutAlarm(ObjectId("bulk", f"o{i}"), now_ms(), f"f{i}"))
            scheduler.start()  # all of them are already due: they fire at once
            async with asyncio.timeout(20):
                await all_answered.wait()

            async def all_deleted() -> bool:
                rows = [await storage.run(ReadAlarm(ObjectId("bulk", f"o{i}"))) for i in range(20)]
                return all(row is None for row in rows)

            await eventually(all_deleted, "every alarm to be deleted")
            assert peak == 4
            assert not_in_flight == []
            assert scheduler.in_flight == 0
        finally:
            await scheduler.close()
            await nc.close()
