"""The gateway's handshake check (gateway/handshake.py) answers as aiohttp's own
``WebSocketResponse.can_prepare`` does, on requests parsed by aiohttp's real HTTP parser."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from wsgate.gateway.handshake import is_websocket_handshake

pytestmark = pytest.mark.timeout(30)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample: 16 bytes
VALID = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
         "Sec-WebSocket-Key": KEY}  # fmt: skip


def _with(**changes: str | None) -> list[tuple[str, str]]:
    headers = dict(VALID)
    for name, value in changes.items():
        name = name.replace("_", "-")
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return list(headers.items())


CASES: list[tuple[str, list[tuple[str, str]], bool]] = [
    ("valid", _with(), True),
    ("upgrade in a token list", _with(Connection="keep-alive, Upgrade"), True),
    ("in two headers", [*_with(Connection="keep-alive"), ("Connection", "upgrade")], True),
    ("mixed case, blanks", _with(Upgrade=" WebSocket ", Connection="UPGRADE"), True),
    ("draft 8", _with(**{"Sec-WebSocket-Version": "8"}), True),
    ("no Upgrade", _with(Upgrade=None), False),
    ("another protocol", _with(Upgrade="h2c"), False),
    ("no upgrade token", _with(Connection="keep-alive"), False),
    ("no Connection", _with(Connection=None), False),
    ("version 12", _with(**{"Sec-WebSocket-Version": "12"}), False),
    ("no version", _with(**{"Sec-WebSocket-Version": None}), False),
    ("no key", _with(**{"Sec-WebSocket-Key": None}), False),
    ("key not base64", _with(**{"Sec-WebSocket-Key": "!!!!"}), False),
    ("key of 15 bytes", _with(**{"Sec-WebSocket-Key": "AAAAAAAAAAAAAAAAAAAA"}), False),
]  # fmt: skip


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async def answer(request: web.Request) -> web.Response:
        ours = is_websocket_handshake(request.headers)
        theirs = web.WebSocketResponse().can_prepare(request).ok
        return web.Response(text=json.dumps([ours, theirs]), headers={"Connection": "close"})

    app = web.Application()
    app.router.add_get("/", answer)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def _ask(port: int, headers: list[tuple[str, str]]) -> list[bool]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = ["GET / HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers)]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return json.loads(await asyncio.wait_for(reader.readexactly(length), 10))  # type: ignore[no-any-return]
    finally:
        writer.close()


async def test_the_handshake_check_agrees_with_aiohttp(port: int) -> None:
    for name, headers, expected in CASES:
        ours, theirs = await _ask(port, headers)
        assert (ours, theirs) == (expected, expected), name
