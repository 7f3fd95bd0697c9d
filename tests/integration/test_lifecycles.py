"""Lifecycles of the three roles, in this process on the session's nats-server: close()
goes on past a step that fails (NATS is drained, the gRPC side closed, the failure logged
with the step's name); a background loop that crashes turns /readyz to 503 naming it,
counted and logged; handler tasks cancelled at the drain deadline are awaited; and an
upgrade still in ``prepare()`` when the gateway's close() starts ends with 1001 and one
close event for the app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from grpc_health.v1.health import aio as health_aio

from tests.harness import eventually, in_process_state_config
from wsgate.config import GatewayConfig, WorkerConfig
from wsgate.errors import StateTimeout, StateUnavailable
from wsgate.gateway.presence import PresenceAnnouncer
from wsgate.gateway.server import Gateway
from wsgate.service import ServicePhase
from wsgate.stateservice.idempotency import IdempotencyPruner
from wsgate.stateservice.server import StateServer
from wsgate.worker import runtime
from wsgate.worker.alarm_runner import AlarmRunner
from wsgate.worker.loader import load_app
from wsgate.worker.runtime import Worker
from wsgate.worker.state_client import ClientPhase, StateClient

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_scope="module")]

APP = "tests.apps.probe:app"
#: Bounds on waits that only matter when something is broken.
WAIT_S = 10.0


@dataclass
class Roles:
    nats_url: str
    state: StateServer


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def roles(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Roles]:
    """A state service in this process; workers and gateways are the tests' own."""
    config = in_process_state_config(tmp_path_factory.mktemp("lifecycles"), nats_url)
    async with StateServer(config) as state:
        yield Roles(nats_url, state)


def _gateway_config(roles: Roles, **settings: Any) -> GatewayConfig:
    return GatewayConfig(host="127.0.0.1", port=0, nats_url=roles.nats_url, **settings)


def _worker_config(roles: Roles, **settings: Any) -> WorkerConfig:
    return WorkerConfig(
        nats_url=roles.nats_url, state_address=roles.state.address, port=0, app=APP, **settings
    )


async def _refused(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port`` any more."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def _readyz(port: int) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/readyz") as resp,
    ):
        return resp.status, await resp.text()


async def _until_not_ready(port: int) -> str:
    async def probe() -> str:
        status, text = await _readyz(port)
        return text if status == 503 else ""

    return await eventually(probe, "/readyz to turn 503", timeout_s=WAIT_S)


def _failing(what: str) -> Any:
    async def close(self: object, *args: object) -> None:
        raise RuntimeError(f"{what} broke")

    return close


# -- close() goes on past a failing step -------------------------------------------------


async def test_gateway_close_drains_nats_after_a_step_that_fails(
    roles: Roles, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(PresenceAnnouncer, "close", _failing("presence"))
    gateway = Gateway(_gateway_config(roles))
    await gateway.start()
    port, nc = gateway.port, gateway._nc
    assert nc is not None
    with caplog.at_level(logging.ERROR, logger="wsgate.gateway.server"):
        await gateway.close()
    assert nc.is_closed  # the NATS step, after the failed one, ran
    assert await _refused(port)  # the listener and the HTTP server stopped
    assert gateway.phase is ServicePhase.CLOSED
    (record,) = [r for r in caplog.records if "undoing" in r.getMessage()]
    assert record.getMessage() == "gateway: undoing presence failed"
    assert record.exc_info is not None
    assert "presence broke" in str(record.exc_info[1])
    await gateway.close()  # idempotent


async def test_worker_close_drains_nats_and_closes_grpc_after_a_step_that_fails(
    roles: Roles, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(AlarmRunner, "close", _failing("alarm runner"))
    worker = Worker(_worker_config(roles), load_app(APP))
    await worker.start()
    nc, probe_port = worker._nc, worker.probe_port
    assert nc is not None
    with caplog.at_level(logging.ERROR, logger="wsgate.worker.runtime"):
        await worker.close()
    assert nc.is_closed
    assert worker._state.phase is ClientPhase.CLOSED  # the gRPC channels closed
    assert await _refused(probe_port)
    messages = [r.getMessage() for r in caplog.records if "undoing" in r.getMessage()]
    assert messages == ["worker: undoing alarm runner failed"]


async def test_state_close_stops_grpc_and_drains_nats_after_a_step_that_fails(
    roles: Roles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(health_aio.HealthServicer, "enter_graceful_shutdown", _failing("health"))
    server = StateServer(in_process_state_config(tmp_path, roles.nats_url))
    await server.start()
    nc, address = server._nc, server.address
    assert nc is not None
    with caplog.at_level(logging.ERROR, logger="wsgate.stateservice.server"):
        await server.close(grace_s=1)
    assert nc.is_closed
    messages = [r.getMessage() for r in caplog.records if "undoing" in r.getMessage()]
    assert messages == ["state service: undoing health failed"]
    # The gRPC server stopped: a call finds no one.
    async with StateClient(address, timeout_s=0.3) as client:
        with pytest.raises((StateUnavailable, StateTimeout)):
            await client.storage("lifecycles", "x").get("k")


# -- a crashed background loop fails readiness -------------------------------------------


async def test_a_crashed_gateway_loop_turns_readyz_to_503_naming_it(
    roles: Roles, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(PresenceAnnouncer, "_run", _failing("presence loop"))
    with caplog.at_level(logging.ERROR, logger="wsgate.gateway.server"):
        async with Gateway(_gateway_config(roles)) as gateway:
            assert await _until_not_ready(gateway.port) == (
                "not ready: background task crashed: presence"
            )
            crashes = gateway.metrics.registry.get_sample_value(
                "wsgate_gateway_background_crashes_total", {"task": "presence"}
            )
            assert crashes == 1
            assert (
                gateway.metrics.registry.get_sample_value(
                    "wsgate_gateway_background_crashes_total", {"task": "delivery_sweep"}
                )
                == 0
            )
    (record,) = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert record.getMessage() == (
        "gateway: background task presence crashed; /readyz is 503 from now on"
    )
    assert record.exc_info is not None
    assert "presence loop broke" in str(record.exc_info[1])


async def test_a_crashed_worker_loop_turns_readyz_to_503_naming_it(
    roles: Roles, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(Worker, "_sweep", _failing("sweep"))
    with caplog.at_level(logging.ERROR, logger="wsgate.worker.runtime"):
        async with Worker(_worker_config(roles), load_app(APP)) as worker:
            assert await _until_not_ready(worker.probe_port) == (
                "not ready: background task crashed: progress_sweep"
            )
            assert (
                worker.metrics.registry.get_sample_value(
                    "wsgate_worker_background_crashes_total", {"task": "progress_sweep"}
                )
                == 1
            )
    assert any(
        r.getMessage().startswith("worker: background task progress_sweep crashed")
        and r.exc_info is not None
        for r in caplog.records
    )


async def test_a_crashed_state_loop_turns_readyz_to_503_naming_it(
    roles: Roles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(IdempotencyPruner, "_prune_forever", _failing("pruner"))
    config = in_process_state_config(tmp_path, roles.nats_url)
    with caplog.at_level(logging.ERROR, logger="wsgate.stateservice.server"):
        async with StateServer(config) as server:
            assert await _until_not_ready(server.probe_port) == (
                "not ready: background task crashed: idempotency_pruner"
            )
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{server.probe_port}/metrics") as resp,
            ):
                text = await resp.text()
            assert 'wsgate_state_background_crashes_total{task="idempotency_pruner"} 1.0' in text
            assert 'wsgate_state_background_crashes_total{task="alarm_scheduler"} 0.0' in text
    assert any("idempotency_pruner crashed" in r.getMessage() for r in caplog.records)


# -- overdue handler tasks ----------------------------------------------------------------


async def test_handler_tasks_cancelled_at_the_deadline_are_awaited_and_the_stubborn_logged(
    roles: Roles, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two handlers outlive the drain timeout: the polite one's cleanup (which awaits)
    has run when close() returns; the one that ignores its cancellation is waited for
    CANCELLED_HANDLER_WAIT_S, then logged, and close() goes on (NATS drained)."""
    monkeypatch.setattr(runtime, "CANCELLED_HANDLER_WAIT_S", 0.2)
    worker = Worker(_worker_config(roles, drain_timeout_s=0.1), load_app(APP))
    await worker.start()
    running = asyncio.Event()
    cleaned = asyncio.Event()
    release = asyncio.Event()

    async def polite(msg: Any) -> None:
        try:
            running.set()
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # a cleanup that itself awaits
            cleaned.set()

    async def stubborn(msg: Any) -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()

    # Through the worker's own bookkeeping: slots, in-flight gauge, its set of tasks.
    await worker._spawner(polite)(None)  # type: ignore[arg-type]
    await worker._spawner(stubborn)(None)  # type: ignore[arg-type]
    await running.wait()
    nc = worker._nc
    assert nc is not None
    with caplog.at_level(logging.WARNING, logger="wsgate.worker.runtime"):
        await asyncio.wait_for(worker.close(), WAIT_S)
    assert cleaned.is_set()
    assert nc.is_closed
    assert "1 handler task(s) still running 0.2 s after their cancellation" in caplog.text
    assert "2 handler(s) still running at the drain deadline" in caplog.text
    release.set()
    await eventually(_no_tasks(worker), "the stubborn handler to end", timeout_s=WAIT_S)


def _no_tasks(worker: Worker) -> Any:
    async def probe() -> bool:
        return not worker._tasks

    return probe


# -- the upgrade-during-close race -------------------------------------------------------


async def test_an_upgrade_in_prepare_when_close_starts_gets_1001_and_one_close_event(
    roles: Roles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app accepted; the gateway is in ``prepare()`` (held there) when close()
    starts: the client gets its 101, what the app sent, then 1001 (at once, not at the
    drain deadline), and the app's close handler runs exactly once."""
    in_prepare = asyncio.Event()
    release = asyncio.Event()
    prepare = web.WebSocketResponse.prepare

    async def held_prepare(self: web.WebSocketResponse, request: web.BaseRequest) -> Any:
        in_prepare.set()
        await release.wait()
        return await prepare(self, request)

    monkeypatch.setattr(web.WebSocketResponse, "prepare", held_prepare)
    draining = _observe_drain(monkeypatch)
    async with Worker(_worker_config(roles), load_app(APP)):
        # A drain deadline far away: the 1001 must not come from the cut at the deadline.
        gateway = Gateway(_gateway_config(roles, drain_timeout_s=60))
        await gateway.start()
        url = gateway.url.replace("http://", "ws://", 1) + "/control"
        async with aiohttp.ClientSession() as session:
            connecting = asyncio.create_task(session.ws_connect(url))
            await asyncio.wait_for(in_prepare.wait(), WAIT_S)
            closing = asyncio.create_task(gateway.close())
            await asyncio.wait_for(draining.wait(), WAIT_S)  # close() has begun
            release.set()
            ws = await asyncio.wait_for(connecting, WAIT_S)
            hello = await ws.receive(timeout=WAIT_S)
            assert hello.type is aiohttp.WSMsgType.TEXT
            assert hello.data.startswith("id ")
            connection_id = hello.data[3:]
            closed = await ws.receive(timeout=WAIT_S)
            assert (closed.type, closed.data, closed.extra) == (
                aiohttp.WSMsgType.CLOSE,
                1001,
                "going away",
            )
            await ws.close()
            await asyncio.wait_for(closing, WAIT_S)
        async with StateClient(roles.state.address) as state:
            record = state.storage("closes", connection_id)
            assert await record.get("calls") == 1
            assert await record.get("close") == {
                "code": 1001,
                "reason": "going away",
                "redelivered": False,
            }


async def test_an_upgrade_whose_accept_arrives_after_close_starts_gets_503_and_one_close_event(
    roles: Roles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app's Accept is held on its way back until close() has begun: no 101, a 503,
    and the app, which accepted, hears the connection close once (1001)."""
    decided = asyncio.Event()
    release = asyncio.Event()
    asked: list[str] = []
    ask_app = Gateway._ask_app

    async def held_ask_app(self: Gateway, request: Any, connection_id: str, offered: Any) -> Any:
        decision = await ask_app(self, request, connection_id, offered)
        asked.append(connection_id)
        decided.set()
        await release.wait()
        return decision

    monkeypatch.setattr(Gateway, "_ask_app", held_ask_app)
    draining = _observe_drain(monkeypatch)
    async with Worker(_worker_config(roles), load_app(APP)):
        gateway = Gateway(_gateway_config(roles, drain_timeout_s=60))
        await gateway.start()
        url = gateway.url.replace("http://", "ws://", 1) + "/control"
        async with aiohttp.ClientSession() as session:
            connecting = asyncio.create_task(session.ws_connect(url))
            await asyncio.wait_for(decided.wait(), WAIT_S)
            closing = asyncio.create_task(gateway.close())
            await asyncio.wait_for(draining.wait(), WAIT_S)
            release.set()
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await asyncio.wait_for(connecting, WAIT_S)
            assert refused.value.status == 503
            await asyncio.wait_for(closing, WAIT_S)
        async with StateClient(roles.state.address) as state:
            record = state.storage("closes", asked[0])
            assert await record.get("calls") == 1
            assert (await record.get("close"))["code"] == 1001


def _observe_drain(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """An event set when a gateway's close() begins to close its connections."""
    draining = asyncio.Event()
    close_connections = Gateway._close_connections

    async def observed_close_connections(self: Gateway) -> None:
        draining.set()
        await close_connections(self)

    monkeypatch.setattr(Gateway, "_close_connections", observed_close_connections)
    return draining
