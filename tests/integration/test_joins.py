"""A member that joins while others post gets every post: in the history its
``on_connect`` replays, or live. The connect decision (a NATS reply) and the next turn's
broadcast (a command on the gateway's subject) reach the gateway by different
subscriptions; the broadcast may be handled before the upgrade completes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.harness import Stack, stack_context

pytestmark = pytest.mark.timeout(60)

APP = "tests.apps.joins:app"


@pytest.fixture
def two_gateways(tmp_path: Path) -> Iterator[Stack]:
    for stack in stack_context(tmp_path, app=APP):
        stack.start_gateway()
        yield stack


async def test_a_post_right_after_a_join_reaches_the_new_member(two_gateways: Stack) -> None:
    stack = two_gateways
    second = stack.gateways[1]
    async with aiohttp.ClientSession() as session:
        poster = await session.ws_connect(stack.ws_url("/room/r?name=m1", gateway=0))
        control = await session.ws_connect(stack.ws_url("/hold", gateway=0))
        await poster.send_str("before")
        assert json.loads((await poster.receive(timeout=20)).data)["text"] == "before"

        # m0 joins through the second gateway; its on_connect waits at the object.
        joining = asyncio.create_task(
            session.ws_connect(stack.ws_url("/room/r?name=held", gateway=1))
        )
        await control.send_str("wait")
        assert (await control.receive(timeout=20)).data == "connecting"
        # The second gateway stops reading: the decision and the post's broadcast, released
        # one after the other, wait in its socket and are read together.
        os.kill(second.pid, signal.SIGSTOP)
        try:
            await poster.send_str("after")
            await control.send_str("release")
            assert (await control.receive(timeout=20)).data == "released"
            # m1's own copy: the post committed and was released (after the join's decision).
            assert json.loads((await poster.receive(timeout=20)).data)["text"] == "after"
        finally:
            os.kill(second.pid, signal.SIGCONT)
        held = await joining
        replay = json.loads((await held.receive(timeout=20)).data)
        assert replay == {"from": "m1", "text": "before", "replay": True}
        live = json.loads((await held.receive(timeout=5)).data)
        assert live == {"from": "m1", "text": "after"}
        for ws in (held, poster, control):
            await ws.close()
