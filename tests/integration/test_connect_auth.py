"""Authentication at connect through real processes: a gateway, a worker whose app
verifies JWTs (tests/apps/auth.py, keys from WSGATE_JWT_*), on function and durable
object routes, declared on the route or called from on_connect."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from tests import tokens
from tests.harness import Stack, metric, stack_context

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_context(
        tmp_path_factory.mktemp("auth"), app="tests.apps.auth:app", worker_env=tokens.JWT_ENV
    )


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def claims_of(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    claims: dict[str, Any] = json.loads((await ws.receive(timeout=20)).data)
    return claims


async def refusal(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, str, str]:
    """Status, body and WWW-Authenticate of a refused upgrade (sent by hand: aiohttp's
    ws_connect keeps the body from us)."""
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        **kwargs.pop("headers", {}),
    }
    async with session.get(url, headers=headers, **kwargs) as resp:
        return resp.status, await resp.text(), resp.headers.get("WWW-Authenticate", "")


async def test_a_declared_route_hands_the_verified_claims_to_on_connect(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    token = tokens.token("alice", role="admin")
    async with session.ws_connect(stack.ws_url("/declared"), headers=bearer(token)) as ws:
        claims = await claims_of(ws)
        assert (claims["sub"], claims["role"], claims["aud"]) == ("alice", "admin", "wsgate-tests")
        await ws.send_str("after the check")
        assert (await ws.receive(timeout=20)).data == "after the check"


async def test_an_expired_or_missing_token_is_a_401_with_the_reason_only(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    metrics = stack.worker_metrics_url()
    failures = "wsgate_worker_auth_failures_total"
    expired_before = await metric(metrics, failures, {"reason": "expired"})
    url = stack.url + "/declared"
    expired = tokens.token("alice", lifetime_s=-60)  # past the 30 s leeway
    assert await refusal(session, url, headers=bearer(expired)) == (
        401,
        "token expired",
        'Bearer error="invalid_token", error_description="token expired"',
    )
    # No token at all: the bare challenge (RFC 6750 3.1).
    assert await refusal(session, url) == (401, "missing token", "Bearer")
    forged = tokens.token("alice")[:-4] + "AAAA"
    assert await refusal(session, url, headers=bearer(forged)) == (
        401,
        "bad signature",
        'Bearer error="invalid_token", error_description="bad signature"',
    )
    assert await metric(metrics, failures, {"reason": "expired"}) == expired_before + 1


async def test_a_durable_route_verifies_before_the_object_and_keeps_what_it_needs(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    metrics = stack.worker_metrics_url()
    started = await metric(
        metrics, "wsgate_worker_activations_started_total", {"outcome": "granted"}
    )
    # A browser's way: the marker subprotocol, then the token. The SDK selects the marker.
    bad = tokens.token("mallory", aud="another-app")
    status, body, _ = await refusal(
        session,
        stack.url + "/room/refused",
        headers={"Sec-WebSocket-Protocol": f"bearer, {bad}"},
    )
    assert (status, body) == (401, "wrong audience")
    # Refused before the object: it was never activated.
    assert (
        await metric(metrics, "wsgate_worker_activations_started_total", {"outcome": "granted"})
        == started
    )
    good = tokens.token("bob")
    async with session.ws_connect(stack.ws_url("/room/lobby"), protocols=("bearer", good)) as ws:
        assert ws.protocol == "bearer"
        assert (await claims_of(ws))["sub"] == "bob"
        await ws.send_str("hi")  # a later event: the subject from the attachment
        assert (await ws.receive(timeout=20)).data == "bob: hi"


@pytest.mark.parametrize("path", ["/called", "/called-room/lobby"])
async def test_verify_called_in_on_connect_uncaught_is_the_same_401(
    stack: Stack, session: aiohttp.ClientSession, path: str
) -> None:
    url = stack.url + path
    early = tokens.token("carol", nbf=int(time.time()) + 600)
    assert await refusal(session, url, params={"token": early}) == (
        401,
        "token not yet valid",
        'Bearer error="invalid_token", error_description="token not yet valid"',
    )
    assert (await refusal(session, url))[:2] == (401, "missing token")
    ws_url = stack.ws_url(path)
    async with session.ws_connect(ws_url, params={"token": tokens.token("carol")}) as ws:
        assert (await claims_of(ws))["sub"] == "carol"
