"""The server API on real processes (a worker serving tests/apps/calls.py with its API
ports open, a gateway, NATS, the state service): every call, over HTTP/JSON and over gRPC,
its token check, and its errors; the clients see what it sends."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Iterator

import aiohttp
import grpc
import pytest
import pytest_asyncio

from tests.certs import Pki
from tests.harness import Stack, stack_context
from tests.tokens import JWT_ENV, token
from wsgate import ids
from wsgate.calls import encode_arguments
from wsgate.client import ClientClosed, connect
from wsgate.v1 import api_pb2 as api_pb
from wsgate.v1 import api_pb2_grpc
from wsgate.v1 import envelope_pb2 as pb
from wsgate.v1 import state_pb2 as state_pb
from wsgate.values import decode_value

pytestmark = pytest.mark.timeout(120)

APP = "tests.apps.calls:app"
KEY = "test-key-0123456789abcdef"
#: The API's body limit here.
BODY_LIMIT = 4096


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_context(
        tmp_path_factory.mktemp("server-api"),
        app=APP,
        worker_args=(
            "--api-port", "0", "--api-grpc-port", "0",
            "--api-keys", f"{KEY},another-key-0123456789",
            "--api-max-body-bytes", str(BODY_LIMIT),
        ),
        worker_env=JWT_ENV,
    )  # fmt: skip


@pytest_asyncio.fixture
async def api(stack: Stack) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    base = f"http://127.0.0.1:{stack.workers[0].info['api_port']}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
        yield base, session


async def member_id(stack: Stack, api: tuple[str, aiohttp.ClientSession], room: str) -> str:
    """The id of the only connection of Counter ``room`` (listed by the API)."""
    base, http = api
    async with http.get(f"{base}/v1/objects/Counter/{room}/connections") as resp:
        assert resp.status == 200
        (listed,) = (await resp.json())["connections"]
        return str(listed["id"])


async def test_a_token_is_required(stack: Stack, api: tuple[str, aiohttp.ClientSession]) -> None:
    base, _ = api
    url = f"{base}/v1/objects/Counter"
    async with aiohttp.ClientSession() as anonymous:
        for headers, status in (
            ({}, 401),
            ({"Authorization": "Bearer not-a-key"}, 401),
            ({"Authorization": f"Basic {KEY}"}, 401),
            ({"Authorization": f"Bearer {KEY}x"}, 401),
            ({"Authorization": "Bearer another-key-0123456789"}, 200),
            ({"Authorization": f"Bearer {token(scope='other wsgate:api')}"}, 200),
            ({"Authorization": f"Bearer {token(scope='other')}"}, 403),
            ({"Authorization": f"Bearer {token()}"}, 403),  # no scope at all
            ({"Authorization": f"Bearer {token(scope='wsgate:api', lifetime_s=-120)}"}, 401),
        ):
            async with anonymous.get(url, headers=headers) as resp:
                assert resp.status == status, headers
                if status == 401:
                    assert resp.headers["WWW-Authenticate"] == "Bearer"
                    assert (await resp.json())["error"]["type"] == "Unauthorized"


async def test_send_and_close_reach_the_connection(
    stack: Stack, api: tuple[str, aiohttp.ClientSession]
) -> None:
    base, http = api
    async with connect(stack.ws_url("/counter/sending")) as ws:
        await ws.send("read")
        assert await ws.receive() == "0"
        cid = await member_id(stack, api, "sending")
        async with http.post(f"{base}/v1/connections/{cid}/send", json={"text": "hi"}) as resp:
            assert (resp.status, await resp.json()) == (202, {"sent": 1})
        assert await ws.receive() == "hi"
        blob = base64.b64encode(b"\x00\xff").decode()
        async with http.post(f"{base}/v1/connections/{cid}/send", json={"base64": blob}) as resp:
            assert resp.status == 202
        assert await ws.receive() == b"\x00\xff"
        for bad in ({"code": 1005}, {"code": "x"}, {"code": 4000, "reason": "r" * 124}):
            async with http.post(f"{base}/v1/connections/{cid}/close", json=bad) as resp:
                assert resp.status == 400, bad
        close = {"code": 4000, "reason": "r" * 123}  # the longest reason
        async with http.post(f"{base}/v1/connections/{cid}/close", json=close) as resp:
            assert (resp.status, await resp.json()) == (202, {"closing": 1})
        with pytest.raises(ClientClosed) as closed:
            await ws.receive()
        assert (closed.value.code, closed.value.reason) == (4000, "r" * 123)


async def test_unknown_and_malformed_connections(
    stack: Stack, api: tuple[str, aiohttp.ClientSession]
) -> None:
    base, http = api
    gateway = str(stack.gateways[0].info["gateway_id"])
    source = ids.ConnectionIds(gateway)
    for _ in range(100_000):  # far past the ids the gateway has given out
        never = source.next()  # on a live gateway, never connected
    dead = ids.ConnectionIds(ids.new_gateway_id("gone")).next()  # on no gateway at all
    for cid, status, kind in (
        (never, 404, "UnknownConnection"),
        (dead, 404, "UnknownConnection"),
        ("not-a-connection-id", 400, "InvalidConnectionId"),
    ):
        async with http.post(f"{base}/v1/connections/{cid}/send", json={"text": "x"}) as resp:
            assert resp.status == status, cid
            assert (await resp.json())["error"]["type"] == kind


async def test_broadcast_and_listing_an_objects_connections(
    stack: Stack, api: tuple[str, aiohttp.ClientSession]
) -> None:
    base, http = api
    url = f"{base}/v1/objects/Counter/broadcasting"
    async with connect(stack.ws_url("/counter/broadcasting")) as a:
        await a.send("read")
        assert await a.receive() == "0"
        a_id = await member_id(stack, api, "broadcasting")
        async with connect(stack.ws_url("/counter/broadcasting")) as b:
            await b.send("read")
            assert await b.receive() == "0"
            async with http.get(f"{url}/connections") as resp:
                listed = (await resp.json())["connections"]
            assert len(listed) == 2
            assert all(entry["tags"] == [] and entry["state"] is None for entry in listed)
            async with http.post(f"{url}/broadcast", json={"text": "to all"}) as resp:
                assert (await resp.json()) == {"recipients": 2, "commands": 1}
            assert await a.receive() == "to all"
            assert await b.receive() == "to all"
            async with http.post(
                f"{url}/broadcast", json={"text": "not a", "exclude": [a_id]}
            ) as resp:
                assert (await resp.json())["recipients"] == 1
            assert await b.receive() == "not a"
            async with http.post(f"{url}/broadcast", json={"text": "x", "tag": "none"}) as resp:
                assert (await resp.json())["recipients"] == 0
            async with http.post(f"{url}/broadcast", json={"tag": "x"}) as resp:
                assert resp.status == 400  # no message
    async with http.post(f"{base}/v1/objects/Nobody/x/broadcast", json={"text": "x"}) as resp:
        assert (resp.status, (await resp.json())["error"]["type"]) == (404, "UnknownNamespace")


async def test_calls_of_an_objects_methods(
    stack: Stack, api: tuple[str, aiohttp.ClientSession]
) -> None:
    base, http = api
    url = f"{base}/v1/objects/Counter/api-calls/call"
    async with http.post(f"{url}/add", json={"args": [2]}) as resp:
        assert (resp.status, await resp.json()) == (200, {"value": 2})
    async with http.post(f"{url}/add", json={"kwargs": {"n": 3}}) as resp:
        assert (await resp.json()) == {"value": 5}
    async with http.post(f"{url}/blob", json={"args": [3]}) as resp:
        assert (await resp.json()) == {"value": {"base64": base64.b64encode(b"xxx").decode()}}
    for method, body, status, kind in (
        ("missing", {}, 404, "NoSuchMethod"),
        ("fail", {"args": ["boom"]}, 500, "CallFailed"),
        ("blob", {"args": [200_000]}, 413, "CallTooLarge"),
        ("_private", {}, 400, "InvalidCall"),
        ("add", {"args": "not a list"}, 400, "InvalidRequest"),
    ):
        async with http.post(f"{url}/{method}", json=body) as resp:
            assert resp.status == status, method
            assert (await resp.json())["error"]["type"] == kind, method
    async with http.post(f"{base}/v1/objects/Nobody/x/call/add", json={}) as resp:
        assert resp.status == 404


async def test_objects_are_listed(stack: Stack, api: tuple[str, aiohttp.ClientSession]) -> None:
    base, http = api
    for name in ("list-a", "list-b", "list-c"):
        async with http.post(f"{base}/v1/objects/Counter/{name}/call/add", json={}) as resp:
            assert resp.status == 200
    async with http.get(f"{base}/v1/objects/Counter?prefix=list-&limit=2") as resp:
        page = await resp.json()
    assert [o["name"] for o in page["objects"]] == ["list-a", "list-b"]
    assert page["more"] is True
    assert page["objects"][0]["keys"] == 1
    async with http.get(f"{base}/v1/objects/Counter?prefix=list-&after=list-b") as resp:
        page = await resp.json()
    assert ([o["name"] for o in page["objects"]], page["more"]) == (["list-c"], False)
    for query in ("limit=0", "limit=1001", "limit=x"):
        async with http.get(f"{base}/v1/objects/Counter?{query}") as resp:
            assert resp.status == 400, query


async def test_bodies_at_the_limit_and_over_it(
    stack: Stack, api: tuple[str, aiohttp.ClientSession]
) -> None:
    base, http = api
    url = f"{base}/v1/objects/Counter/bodies/call/nothing"
    # {"args": [{"base64": ...}]} is no bytes argument: a str, sized to the limit.
    overhead = len('{"args": [""]}')
    at_limit = '{"args": ["' + "y" * (BODY_LIMIT - overhead) + '"]}'
    assert len(at_limit) == BODY_LIMIT
    headers = {"Content-Type": "application/json"}
    async with http.post(url, data=at_limit, headers=headers) as resp:
        assert resp.status == 200
        assert await resp.json() == {"value": BODY_LIMIT - overhead}
    over = '{"args": ["' + "y" * (BODY_LIMIT - overhead + 1) + '"]}'
    async with http.post(url, data=over, headers=headers) as resp:
        assert (resp.status, (await resp.json())["error"]["type"]) == (413, "PayloadTooLarge")
    async with http.post(url, data="{not json", headers=headers) as resp:
        assert resp.status == 400


# -- the same over gRPC --------------------------------------------------------------------

AUTH = (("authorization", f"Bearer {KEY}"),)


@pytest_asyncio.fixture
async def rpc(stack: Stack) -> AsyncIterator[api_pb2_grpc.ServerApiStub]:
    address = f"127.0.0.1:{stack.workers[0].info['api_grpc_port']}"
    async with grpc.aio.insecure_channel(address) as channel:
        yield api_pb2_grpc.ServerApiStub(channel)


async def rpc_error(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return raised.value.code(), str(raised.value.details())


async def test_grpc_every_call(stack: Stack, rpc: api_pb2_grpc.ServerApiStub) -> None:
    obj = state_pb.ObjectId(namespace="Counter", name="over-grpc")
    async with connect(stack.ws_url("/counter/over-grpc")) as ws:
        await ws.send("read")
        assert await ws.receive() == "0"
        listed = await rpc.Connections(api_pb.ApiConnectionsRequest(object=obj), metadata=AUTH)
        (member,) = listed.connections
        assert (list(member.tags), member.state) == ([], b"")
        await rpc.Send(
            api_pb.ApiSendRequest(connection_id=member.id, message=pb.Message(binary=b"\x01")),
            metadata=AUTH,
        )
        assert await ws.receive() == b"\x01"
        sent = await rpc.Broadcast(
            api_pb.ApiBroadcastRequest(object=obj, message=pb.Message(text="all")), metadata=AUTH
        )
        assert (sent.recipients, sent.commands) == (1, 1)
        assert await ws.receive() == "all"
        answer = await rpc.Call(
            api_pb.ApiCallRequest(
                object=obj, method="echo", arguments=encode_arguments([b"\x00"], {"k": 1})
            ),
            metadata=AUTH,
        )
        assert decode_value(answer.value) == {"args": [b"\x00"], "kwargs": {"k": 1}}
        page = await rpc.ListObjects(
            state_pb.ListObjectsRequest(namespace="Counter", prefix="over-"), metadata=AUTH
        )
        assert [o.name for o in page.objects] == ["over-grpc"]
        await rpc.Close(
            api_pb.ApiCloseRequest(connection_id=member.id, code=4001, reason="bye"), metadata=AUTH
        )
        with pytest.raises(ClientClosed) as closed:
            await ws.receive()
        assert closed.value.code == 4001


async def test_grpc_errors_are_statuses(stack: Stack, rpc: api_pb2_grpc.ServerApiStub) -> None:
    obj = state_pb.ObjectId(namespace="Counter", name="grpc-errors")
    listing = state_pb.ListObjectsRequest(namespace="Counter")
    assert (await rpc_error(rpc.ListObjects(listing)))[0] == grpc.StatusCode.UNAUTHENTICATED
    bad_key = (("authorization", "Bearer wrong-key-0123456789"),)
    code, _ = await rpc_error(rpc.ListObjects(listing, metadata=bad_key))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    scoped = (("authorization", f"Bearer {token(scope='other')}"),)
    code, _ = await rpc_error(rpc.ListObjects(listing, metadata=scoped))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    gone = ids.ConnectionIds(ids.new_gateway_id("gone")).next()
    send = api_pb.ApiSendRequest(connection_id=gone, message=pb.Message(text="x"))
    code, details = await rpc_error(rpc.Send(send, metadata=AUTH))
    assert (code, details.split(":")[0]) == (grpc.StatusCode.NOT_FOUND, "UnknownConnection")
    close = api_pb.ApiCloseRequest(connection_id=gone, code=1005)
    code, details = await rpc_error(rpc.Close(close, metadata=AUTH))
    assert (code, details.split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "InvalidCloseCode")
    for method, arguments, expected, kind in (
        ("missing", b"", grpc.StatusCode.NOT_FOUND, "NoSuchMethod"),
        ("fail", encode_arguments(["boom"], {}), grpc.StatusCode.INTERNAL, "CallFailed"),
        (
            "blob",
            encode_arguments([200_000], {}),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "CallTooLarge",
        ),
        ("add", b"\xff", grpc.StatusCode.INVALID_ARGUMENT, "InvalidCall"),
    ):
        call = api_pb.ApiCallRequest(object=obj, method=method, arguments=arguments)
        code, details = await rpc_error(rpc.Call(call, metadata=AUTH))
        assert (code, details.split(":")[0]) == (expected, kind), method
    nobody = api_pb.ApiConnectionsRequest(object=state_pb.ObjectId(namespace="Nobody", name="x"))
    code, details = await rpc_error(rpc.Connections(nobody, metadata=AUTH))
    assert (code, details.split(":")[0]) == (grpc.StatusCode.NOT_FOUND, "UnknownNamespace")


async def test_a_grpc_message_over_the_body_limit_is_refused(
    stack: Stack, rpc: api_pb2_grpc.ServerApiStub
) -> None:
    too_big = api_pb.ApiSendRequest(
        connection_id=ids.ConnectionIds(ids.new_gateway_id("gone")).next(),
        message=pb.Message(binary=b"x" * BODY_LIMIT),
    )
    code, _ = await rpc_error(rpc.Send(too_big, metadata=AUTH))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_tls_on_both_faces(tmp_path_factory: pytest.TempPathFactory) -> None:
    """With a certificate, the API answers over HTTPS and gRPC over TLS, and only so."""
    pki = Pki(tmp_path_factory.mktemp("api-pki"))
    server = pki.server("api")
    args = (
        "--api-port", "0", "--api-grpc-port", "0", "--api-keys", KEY,
        "--api-tls-cert", str(server.cert), "--api-tls-key", str(server.key),
    )  # fmt: skip
    for secured in stack_context(
        tmp_path_factory.mktemp("api-tls"), app=APP, gateway=False, worker_args=args
    ):
        port = secured.workers[0].info["api_port"]
        headers = {"Authorization": f"Bearer {KEY}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            url = f"https://127.0.0.1:{port}/v1/objects/Counter"
            async with http.get(url, ssl=pki.client_context()) as resp:
                assert resp.status == 200
            with pytest.raises(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{port}/v1/objects/Counter"):
                    pass
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        address = f"127.0.0.1:{secured.workers[0].info['api_grpc_port']}"
        async with grpc.aio.secure_channel(address, credentials) as channel:
            stub = api_pb2_grpc.ServerApiStub(channel)
            page = await stub.ListObjects(
                state_pb.ListObjectsRequest(namespace="Counter"), metadata=AUTH, timeout=10
            )
            assert not page.more
        async with grpc.aio.insecure_channel(address) as channel:
            stub = api_pb2_grpc.ServerApiStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListObjects(
                    state_pb.ListObjectsRequest(namespace="Counter"), metadata=AUTH, timeout=5
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
