"""The app the load cluster's workers run (mounted into their containers, loaded with
``--app loadapp:app --app-dir /app``): the example app's three kinds of traffic, with every
answer naming what it answers, so that the clients can tell lost, doubled and reordered
messages apart.

- ``/echo``: every message comes back as it came.
- ``/chat/{room}?name=N``: a chat room as in examples/app.py. A member posts any text; the
  room appends ``{"from": N, "text": text}`` to its history (the last 100 posts, read then
  written back) and broadcasts it to every member, the poster included. Whoever joins gets
  the history first, each post with ``"replay": true``.
- ``/counter/{name}``: Cloudflare's naive counter, a ``get`` then a ``put``. ``inc ID``
  adds one and answers ``ID VALUE``; ``get ID`` answers ``ID VALUE`` unchanged.

Imports only the SDK and the standard library: it runs in the project's image as is.
"""

from __future__ import annotations

import json
from typing import Any

from wsgate import Accept, App, Connection, ConnectRequest, DurableObject

app = App()

#: Posts a room keeps and replays to whoever joins.
HISTORY = 100

echo = app.route("/echo")


@echo.on_message
async def echo_message(conn: Connection, message: str | bytes) -> None:
    await conn.send(message)


@app.durable("/chat/{room}")
class Room(DurableObject):
    namespace = "room"

    async def on_connect(self, conn: Connection, request: ConnectRequest) -> Accept:
        for post in await self.storage.get("history", []):
            await conn.send(json.dumps({**post, "replay": True}))
        name = request.query.get("name", "anonymous")
        return Accept(state={"name": name})

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        post = {"from": conn.state["name"], "text": str(message)}
        history: list[Any] = await self.storage.get("history", [])
        await self.storage.put("history", [*history, post][-HISTORY:])
        await self.broadcast(json.dumps(post))


@app.durable("/counter/{name}")
class Counter(DurableObject):
    namespace = "counter"

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        verb, _, request_id = str(message).partition(" ")
        value: int = await self.storage.get("value", 0)
        if verb == "inc":
            value += 1
            await self.storage.put("value", value)
        await conn.send(f"{request_id} {value}")
