"""An app for membership tests: rooms whose members are kept by the state service.

``/room/{room}?tags=a,b&name=N&also=other``: on connect, the connection is accepted into
room ``{room}`` with those tags and the attachment ``{"name": N}`` (and, tagless, into each
``also`` room), then gets ``joined <id>``. Its messages are commands:

- ``all <text>``: broadcast to the room; ``tag <tag> <text>``: to members with the tag;
  ``others <text>``: to every member but the sender; ``bytes <text>``: as a binary frame.
  The sender then gets ``sent <recipients> <commands>``.
- ``who [tag]``: the sender gets ``members <json list of [id, tags, attachment]>``.
- ``rename <name>``: replaces the sender's attachment; ``me``: ``me <json attachment>``.
- ``leave``: the sender leaves the room (``left true|false``).

``/big``: accepted into ("big", "all") with nothing sent; any message broadcasts
``boom`` to every member and answers ``sent <recipients> <commands>``.
"""

from __future__ import annotations

import json

from wsgate import App, Connection, ConnectRequest

app = App()

room = app.route("/room/{room}")


@room.on_connect
async def room_connect(conn: Connection, request: ConnectRequest) -> None:
    tags = [t for t in request.query.get("tags", "").split(",") if t]
    for other in request.query.getall("also", []):
        await conn.env.members("room", other).accept(conn)
    members = conn.env.members("room", conn.params["room"])
    await members.accept(conn, tags=tags, attachment={"name": request.query.get("name", "")})
    await conn.send(f"joined {conn.id}")


@room.on_message
async def room_message(conn: Connection, message: str | bytes) -> None:
    text = message if isinstance(message, str) else message.decode()
    members = conn.env.members("room", conn.params["room"])
    verb, _, rest = text.partition(" ")
    if verb in ("all", "tag", "others", "bytes"):
        if verb == "all":
            result = await members.broadcast(rest)
        elif verb == "tag":
            tag, _, body = rest.partition(" ")
            result = await members.broadcast(body, tag=tag)
        elif verb == "others":
            result = await members.broadcast(rest, exclude=[conn])
        else:
            result = await members.broadcast(rest.encode())
        await conn.send(f"sent {result.recipients} {result.commands}")
    elif verb == "who":
        listed = await members.connections(tag=rest or None)
        await conn.send(
            "members " + json.dumps([[m.id, list(m.tags), m.attachment] for m in listed])
        )
    elif verb == "rename":
        await members.set_attachment(conn, {"name": rest})
        await conn.send("renamed")
    elif verb == "me":
        await conn.send("me " + json.dumps(await members.attachment(conn)))
    elif verb == "leave":
        await conn.send(f"left {str(await members.leave(conn)).lower()}")
    else:
        await conn.send(f"unknown {text}")


big = app.route("/big")


@big.on_connect
async def big_connect(conn: Connection, request: ConnectRequest) -> None:
    await conn.env.members("big", "all").accept(conn)


@big.on_message
async def big_message(conn: Connection, message: str | bytes) -> None:
    result = await conn.env.members("big", "all").broadcast("boom")
    await conn.send(f"sent {result.recipients} {result.commands}")
