"""Live tags on real processes (tests/apps/tags.py): a connection's tags change in its
handlers, within the limits; listings and broadcasts by tag see the change at once; and
under load no broadcast to a tag is lost or doubled while its members come and go."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from tests.harness import Stack, stack_context
from wsgate.client import Client, UpgradeRefused, connect
from wsgate.limits import MAX_TAG_CHARS, MAX_TAGS

pytestmark = pytest.mark.timeout(120)

APP = "tests.apps.tags:app"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_context(tmp_path_factory.mktemp("tags"), app=APP)


async def ask(ws: Client, command: str) -> str:
    await ws.send(command)
    answer = await ws.receive()
    assert isinstance(answer, str)
    return answer


async def tags(ws: Client, command: str) -> list[str]:
    answer = await ask(ws, command)
    assert answer.startswith("tags "), answer
    return json.loads(answer.removeprefix("tags "))


async def who(ws: Client, tag: str) -> list[list[object]]:
    return json.loads((await ask(ws, f"who {tag}")).removeprefix("who "))


async def test_tags_change_and_listings_see_it_at_once(stack: Stack) -> None:
    url = stack.ws_url("/tags/listing")
    async with connect(url + "?tags=red") as a, connect(url) as b:
        a_id = (await ask(a, "me")).removeprefix("me ")
        assert await tags(a, "tags") == ["red"]
        assert await who(b, "red") == [[a_id, ["red"]]]
        assert await tags(a, "add blue,green,red") == ["red", "blue", "green"]
        assert await who(b, "blue") == [[a_id, ["red", "blue", "green"]]]
        assert await tags(a, "remove red,absent") == ["blue", "green"]
        assert await who(b, "red") == []
        assert await tags(a, "set yellow") == ["yellow"]
        assert await who(b, "green") == []
        assert await who(b, "yellow") == [[a_id, ["yellow"]]]
        assert await tags(a, "set") == []
        assert await who(b, "yellow") == []
    async with connect(url) as again:
        # A later connection's handler (another turn, committed state) sees the same.
        assert await who(again, "yellow") == []


async def test_a_broadcast_in_the_same_turn_sees_the_new_tag(stack: Stack) -> None:
    url = stack.ws_url("/tags/same-turn")
    async with connect(url) as a, connect(url + "?tags=x") as b:
        # The broadcast leaves before the answer (the turn's output, in order).
        await a.send("add-then-send news 1")
        assert await a.receive() == "b 1"
        assert await a.receive() == "sent 1 1"
        assert await ask(b, "send news 2") == "sent 2 1"  # b has no "news": it hears nothing
        assert await a.receive() == "b 2"
        assert await tags(a, "tags") == ["news"]


async def test_tags_at_the_limits_and_over_them(stack: Stack) -> None:
    async with connect(stack.ws_url("/tags/limits")) as ws:
        full = [f"t{i}" for i in range(MAX_TAGS)]
        assert await tags(ws, "set " + ",".join(full)) == full
        assert await ask(ws, "add one-more") == "refused TooManyTags"
        assert await tags(ws, "tags") == full  # nothing changed
        longest = "x" * MAX_TAG_CHARS
        assert await tags(ws, "set " + longest) == [longest]
        assert await ask(ws, "set " + longest + "x") == "refused TagTooLarge"
        assert await ask(ws, "set a,,b") == 'tags ["a", "b"]'  # "" is dropped by the app
        assert await ask(ws, "set-one-string abc") == "refused TypeError"
        assert await tags(ws, "tags") == ["a", "b"]


async def test_on_connect_has_no_tags_yet(stack: Stack) -> None:
    with pytest.raises(UpgradeRefused) as refused:
        async with connect(stack.ws_url("/tags/peek?peek=1")):
            pass
    assert refused.value.status == 409
    assert "NoConnectionState" in refused.value.body


async def test_no_broadcast_is_lost_or_doubled_while_tags_change(stack: Stack) -> None:
    """Four clients add and remove the tag "red" over and over while a fifth broadcasts to
    "red" 60 times. Every copy reported sent reaches a client exactly once, and only while
    that client had the tag (between the answers to its add and its remove)."""
    url = stack.ws_url("/tags/load")
    rounds, sends = 25, 60
    received: list[list[int]] = []
    outside: list[str] = []

    async def toggler() -> None:
        mine: list[int] = []
        received.append(mine)
        async with connect(url) as ws:
            for _ in range(rounds):
                for command, has_red in (("add red", True), ("remove red", False)):
                    await ws.send(command)
                    while True:
                        frame = await ws.receive()
                        assert isinstance(frame, str)
                        if frame.startswith("b "):
                            mine.append(int(frame.split(" ")[1]))
                            if has_red:  # before the add's answer: sent before it had red
                                outside.append(frame)
                            continue
                        assert frame == f"tags {json.dumps(['red'] if has_red else [])}"
                        break

    reported: dict[int, int] = {}

    async def sender() -> None:
        async with connect(url) as ws:
            for n in range(sends):
                answer = await ask(ws, f"send red {n}")
                _, number, recipients = answer.split(" ")
                reported[int(number)] = int(recipients)

    await asyncio.gather(*(toggler() for _ in range(4)), sender())
    assert len(reported) == sends
    for mine in received:
        assert len(mine) == len(set(mine)), "a client got one broadcast twice"
    got = [n for mine in received for n in mine]
    assert sum(reported.values()) == len(got), (reported, sorted(got))
    for n, count in reported.items():
        assert got.count(n) == count, n
    assert outside == [], "a client got a broadcast to red while it did not have red"
    assert sum(reported.values()) > 0  # the load did overlap
