"""The example app ``wsgate dev`` serves by default.

Routes:

- ``/echo``: every message comes back as it came, text as text, binary as binary.
- ``/private/echo?token=...``: the same, but the upgrade is refused with 401 unless the
  token matches ``WSGATE_DEMO_TOKEN`` (default ``let-me-in``): a connect handler that
  refuses, as a Worker returns ``new Response("...", {status: 401})``.
- ``/counter/{name}``: a durable counter shared by every connection to the same name.
  Opening a connection adds one and sends the new value; the message ``"increment"`` adds
  one more, any other message reads it. Values are JSON: ``{"counter": name, "value": n}``.
"""

from __future__ import annotations

import json
import os

from worker import Accept, App, Connection, ConnectRequest, Reject, Transaction

app = App()

echo = app.route("/echo")


@echo.on_message
async def echo_message(conn: Connection, message: str | bytes) -> None:
    await conn.send(message)


private_echo = app.route("/private/echo")


@private_echo.on_connect
async def check_token(conn: Connection, request: ConnectRequest) -> Accept | Reject:
    expected = os.environ.get("WSGATE_DEMO_TOKEN", "let-me-in")
    if request.query.get("token") != expected:
        return Reject(401, "Missing or wrong token", headers={"WWW-Authenticate": "Bearer"})
    return Accept()


private_echo.on_message(echo_message)


counter = app.route("/counter/{name}")


async def _add_one(conn: Connection) -> int:
    # One atomic read-modify-write: racing increments from any number of connections (on
    # any workers) are applied one after the other, none lost. A redelivered event's
    # transaction is recognised by its idempotency key and not applied twice.
    storage = conn.env.storage("counter", conn.params["name"])
    return await storage.transaction(_increment)


async def _increment(txn: Transaction) -> int:
    value = int(await txn.get("value", 0)) + 1
    txn.put("value", value)
    return value


async def _report(conn: Connection, value: int) -> None:
    await conn.send(json.dumps({"counter": conn.params["name"], "value": value}))


@counter.on_connect
async def counter_connect(conn: Connection, request: ConnectRequest) -> None:
    await _report(conn, await _add_one(conn))


@counter.on_message
async def counter_message(conn: Connection, message: str | bytes) -> None:
    if message == "increment":
        value = await _add_one(conn)
    else:
        storage = conn.env.storage("counter", conn.params["name"])
        value = int(await storage.get("value", 0))
    await _report(conn, value)
