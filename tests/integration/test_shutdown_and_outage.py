"""Drain on SIGTERM, and NATS going away under open sockets."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.harness import Stack, eventually, stack_context
from wsgate.procs import start_nats_server

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    yield from stack_context(tmp_path, app="tests.apps.probe:app")


async def _status(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as resp:
        return resp.status


async def test_sigterm_drains_the_gateway(stack: Stack) -> None:
    gateway = stack.start_gateway("--drain-timeout-s", "10")
    index = len(stack.gateways) - 1
    base = gateway.info["url"]
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(stack.ws_url("/control", index))
        assert (await ws.receive(timeout=10)).data.startswith("id ")
        await ws.send_str("sleep 1.5")  # in flight when SIGTERM arrives
        gateway.process.send_signal(signal.SIGTERM)

        async def not_ready() -> bool:
            return await _status(session, base + "/readyz") == 503

        await eventually(not_ready, "/readyz to turn 503", timeout_s=10)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(stack.ws_url("/control", index))
        assert refused.value.status == 503
        # The event in flight finishes and its reply is delivered; then 1001.
        assert (await ws.receive(timeout=10)).data == "slept 1.5 redelivered=False"
        msg = await ws.receive(timeout=15)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1001)
        await ws.close()
    assert gateway.process.wait(timeout=20) == 0
    stack.forget(gateway)


async def test_sockets_stay_open_while_nats_restarts(stack: Stack, tmp_path: Path) -> None:
    assert stack.nats is not None
    port = int(stack.nats_url.rsplit(":", 1)[1])
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(stack.ws_url("/control"))
        assert (await ws.receive(timeout=10)).data.startswith("id ")
        await ws.send_str("before")
        assert (await ws.receive(timeout=10)).data == "before"

        old = stack.nats
        old.stop()
        stack.forget(old)
        await ws.send_str("during the outage")
        stack.nats = start_nats_server(tmp_path / "nats-again", port=port)
        # Gateway and worker reconnect; the message waiting at the gateway goes through.
        assert (await ws.receive(timeout=30)).data == "during the outage"
        await ws.send_str("after")
        assert (await ws.receive(timeout=10)).data == "after"
        assert not ws.closed
        await ws.close()


async def test_a_long_outage_closes_with_1013(tmp_path: Path) -> None:
    for stack in stack_context(
        tmp_path, app="tests.apps.probe:app", gateway_args=("--delivery-timeout-s", "2")
    ):
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(stack.ws_url("/control"))
            assert (await ws.receive(timeout=10)).data.startswith("id ")
            assert stack.nats is not None
            nats = stack.nats
            nats.stop()
            stack.forget(nats)
            await ws.send_str("into the void")
            msg = await ws.receive(timeout=20)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1013)
            await ws.close()
