"""Plain HTTP requests to routes on real processes (tests/apps/requests.py): a route's
``on_request`` answers, a durable object's as a turn of its activation; routes without one
keep answering ``400 Expected websocket``; every failure is a clear status."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import pytest_asyncio

from tests.harness import Stack, metric, stack_context
from wsgate.client import connect

pytestmark = pytest.mark.timeout(120)

APP = "tests.apps.requests:app"
#: The gateway's message size limit here, which bounds a request's body too.
LIMIT = 4096


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_context(
        tmp_path_factory.mktemp("requests"),
        app=APP,
        gateway_args=("--max-message-bytes", str(LIMIT), "--connect-timeout-s", "10"),
        worker_args=("--turn-timeout-s", "2"),
    )


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_a_function_routes_request_handler_answers(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    url = stack.url + "/info/ada?x=1&status=201"
    async with http.post(url, data=b"hello", headers={"X-Test": "t"}) as resp:
        assert resp.status == 201
        assert resp.headers["X-Answer"] == "yes"
        assert resp.headers["Content-Type"] == "application/json"
        # Hop-by-hop headers of the app's are the gateway's to set.
        assert resp.headers.get("Connection", "").lower() != "close"
        assert json.loads(await resp.read()) == {
            "method": "POST",
            "path": "/info/ada",
            "params": {"name": "ada"},
            "query": {"x": "1", "status": "201"},
            "body": "hello",
            "header": "t",
            "remote": True,
        }
    async with http.head(stack.url + "/info/ada") as resp:
        assert resp.status == 200


async def test_routes_without_a_request_handler_keep_answering_400(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    for path in ("/echo", "/plain/room", "/no/such/route"):
        for method in ("GET", "POST"):
            async with http.request(method, stack.url + path) as resp:
                assert (resp.status, await resp.text()) == (400, "Expected websocket"), path
    async with connect(stack.ws_url("/echo")) as ws:  # the route still serves WebSockets
        await ws.send("still here")
        assert await ws.receive() == "still here"


async def test_a_durable_objects_request_is_a_turn_in_order_with_its_events(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    url = stack.url + "/counter/ordered"
    async with connect(stack.ws_url("/counter/ordered")) as ws:

        async def by_socket() -> list[int]:
            seen = []
            for _ in range(20):
                await ws.send("add")
                while True:  # the requests' announcements come in between
                    frame = await ws.receive()
                    if not str(frame).startswith("{"):
                        seen.append(int(frame))
                        break
            return seen

        async def by_requests() -> list[int]:
            seen = []
            for _ in range(20):
                async with http.post(url, data=b"1") as resp:
                    assert resp.status == 200
                    assert resp.headers["X-Object"] == "ordered"
                    seen.append(int(await resp.text()))
            return seen

        socket_values, request_values = await asyncio.gather(by_socket(), by_requests())
    # One sequence, no value twice: every request and every message was one turn.
    assert sorted(socket_values + request_values) == list(range(1, 41))
    async with http.get(url) as resp:
        assert (resp.status, await resp.text()) == (200, "40")


async def test_a_durable_objects_broadcast_from_a_request_reaches_its_connections(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    async with connect(stack.ws_url("/counter/announce")) as ws:
        await ws.send("join")
        assert await ws.receive() == "1"
        async with http.post(stack.url + "/counter/announce", data=b"5") as resp:
            assert await resp.text() == "6"
        assert json.loads(str(await ws.receive())) == {"announced": 6}


async def test_a_handler_that_raises_is_500_and_an_object_keeps_its_writes(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    async with http.get(stack.url + "/info/x?fail=1") as resp:
        assert (resp.status, await resp.text()) == (500, "Internal Server Error")
    async with http.get(stack.url + "/info/x?bad=1") as resp:
        assert resp.status == 500
    url = stack.url + "/counter/failing"
    async with http.delete(url) as resp:
        assert resp.status == 500
    async with http.get(url) as resp:  # the write before the failure stays, as a handler's
        assert (resp.status, await resp.text()) == (200, "-1")


async def test_a_handler_past_the_turn_limit_is_504(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    async with http.get(stack.url + "/info/x?sleep=5") as resp:
        assert resp.status == 504


async def test_a_body_at_the_limit_and_over_it(stack: Stack, http: aiohttp.ClientSession) -> None:
    async with http.post(stack.url + "/info/x", data=b"y" * LIMIT) as resp:
        assert resp.status == 200
        assert json.loads(await resp.read())["body"] == "y" * LIMIT
    async with http.post(stack.url + "/info/x", data=b"y" * (LIMIT + 1)) as resp:
        assert resp.status == 413

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
        for _ in range(LIMIT // 1000 + 1):
            yield b"z" * 1000

    async with http.post(stack.url + "/info/x", data=chunked()) as resp:
        assert resp.status == 413


async def test_a_large_response_passes(stack: Stack, http: aiohttp.ClientSession) -> None:
    async with http.get(stack.url + "/info/x?size=500000") as resp:
        assert resp.status == 200
        assert await resp.read() == b"x" * 500000


async def test_plain_requests_are_counted_by_status_class(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    probes = stack.url + "/metrics"
    before = await metric(probes, "wsgate_gateway_http_requests_total", {"status": "4xx"})
    async with http.get(stack.url + "/echo") as resp:
        assert resp.status == 400
    after = await metric(probes, "wsgate_gateway_http_requests_total", {"status": "4xx"})
    assert after == before + 1


async def test_no_worker_is_503(tmp_path_factory: pytest.TempPathFactory) -> None:
    for stack in stack_context(tmp_path_factory.mktemp("no-worker"), app=APP, worker=False):
        async with (
            aiohttp.ClientSession() as http,
            http.get(stack.url + "/info/x") as resp,
        ):
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"


@pytest.mark.parametrize("token", ["", "t0ken"])
async def test_the_chat_examples_announcements(
    tmp_path_factory: pytest.TempPathFactory, token: str
) -> None:
    """examples/app.py's rooms take announcements by POST with the workers' token; the
    browser test (tests/browser) sees them arrive."""
    env = {"WSGATE_ANNOUNCE_TOKEN": token} if token else {}
    for stack in stack_context(
        tmp_path_factory.mktemp("chat"), app="wsgate.examples.app:app", worker_env=env
    ):
        url = stack.url + "/chat/lobby"
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(url, data=b"hello", headers=auth) as resp:
                assert resp.status == (200 if token else 403)
                if token:
                    assert await resp.json() == {"room": "lobby", "recipients": 0}
            async with http.get(url) as resp:
                assert (resp.status, resp.headers["Allow"]) == (405, "POST")
            if token:
                async with http.post(url, data=b"  \n", headers=auth) as resp:
                    assert resp.status == 400
                wrong = {"Authorization": "Bearer x"}
                async with http.post(url, data=b"hello", headers=wrong) as resp:
                    assert resp.status == 401
        async with connect(stack.ws_url("/chat/lobby?name=ann")) as ws:
            first = json.loads(str(await ws.receive()))
            if token:  # the announcement is in the history the room replays
                assert (first["type"], first["text"], first["replay"]) == (
                    "announcement",
                    "hello",
                    True,
                )
            else:
                assert first["type"] == "presence"
