"""An app for the race between a new member's upgrade and the next turn's broadcast.

``/room/{name}?name=N`` is the load test's chat room: ``on_connect`` replays the history,
``on_message`` appends the post and broadcasts it to every member. ``on_connect`` of a
member named ``held`` waits until ``/hold`` is told ``release``, so a test knows the
connect request is at the object (``/hold`` answers ``wait`` once it is) and can choose
what happens next.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from wsgate import Accept, App, Connection, ConnectRequest, DurableObject

app = App()

_connecting = asyncio.Event()
_released = asyncio.Event()


@app.durable("/room/{name}")
class Room(DurableObject):
    namespace = "joins"

    async def on_connect(self, conn: Connection, request: ConnectRequest) -> Accept:
        name = request.query.get("name", "anonymous")
        if name == "held":
            _connecting.set()
            await _released.wait()
        for post in await self.storage.get("history", []):
            await conn.send(json.dumps({**post, "replay": True}))
        return Accept(state={"name": name})

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        post = {"from": conn.state["name"], "text": str(message)}
        history: list[Any] = await self.storage.get("history", [])
        await self.storage.put("history", [*history, post][-100:])
        await self.broadcast(json.dumps(post))


hold = app.route("/hold")


@hold.on_message
async def hold_message(conn: Connection, message: str | bytes) -> None:
    if message == "wait":
        await _connecting.wait()
        await conn.send("connecting")
    elif message == "release":
        _released.set()
        await conn.send("released")
