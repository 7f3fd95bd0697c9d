"""The path gateway → NATS → worker → NATS → gateway, through real processes."""

from __future__ import annotations

import json
import uuid
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


async def test_connect_handler_refusal_reaches_the_client_exactly(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(stack.ws_url("/private/echo"))
    assert refused.value.status == 401
    assert refused.value.headers is not None
    assert refused.value.headers["WWW-Authenticate"] == "Bearer"
    # The body too: the same upgrade request sent by hand shows it.
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    async with session.get(stack.url + "/private/echo?token=wrong", headers=headers) as resp:
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
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    async with session.get(stack.url + "/jwt/echo?token=wrong", headers=headers) as resp:
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
