"""An app for tests of the durable object SDK: state, peers, alarms and misuse."""

from __future__ import annotations

import json
from typing import Any

from wsgate import Accept, App, Connection, ConnectRequest, DurableObject, Reject

app = App()


@app.durable("/room/{room}")
class Room(DurableObject):
    """Commands: "state" (reply with conn.state), "set <json>" (replace it), "peers <tag>"
    (reply with the ids of members with the tag), "poke" (send "poked" to every other
    member through Peer.send), "alarm <ms>" (set the alarm that many ms ahead)."""

    async def on_connect(self, conn: Connection, request: ConnectRequest) -> Accept | Reject:
        if request.query.get("deny"):
            return Reject(403, "denied by the room")
        tags = request.query.getall("tag", [])
        return Accept(tags=tags, state={"joined": conn.id})

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        assert isinstance(message, str)
        verb, _, rest = message.partition(" ")
        if verb == "state":
            await conn.send(json.dumps(conn.state))
        elif verb == "set":
            conn.state = json.loads(rest)
            await conn.send("set")
        elif verb == "peers":
            peers = await self.connections(rest or None)
            await conn.send(json.dumps([peer.id for peer in peers]))
        elif verb == "poke":
            for peer in await self.connections():
                if peer.id != conn.id:
                    await peer.send(f"poked by {conn.id}")
            await conn.send("poked")
        elif verb == "alarm":
            import time

            await self.alarm.set(time.time() + int(rest) / 1000)
            await conn.send("alarm set")

    async def members(self) -> list[str]:
        """A method to call (env.objects("Room").get(name).call("members")): the ids."""
        return [peer.id for peer in await self.connections()]

    async def on_alarm(self) -> None:
        fired: int = await self.storage.get("fired", 0)
        await self.storage.put("fired", fired + 1)
        await self.broadcast(f"alarm {self.name}")


misuse = app.route("/misuse/{kind}")


@misuse.on_connect
async def misuse_connect(conn: Connection, request: ConnectRequest) -> Accept | None:
    if request.params["kind"] == "tags-on-a-function-route":
        return Accept(tags=["x"])
    return None


@misuse.on_message
async def misuse_message(conn: Connection, message: str | bytes) -> None:
    if message == "state":
        value: Any = conn.state  # not a durable object route: NoConnectionState
        await conn.send(repr(value))
    elif message == "unstorable":
        await conn.env.storage("misuse", "x").put("k", object())
    elif message == "too-large":
        await conn.env.storage("misuse", "x").put("k", "x" * 200_000)  # over 128 KiB
    elif message == "closed":
        await conn.close(4000, "bye")
        await conn.send("after close")  # ConnectionClosed
