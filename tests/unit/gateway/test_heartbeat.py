"""The gateway-wide heartbeat (gateway/heartbeat.py) on real sockets: an aiohttp server in
this process whose WebSockets are watched by one sweep, with a short period."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from wsgate.gateway.heartbeat import HeartbeatSweep

pytestmark = pytest.mark.timeout(30)

#: Pings after 0.4-0.6 s without data; no answer within 0.2 s drops.
INTERVAL_S = 0.4


@dataclass
class Server:
    url: str
    sweep: HeartbeatSweep
    #: What each handler's read loop ended with, and the socket's close code.
    endings: asyncio.Queue[tuple[aiohttp.WSMessage, int | None]] = field(
        default_factory=asyncio.Queue
    )


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    sweep = HeartbeatSweep(INTERVAL_S)
    endings: asyncio.Queue[tuple[aiohttp.WSMessage, int | None]] = asyncio.Queue()

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=None, autoclose=False)
        try:
            await ws.prepare(request)
            sweep.watch(request, ws)
            while True:  # an echo, as the gateway's read loop would forward
                msg = await ws.receive()
                if msg.type is WSMsgType.TEXT:
                    await ws.send_str(msg.data)
                    continue
                if msg.type is WSMsgType.CLOSE:
                    await ws.close()
                endings.put_nowait((msg, ws.close_code))
                return ws
        finally:
            sweep.forget(request)
            assert request.protocol._data_received_cb is None  # no cycle left behind

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Server(f"ws://127.0.0.1:{port}/", sweep, endings)
    finally:
        sweep.close()
        await runner.cleanup()


async def test_a_client_that_never_pongs_is_dropped_as_aiohttp_drops_it(server: Server) -> None:
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.url, autoping=False)
        first = await ws.receive(timeout=10)
        assert first.type is WSMsgType.PING  # after about a period of silence
        # No pong: the connection is cut (no close frame: 1006 is never sent).
        assert (await ws.receive(timeout=10)).type in (WSMsgType.CLOSED, WSMsgType.CLOSE)
    msg, code = await asyncio.wait_for(server.endings.get(), 10)
    assert msg.type is WSMsgType.ERROR
    assert isinstance(msg.data, TimeoutError)  # what the gateway reports as "no pong"
    assert code == 1006
    assert len(server.sweep) == 0


async def test_a_client_that_answers_pings_stays_open(server: Server) -> None:
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.url, autoping=False)
        for _ in range(3):  # three heartbeats, each a period or more of silence
            ping = await ws.receive(timeout=10)
            assert ping.type is WSMsgType.PING
            await ws.pong(ping.data)
        await ws.send_str("still here")
        assert (await ws.receive(timeout=10)).data == "still here"
        assert len(server.sweep) == 1
        await ws.close()
    msg, code = await asyncio.wait_for(server.endings.get(), 10)
    assert (msg.type, code) == (WSMsgType.CLOSE, 1000)
    assert len(server.sweep) == 0


async def test_data_counts_as_a_sign_of_life_and_no_ping_is_sent_meanwhile(
    server: Server,
) -> None:
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.url, autoping=False)
        loop = asyncio.get_running_loop()
        until = loop.time() + 3 * INTERVAL_S
        while loop.time() < until:  # messages every eighth of a period: never quiet long
            await ws.send_str("x")
            assert (await ws.receive(timeout=10)).type is WSMsgType.TEXT
            await asyncio.sleep(INTERVAL_S / 8)
        await ws.close()
    msg, _ = await asyncio.wait_for(server.endings.get(), 10)
    assert msg.type is WSMsgType.CLOSE


def test_off_watches_nothing() -> None:
    sweep = HeartbeatSweep(0)
    sweep.watch(object(), object())  # type: ignore[arg-type]
    assert len(sweep) == 0
