"""Durable objects through the whole path, every part its own process: serializable
transactions from several workers, exactly-once effects of redelivered events, durability
across kill -9 of the state service, and the output gate."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.harness import Stack, eventually, metric, stack_context
from wsgate.worker.state_client import StateClient

pytestmark = pytest.mark.timeout(120)

APP = "tests.apps.durable:app"


@pytest.fixture
def three_workers(tmp_path: Path) -> Iterator[Stack]:
    yield from stack_context(tmp_path, app=APP, workers=3)


async def test_concurrent_increments_from_several_workers_are_serializable(
    three_workers: Stack,
) -> None:
    stack = three_workers
    clients, per_client = 24, 25
    async with aiohttp.ClientSession() as session:
        sockets = [await session.ws_connect(stack.ws_url("/count/hot")) for _ in range(clients)]

        async def run(ws: aiohttp.ClientWebSocketResponse) -> list[tuple[int, int]]:
            for _ in range(per_client):
                await ws.send_str("inc")
            replies = [(await ws.receive(timeout=60)).data for _ in range(per_client)]
            return [(int(pid), int(value)) for pid, _, value in (r.split("|") for r in replies)]

        results = [pair for batch in await asyncio.gather(*map(run, sockets)) for pair in batch]
        for ws in sockets:
            await ws.close()
    total = clients * per_client
    # Every increment saw a distinct value, and none was lost: as if one at a time.
    assert sorted(value for _, value in results) == list(range(1, total + 1))
    assert len({pid for pid, _ in results}) >= 2, "only one worker took part"
    async with StateClient(str(stack.state_info("address"))) as state:
        assert await state.storage("counter", "hot").get("n") == total


@pytest.fixture
def one_worker(tmp_path: Path) -> Iterator[Stack]:
    yield from stack_context(tmp_path, app=APP, workers=1, gateway_args=("--ack-timeout-s", "1"))


async def test_a_redelivered_event_increments_the_counter_once(one_worker: Stack) -> None:
    stack = one_worker
    async with (
        StateClient(str(stack.state_info("address"))) as state,
        aiohttp.ClientSession() as session,
        session.ws_connect(stack.ws_url("/count/replayed")) as ws,
    ):
        counter = state.storage("counter", "replayed")
        await ws.send_str("inc-then-hang")
        # The first delivery commits its increment, then hangs before its ack ...
        assert await eventually(lambda: counter.get("n"), "the first delivery's increment") == 1
        first = stack.workers[0]
        stack.kill(first)  # ... and its worker dies: the gateway resends the event
        second = stack.start_worker(APP)
        pid, flag, value = (await ws.receive(timeout=30)).data.split("|")
        # The redelivery ran the handler again; its transaction carried the same
        # idempotency key, so it was not applied again and answered the first result.
        assert (int(pid), flag, value) == (second.pid, "r", "1")
        assert await counter.get("n") == 1
        await ws.send_str("inc")
        assert (await ws.receive(timeout=30)).data.split("|")[2] == "2"


@pytest.fixture
def state_only(tmp_path: Path) -> Iterator[Stack]:
    yield from stack_context(tmp_path, worker=False)


async def test_acknowledged_writes_survive_kill_9_of_the_state_service(state_only: Stack) -> None:
    stack = state_only
    address = str(stack.state_info("address"))
    acknowledged: set[int] = set()
    enough = asyncio.Event()
    async with StateClient(address, timeout_s=10) as state:
        objects = [state.storage("durable", str(i)) for i in range(8)]

        async def writer(start: int) -> None:
            for i in range(start, 100_000, 16):
                await objects[i % 8].put(f"k{i}", i)
                acknowledged.add(i)
                if len(acknowledged) >= 2000:
                    enough.set()

        writers = [asyncio.create_task(writer(n)) for n in range(16)]
        await enough.wait()
        # Writes are in flight at this moment; only the acknowledged ones count.
        stack.kill(stack.state_child())
        results = await asyncio.gather(*writers, return_exceptions=True)
        assert all(isinstance(r, Exception) for r in results)
    stack.restart_state(address)
    async with StateClient(address) as state:
        stored: dict[str, object] = {}
        for i in range(8):
            stored.update(await state.storage("durable", str(i)).list())
    missing = [i for i in acknowledged if stored.get(f"k{i}") != i]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"


async def test_the_output_gate_holds_frames_until_the_write_is_durable(one_worker: Stack) -> None:
    stack = one_worker
    address = str(stack.state_info("address"))
    state_child = stack.state_child()
    first = stack.workers[0]
    gate_waits_url = stack.worker_metrics_url(0)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(stack.ws_url("/gated/g")) as ws,
    ):
        os.kill(state_child.pid, signal.SIGSTOP)  # the write cannot complete
        try:
            await ws.send_str("v1")
            # The handler has returned; its frame waits at the gate for the write.
            waits = await eventually(
                lambda: metric(gate_waits_url, "wsgate_worker_output_gate_waits_total"),
                "the frame to wait at the output gate",
            )
            assert waits == 1.0
            # Both crash: the write dies in the stopped service, the frame in the worker.
            stack.kill(first)
            stack.kill(state_child)
        finally:
            if state_child.process.poll() is None:
                os.kill(state_child.pid, signal.SIGCONT)
        stack.restart_state(address)
        second = stack.start_worker(APP)
        async with StateClient(address) as state:
            gated = state.storage("gated", "g")
            # The redelivery stores the value, then (only then) its frame leaves.
            message = (await ws.receive(timeout=30)).data
            assert message == f"{second.pid}|saw v1", message
            assert await gated.get("last") == "v1"
            await ws.send_str("v2")
            message = (await ws.receive(timeout=30)).data
            assert message == f"{second.pid}|saw v2"
            assert await gated.get("last") == "v2"
