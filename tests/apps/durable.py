"""An app for tests of durable objects through the whole path (gateway, NATS, workers,
state service). Replies carry the worker's pid: ``"<pid>|<text>"``."""

from __future__ import annotations

import asyncio
import os

from wsgate import App, Connection, Transaction

app = App()


async def increment(txn: Transaction) -> int:
    value: int = await txn.get("n", 0) + 1
    txn.put("n", value)
    return value


# "inc": one atomic increment, answered with the new value. "inc-then-hang": the same, but
# the first delivery never finishes (it stands for a worker that dies after its commit and
# before its ack); only a redelivery answers.
count = app.route("/count/{name}")


@count.on_message
async def count_message(conn: Connection, message: str | bytes) -> None:
    storage = conn.env.storage("counter", conn.params["name"])
    value = await storage.transaction(increment)
    if message == "inc-then-hang" and not conn.redelivered:
        await asyncio.Event().wait()
    flag = "r" if conn.redelivered else "-"
    await conn.send(f"{os.getpid()}|{flag}|{value}")


# Sends "saw <message>" first, then starts storing the message without awaiting the write:
# only the output gate keeps the frame from leaving before the value is durable.
gated = app.route("/gated/{name}")


@gated.on_message
async def gated_message(conn: Connection, message: str | bytes) -> None:
    await conn.send(f"{os.getpid()}|saw {message!s}")
    conn.env.storage("gated", conn.params["name"]).put("last", message)
