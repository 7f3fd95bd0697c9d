"""asyncio inside handlers, on real processes: ``asyncio.timeout``, ``asyncio.wait_for``,
``TaskGroup`` and cancellation behave as in a plain asyncio program in every handler kind
(connect, message, close, alarm) of a function route and of a durable object, and the
worker goes on taking events afterwards (tests/apps/tasks.py is the app).

Each handler runs in a Task of its own: a timeout inside it cancels the handler alone, not
nats-py's subscription task, which once made a worker silently stop taking events. Then
the intake watchdog: a worker whose intake stops (every handler slot held by a handler
that hangs, or a subscription's task dead) turns /readyz to 503 and logs why; and a
gateway whose close event no worker acknowledges still stops within its drain timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from tests.apps.tasks import ALARM_NAMESPACE, ALL_OK, OBJECT_NAMESPACE, RESULTS_NAMESPACE, probe
from tests.harness import Stack, eventually, stack_context
from wsgate.client import Client, ClientClosed, connect
from wsgate.gateway.server import CLOSE_TIMEOUT_S
from wsgate.worker.alarms_client import ObjectAlarm
from wsgate.worker.state_client import StateClient

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")

APP = "tests.apps.tasks:app"
#: Route prefix -> the namespace its close and alarm handlers store their results in.
ROUTES = {"/fn": RESULTS_NAMESPACE, "/obj": OBJECT_NAMESPACE}
#: Receive and polling bounds: generous, as they only matter when something is broken.
RECEIVE_S = 10.0
POLL_S = 10.0
#: The drain timeout of the workers and gateways of the intake tests' own stacks.
DRAIN_S = 1


@pytest.fixture(scope="module")
def expected() -> str:
    """What the probe says in a plain asyncio program: run as the main Task of
    ``asyncio.run``."""
    said = asyncio.run(probe())
    assert said.startswith(ALL_OK + " "), f"the probe fails in plain asyncio: {said}"
    return said


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_context(tmp_path_factory.mktemp("tasks"), app=APP)


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[StateClient]:
    async with StateClient(str(stack.state_info("address")), timeout_s=10) as client:
        yield client


@contextlib.contextmanager
def stack_with_worker(log_dir: Path, *worker_args: str) -> Iterator[Stack]:
    """A stack of its own whose one worker runs APP with ``worker_args``: for the tests
    that break their worker's intake."""
    # Short drains: when the stack stops, the worker cuts off handlers that hang, and the
    # gateway soon cuts connections whose close events are not acknowledged.
    short_drain = ("--drain-timeout-s", str(DRAIN_S))
    with contextlib.contextmanager(stack_context)(
        log_dir, app=APP, worker=False, gateway_args=short_drain
    ) as stack:
        stack.start_worker(APP, *short_drain, *worker_args)
        yield stack


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def stored(client: StateClient, route: str, name: str, key: str) -> Any:
    """What the close or alarm handler of ``route``'s object ``name`` stored under
    ``key``, once it has."""

    async def probe() -> Any:
        return await client.storage(ROUTES[route], name).get(key)

    return await eventually(probe, f"{key!r} of {route}/{name} to be stored", timeout_s=POLL_S)


def readyz_url(stack: Stack, worker: int = 0) -> str:
    return f"http://127.0.0.1:{stack.workers[worker].info['probe_port']}/readyz"


async def readyz(stack: Stack) -> int:
    async with aiohttp.ClientSession() as session, session.get(readyz_url(stack)) as resp:
        return resp.status


async def readyz_becomes(stack: Stack, status: int) -> None:
    async def probe() -> bool:
        return await readyz(stack) == status

    await eventually(probe, f"the worker's /readyz to answer {status}", timeout_s=POLL_S)


def worker_log(stack: Stack) -> str:
    return (stack.log_dir / "worker0.log").read_text(errors="replace")


async def log_matches(stack: Stack, pattern: str) -> re.Match[str]:
    async def probe() -> re.Match[str] | None:
        return re.search(pattern, worker_log(stack))

    return await eventually(probe, f"the worker's log to say {pattern!r}", timeout_s=POLL_S)


async def assert_still_serving(stack: Stack, expected: str, route: str = "/fn") -> None:
    """A new connection is served (its connect and an echo) and the worker is ready."""
    async with connect(stack.ws_url(f"{route}/{unique('echo')}")) as ws:
        assert await ws.receive(timeout=RECEIVE_S) == f"connect {expected}"
        await ws.send("still there?")
        assert await ws.receive(timeout=RECEIVE_S) == "still there?"
    assert await readyz(stack) == 200


# -- asyncio in every handler kind ---------------------------------------------------------


@pytest.mark.parametrize("route", list(ROUTES))
async def test_on_connect(stack: Stack, expected: str, route: str) -> None:
    async with connect(stack.ws_url(f"{route}/{unique('connect')}")) as ws:
        assert await ws.receive(timeout=RECEIVE_S) == f"connect {expected}"
    await assert_still_serving(stack, expected, route)


@pytest.mark.parametrize("route", list(ROUTES))
async def test_on_message(stack: Stack, expected: str, route: str) -> None:
    async with connect(stack.ws_url(f"{route}/{unique('message')}")) as ws:
        await ws.receive(timeout=RECEIVE_S)  # the connect probe's
        for _ in range(2):  # and the same connection goes on being served
            await ws.send("probe")
            assert await ws.receive(timeout=RECEIVE_S) == f"message {expected}"
    await assert_still_serving(stack, expected, route)


@pytest.mark.parametrize("route", list(ROUTES))
async def test_on_close(stack: Stack, client: StateClient, expected: str, route: str) -> None:
    name = unique("close")
    async with connect(stack.ws_url(f"{route}/{name}")) as ws:
        await ws.receive(timeout=RECEIVE_S)
    assert await stored(client, route, name, "close") == expected
    await assert_still_serving(stack, expected, route)


@pytest.mark.parametrize("route", list(ROUTES))
async def test_on_alarm(stack: Stack, client: StateClient, expected: str, route: str) -> None:
    name = unique("alarm")
    async with connect(stack.ws_url(f"{route}/{name}")) as ws:
        await ws.receive(timeout=RECEIVE_S)
        await ws.send("alarm")
        assert await ws.receive(timeout=RECEIVE_S) == "alarm set"
        assert await stored(client, route, name, "alarm") == expected
    await assert_still_serving(stack, expected, route)


@pytest.mark.parametrize("route", list(ROUTES))
async def test_a_handler_that_cancels_itself_fails_as_if_it_raised(
    stack: Stack, client: StateClient, expected: str, route: str
) -> None:
    name = unique("self-cancel")
    async with connect(stack.ws_url(f"{route}/{name}")) as ws:
        await ws.receive(timeout=RECEIVE_S)
        await ws.send("cancel-self")
        with pytest.raises(ClientClosed) as closed:
            await ws.receive(timeout=RECEIVE_S)
        assert closed.value.code == 1011
    # Its connection's close handler runs as usual, the object lives on, and so does the
    # worker.
    assert await stored(client, route, name, "close") == expected
    async with connect(stack.ws_url(f"{route}/{name}")) as again:
        assert await again.receive(timeout=RECEIVE_S) == f"connect {expected}"
        await again.send("probe")
        assert await again.receive(timeout=RECEIVE_S) == f"message {expected}"
    await assert_still_serving(stack, expected, route)


# -- the intake watchdog -------------------------------------------------------------------


async def test_a_worker_whose_slots_are_all_held_says_it_takes_no_requests(
    tmp_path: Path, expected: str
) -> None:
    with stack_with_worker(tmp_path, "--max-concurrent-events", "2", "--intake-stall-s", "1") as (
        stack
    ):
        paths = [stack.ws_url(f"/fn/{unique('hang')}") for _ in range(3)]
        async with (
            connect(paths[0]) as a,
            connect(paths[1]) as b,
            connect(paths[2]) as c,
            StateClient(str(stack.state_info("address")), timeout_s=10) as client,
        ):
            clients = (a, b, c)
            for ws in clients:
                assert await ws.receive(timeout=RECEIVE_S) == f"connect {expected}"
            assert await readyz(stack) == 200
            for ws in clients:
                await ws.send("hang")  # two hold both slots; the third waits for one
            await readyz_becomes(stack, 503)
            await log_matches(
                stack, r"takes no requests: 1 request\(s\) waiting and none taken for \S+ s"
            )

            # Once the handlers finish (an alarm, which has slots of its own, releases
            # them), the worker takes requests again.
            await ObjectAlarm(client, ALARM_NAMESPACE, "release").set(time.time())
            for ws in clients:
                assert await ws.receive(timeout=RECEIVE_S) == "released"
            await readyz_becomes(stack, 200)
            await log_matches(stack, r"takes requests again")


async def stop_the_intake(stack: Stack, ws: Client, expected: str) -> None:
    """Have the handler cancel the worker's subscription tasks, as if they had died."""
    assert await ws.receive(timeout=RECEIVE_S) == f"connect {expected}"
    assert await readyz(stack) == 200
    await ws.send("stop-intake")
    stopped = await ws.receive(timeout=RECEIVE_S)
    assert isinstance(stopped, str)
    assert re.fullmatch(r"stopped [1-9]\d*", stopped), stopped


async def test_a_worker_whose_subscription_died_says_it_takes_no_requests(
    tmp_path: Path, expected: str
) -> None:
    with stack_with_worker(tmp_path) as stack:
        async with connect(stack.ws_url(f"/fn/{unique('stop')}")) as ws:
            await stop_the_intake(stack, ws, expected)
            await readyz_becomes(stack, 503)
            await log_matches(
                stack,
                r"takes no requests: the subscription to \S+ stopped delivering requests",
            )


class GatewayDidNotStop(AssertionError):
    """The gateway outlived its drain timeout after SIGTERM."""


async def test_a_gateway_stops_in_time_though_no_worker_acks_a_close_event(
    tmp_path: Path, expected: str
) -> None:
    with stack_with_worker(tmp_path) as stack:
        async with connect(stack.ws_url(f"/fn/{unique('stop')}")) as ws:
            await stop_the_intake(stack, ws, expected)
        # Its close event now waits for an ack that never comes. Stopping, the gateway
        # waits for it until its drain timeout, then cuts the connection and waits at most
        # CLOSE_TIMEOUT_S more; then it closes NATS and exits.
        gateway = stack.gateways[0]
        bound_s = DRAIN_S + CLOSE_TIMEOUT_S + 3
        status = await asyncio.to_thread(gateway.stop, bound_s)  # SIGKILL after bound_s
        stack.forget(gateway)
        if status not in (0, -signal.SIGTERM):
            raise GatewayDidNotStop(f"not stopped {bound_s} s after SIGTERM (status {status})")
