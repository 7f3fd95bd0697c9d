"""An app for tests: each route exercises one part of the event path."""

from __future__ import annotations

import asyncio
import os

from wsgate import Accept, App, Connection, ConnectRequest

app = App()

# Echo tagged with the worker's pid and the redelivery flag: "<pid>|<r or ->|<message>".
tagged = app.route("/tagged")


@tagged.on_message
async def tagged_message(conn: Connection, message: str | bytes) -> None:
    text = message if isinstance(message, str) else message.decode()
    await asyncio.sleep(0.002)  # stands for a handler's work, so events overlap a kill
    await conn.send(f"{os.getpid()}|{'r' if conn.redelivered else '-'}|{text}")


# Commands: "close <code> <reason>", "flood <count> <size>", "sleep <seconds>", "boom".
control = app.route("/control")


@control.on_connect
async def control_connect(conn: Connection, request: ConnectRequest) -> Accept:
    chosen = "b.v1" if "b.v1" in request.subprotocols else None
    await conn.send(f"id {conn.id}")
    return Accept(subprotocol=chosen)


@control.on_message
async def control_message(conn: Connection, message: str | bytes) -> None:
    if isinstance(message, bytes):
        await conn.send(message)
        return
    verb, _, rest = message.partition(" ")
    if verb == "close":
        code, _, reason = rest.partition(" ")
        await conn.close(int(code), reason)
    elif verb == "flood":
        count, size = (int(x) for x in rest.split())
        for i in range(count):
            await conn.send(bytes([i % 256]) * size)
    elif verb == "sleep":
        await asyncio.sleep(float(rest))
        await conn.send(f"slept {rest} redelivered={conn.redelivered}")
    elif verb == "boom":
        raise RuntimeError("boom, as asked")
    else:
        await conn.send(message)


@control.on_close
async def control_close(conn: Connection, code: int, reason: str) -> None:
    record = conn.env.storage("closes", conn.id)
    calls = int(await record.get("calls", 0)) + 1
    await record.put("calls", calls)
    await record.put("close", {"code": code, "reason": reason, "redelivered": conn.redelivered})


# A room: every message goes to every member ("<sender seq>" kept as sent).
relay = app.route("/relay/{room}")


@relay.on_connect
async def relay_connect(conn: Connection, request: ConnectRequest) -> None:
    await conn.env.storage("room", conn.params["room"]).put(conn.id, True)
    await conn.send(f"joined {conn.id}")


@relay.on_message
async def relay_message(conn: Connection, message: str | bytes) -> None:
    members = await conn.env.storage("room", conn.params["room"]).list()
    await asyncio.sleep(0.002)  # stands for a handler's work, so events overlap a kill
    await conn.env.send_many(members, message)


@relay.on_close
async def relay_close(conn: Connection, code: int, reason: str) -> None:
    await conn.env.storage("room", conn.params["room"]).delete(conn.id)
