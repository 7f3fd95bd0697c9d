"""The path gateway → NATS → worker → NATS → gateway, through real processes."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import sysconfig
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest

from tests import tokens
from tests.harness import Stack

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def session() -> aiohttp.ClientSession:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_text_comes_back_as_text(stack: Stack, session: aiohttp.ClientSession) -> None:
    async with session.ws_connect(stack.ws_url("/echo")) as ws:
        for text in ["hello", "", "héllo wörld ✓", "x" * 70_000]:
            await ws.send_str(text)
            msg = await ws.receive(timeout=10)
            assert msg.type is aiohttp.WSMsgType.TEXT
            assert msg.data == text


async def test_binary_comes_back_as_binary(stack: Stack, session: aiohttp.ClientSession) -> None:
    async with session.ws_connect(stack.ws_url("/echo")) as ws:
        for data in [b"\x00\x01\xff", b"", bytes(range(256)) * 1024, b"text-like bytes"]:
            await ws.send_bytes(data)
            msg = await ws.receive(timeout=10)
            assert msg.type is aiohttp.WSMsgType.BINARY
            assert msg.data == data


async def test_messages_come_back_in_the_order_sent(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    async with session.ws_connect(stack.ws_url("/echo")) as ws:
        sent = [f"m{i}" if i % 2 else f"m{i}".encode() for i in range(300)]
        for item in sent:
            if isinstance(item, str):
                await ws.send_str(item)
            else:
                await ws.send_bytes(item)
        received = [(await ws.receive(timeout=10)).data for _ in sent]
        assert received == sent


async def test_plain_get_to_a_websocket_route_is_400_expected_websocket(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    for method in ("GET", "POST"):
        async with session.request(method, stack.url + "/echo") as resp:
            assert resp.status == 400
            assert await resp.text() == "Expected websocket"


#: A valid upgrade request's headers, for sending one by hand (to read a refusal's body).
UPGRADE_HEADERS = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


async def test_connect_handler_refusal_reaches_the_client_exactly(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(stack.ws_url("/private/echo"))
    assert refused.value.status == 401
    assert refused.value.headers is not None
    assert refused.value.headers["WWW-Authenticate"] == "Bearer"
    # The body too: the same upgrade request sent by hand shows it.
    wrong = stack.url + "/private/echo?token=wrong"
    async with session.get(wrong, headers=UPGRADE_HEADERS) as resp:
        assert resp.status == 401
        assert await resp.text() == "Missing or wrong token"
    async with session.ws_connect(stack.ws_url("/private/echo?token=let-me-in")) as ws:
        await ws.send_str("inside")
        assert (await ws.receive(timeout=10)).data == "inside"


async def test_a_route_that_verifies_jwts_refuses_with_the_reason(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    # The example's /jwt/echo verifies JWTs (keys from WSGATE_JWT_*, tests/tokens.py).
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(stack.ws_url("/jwt/echo"))
    assert refused.value.status == 401
    assert refused.value.headers is not None
    assert refused.value.headers["WWW-Authenticate"] == "Bearer"
    # The body too: the same upgrade request sent by hand shows it.
    async with session.get(stack.url + "/jwt/echo?token=wrong", headers=UPGRADE_HEADERS) as resp:
        assert resp.status == 401
        assert await resp.text() == "malformed token"
        assert resp.headers["WWW-Authenticate"] == (
            'Bearer error="invalid_token", error_description="malformed token"'
        )
    token = tokens.token("tester")
    async with session.ws_connect(stack.ws_url(f"/jwt/echo?token={token}")) as ws:
        assert (await ws.receive(timeout=10)).data == "hello, tester"
        await ws.send_str("inside")
        assert (await ws.receive(timeout=10)).data == "inside"


async def test_unknown_route_is_404(stack: Stack, session: aiohttp.ClientSession) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(stack.ws_url("/no/such/route"))
    assert refused.value.status == 404


async def test_counter_is_shared_by_every_connection(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    name = f"visits-{uuid.uuid4().hex[:8]}"
    seen = []
    for _ in range(3):
        async with session.ws_connect(stack.ws_url(f"/counter/{name}")) as ws:
            seen.append(json.loads((await ws.receive(timeout=10)).data)["value"])
    assert seen == [1, 2, 3]
    async with session.ws_connect(stack.ws_url(f"/counter/{name}")) as ws:
        assert json.loads((await ws.receive(timeout=10)).data)["value"] == 4
        await ws.send_str("increment")
        assert json.loads((await ws.receive(timeout=10)).data) == {"counter": name, "value": 5}
        await ws.send_str("get")
        assert json.loads((await ws.receive(timeout=10)).data)["value"] == 5
        # A line as a command-line client sends it: the command, with its line ending.
        for line, value in [("increment\n", 6), ("increment\r\n", 7), ("get\n", 7)]:
            await ws.send_str(line)
            assert json.loads((await ws.receive(timeout=10)).data)["value"] == value


async def test_counters_with_awkward_names_are_independent(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    suffix = uuid.uuid4().hex[:6]
    names = [f"a.b{suffix}", f"a.*{suffix}", f"a.>{suffix}", f"a b{suffix}", f"ü✓{suffix}"]
    for expected in (1, 2):
        for name in names:
            async with session.ws_connect(stack.ws_url("/counter/" + quote(name, safe=""))) as ws:
                report = json.loads((await ws.receive(timeout=10)).data)
                assert report == {"counter": name, "value": expected}


async def test_health_and_readiness(stack: Stack, session: aiohttp.ClientSession) -> None:
    async with session.get(stack.url + "/healthz") as resp:
        assert resp.status == 200
    async with session.get(stack.url + "/readyz") as resp:
        assert resp.status == 200


def _websocat() -> str:
    found = shutil.which("websocat", path=sysconfig.get_path("scripts")) or shutil.which(
        "websocat", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.fail("websocat is missing: `scripts/bootstrap test` installs it (the test extra)")
    return found


@asynccontextmanager
async def _websocat_session(url: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """websocat connected to ``url`` in its default mode (each line of its stdin goes as one
    text message, ending included; each message received is a line of its stdout); stopped
    by its PID, whatever happens."""
    proc = await asyncio.create_subprocess_exec(
        _websocat(),
        url,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
        assert proc.stdin is not None
        proc.stdin.close()  # EOF: websocat sends a Close frame and leaves
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _exchange(proc: asyncio.subprocess.Process, line: bytes) -> bytes:
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(line)
    await proc.stdin.drain()
    return await asyncio.wait_for(proc.stdout.readline(), 10)


async def test_websocat_lines_count_and_echo_as_a_browser_would(stack: Stack) -> None:
    """The README's commands: a line typed into websocat is the command a browser sends."""
    name = f"typed-{uuid.uuid4().hex[:8]}"
    async with _websocat_session(stack.ws_url(f"/counter/{name}")) as counter:
        assert counter.stdout is not None
        opened = await asyncio.wait_for(counter.stdout.readline(), 10)
        assert json.loads(opened) == {"counter": name, "value": 1}
        replies = [
            json.loads(await _exchange(counter, line))["value"]
            for line in [b"increment\n", b"increment\n", b"get\n", b"increment\r\n"]
        ]
        assert replies == [2, 3, 3, 4]
    async with _websocat_session(stack.ws_url("/echo")) as echo:
        assert await _exchange(echo, "héllo wörld\n".encode()) == "héllo wörld\n".encode()
        assert await _exchange(echo, b"increment\n") == b"increment\n"
    room = f"typed-{uuid.uuid4().hex[:8]}"
    async with _websocat_session(stack.ws_url(f"/chat/{room}?name=typist")) as chat:
        assert chat.stdout is not None
        presence = json.loads(await asyncio.wait_for(chat.stdout.readline(), 10))
        assert presence == {"type": "presence", "names": []}
        said = json.loads(await _exchange(chat, b"hi there\r\n"))
        assert (said["type"], said["name"], said["text"]) == ("message", "typist", "hi there")
