"""The durable object SDK through the whole path: the chat and counter examples, and
conn.state, peers, alarms and misuse (tests/apps/sdk.py), on real processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness import Stack, stack_context

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    for stack in stack_context(tmp_path_factory.mktemp("examples"), workers=2):
        stack.start_gateway()  # a second gateway: rooms span gateways
        yield stack


@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_context(tmp_path_factory.mktemp("sdk"), app="tests.apps.sdk:app")


async def receive_json(ws: aiohttp.ClientWebSocketResponse) -> Any:
    return json.loads((await ws.receive(timeout=20)).data)


async def test_a_chat_room_spans_gateways_and_replays_its_history(examples: Stack) -> None:
    room = "/chat/spans?name="
    async with aiohttp.ClientSession() as session:
        alice = await session.ws_connect(examples.ws_url(room + "alice", gateway=0))
        assert await receive_json(alice) == {"type": "presence", "names": []}
        bob = await session.ws_connect(examples.ws_url(room + "bob", gateway=1))
        assert await receive_json(bob) == {"type": "presence", "names": ["alice"]}
        assert await receive_json(alice) == {"type": "join", "name": "bob"}

        await alice.send_str("hello from gateway 0")
        for ws in (alice, bob):  # everyone, the sender included, in the same order
            event = await receive_json(ws)
            assert (event["type"], event["name"], event["text"]) == (
                "message",
                "alice",
                "hello from gateway 0",
            )
        await bob.send_str("hi")
        assert (await receive_json(alice))["text"] == "hi"
        assert (await receive_json(bob))["text"] == "hi"

        await bob.close()
        assert await receive_json(alice) == {"type": "leave", "name": "bob"}

        # Whoever joins later gets the history first, then who is there.
        carol = await session.ws_connect(examples.ws_url(room + "carol", gateway=1))
        replayed = [await receive_json(carol) for _ in range(2)]
        assert [(e["name"], e["text"], e["replay"]) for e in replayed] == [
            ("alice", "hello from gateway 0", True),
            ("bob", "hi", True),
        ]
        assert await receive_json(carol) == {"type": "presence", "names": ["alice"]}
        await carol.close()
        await alice.close()


async def test_a_chat_room_keeps_only_the_last_100_messages(examples: Stack) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(examples.ws_url("/chat/long?name=writer")) as writer,
    ):
        await receive_json(writer)  # presence
        for i in range(105):
            await writer.send_str(f"m{i}")
        for _ in range(105):
            await receive_json(writer)
        async with session.ws_connect(examples.ws_url("/chat/long?name=reader")) as reader:
            replayed = [await receive_json(reader) for _ in range(100)]
            assert [e["text"] for e in replayed] == [f"m{i}" for i in range(5, 105)]
            assert (await receive_json(reader))["type"] == "presence"


async def test_a_name_over_the_limit_is_refused(examples: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(examples.ws_url("/chat/x?name=" + "n" * 32)) as ws:
            assert (await receive_json(ws))["type"] == "presence"
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await session.ws_connect(examples.ws_url("/chat/x?name=" + "n" * 33))
        assert info.value.status == 400


async def test_conn_state_is_the_attachment_and_can_be_replaced(sdk: Stack) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(sdk.ws_url("/room/state")) as ws,
    ):
        await ws.send_str("state")
        state = json.loads((await ws.receive(timeout=20)).data)
        assert set(state) == {"joined"}
        await ws.send_str('set {"n": 1, "b": [true, null]}')
        assert (await ws.receive(timeout=20)).data == "set"
        await ws.send_str("state")  # another event, maybe another worker: read back
        assert json.loads((await ws.receive(timeout=20)).data) == {"n": 1, "b": [True, None]}


async def test_connections_by_tag_and_sending_to_peers(sdk: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        red = await session.ws_connect(sdk.ws_url("/room/tags?tag=red&tag=warm"))
        blue = await session.ws_connect(sdk.ws_url("/room/tags?tag=blue"))
        await red.send_str("state")
        red_id = json.loads((await red.receive(timeout=20)).data)["joined"]
        await blue.send_str("state")
        blue_id = json.loads((await blue.receive(timeout=20)).data)["joined"]
        await red.send_str("peers warm")
        assert json.loads((await red.receive(timeout=20)).data) == [red_id]
        await red.send_str("peers")
        assert sorted(json.loads((await red.receive(timeout=20)).data)) == sorted([red_id, blue_id])
        await red.send_str("poke")
        assert (await blue.receive(timeout=20)).data == f"poked by {red_id}"
        assert (await red.receive(timeout=20)).data == "poked"
        await red.close()
        await blue.close()


async def test_on_alarm_of_a_durable_object_runs(sdk: Stack) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(sdk.ws_url("/room/alarmed")) as ws,
    ):
        await ws.send_str("alarm 100")
        assert (await ws.receive(timeout=20)).data == "alarm set"
        assert (await ws.receive(timeout=20)).data == "alarm alarmed"


async def test_a_durable_object_can_reject(sdk: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await session.ws_connect(sdk.ws_url("/room/r?deny=1"))
        assert info.value.status == 403


async def test_membership_on_a_function_route_is_a_clear_error(sdk: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await session.ws_connect(sdk.ws_url("/misuse/tags-on-a-function-route"))
        assert info.value.status == 500
    assert "needs a durable object route" in _worker_log(sdk)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ("state", "NoConnectionState"),
        ("unstorable", "InvalidValue"),
        ("too-large", "ValueTooLarge"),
        ("closed", "ConnectionClosed"),
    ],
)
async def test_misuse_in_a_handler_is_a_typed_error(sdk: Stack, message: str, error: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(sdk.ws_url("/misuse/plain")) as ws,
    ):
        await ws.send_str(message)
        closing = await ws.receive(timeout=20)
        assert closing.type is aiohttp.WSMsgType.CLOSE
        # The handler's own close, or the 1011 its exception leads to.
        assert ws.close_code in (4000, 1011)
    assert error in _worker_log(sdk)


def _worker_log(stack: Stack) -> str:
    return "".join(
        path.read_text(errors="replace") for path in Path(stack.log_dir).glob("worker*.log")
    )


async def test_an_unknown_route_is_404(sdk: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await session.ws_connect(sdk.ws_url("/no/such/route"))
        assert info.value.status == 404
