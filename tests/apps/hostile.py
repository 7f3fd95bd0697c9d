"""The app of the hostile-input suite (tests/integration/test_hostile_input.py): one of each
kind of thing a worker subscribes for, so that every subject a worker can listen on exists.

- ``/echo``: a function route; every message comes back as it came.
- ``/counter/{name}``: a durable object counting ``"increment"`` messages (connecting adds
  one too), answering each with the new value as text; its storage holds ``value``.
- ``/whoami``: ``/echo`` that also sends the connection its own id when it opens.
- ``/held``: a function route whose ``on_connect`` answers only after :data:`HOLD_S`
  (409), so that the test's own answer to the gateway's connect request, sent at once,
  is the one the gateway takes (its reply inbox is what is tested).
- an alarm handler for the namespace ``tick`` (doing nothing), so that the worker takes
  alarm events on ``<prefix>.alarm.tick`` and on its own alarm subject.
"""

from __future__ import annotations

import asyncio

from wsgate import AlarmInfo, App, Connection, ConnectRequest, DurableObject, Reject

app = App()

#: How long ``/held`` takes to answer a connect request.
HOLD_S = 1.0

echo = app.route("/echo")


@echo.on_message
async def echo_message(conn: Connection, message: str | bytes) -> None:
    await conn.send(message)


whoami = app.route("/whoami")


@whoami.on_connect
async def tell_id(conn: Connection, request: ConnectRequest) -> None:
    await conn.send(conn.id)


whoami.on_message(echo_message)


held = app.route("/held")


@held.on_connect
async def hold(conn: Connection, request: ConnectRequest) -> Reject:
    await asyncio.sleep(HOLD_S)
    return Reject(409, "held")


@app.durable("/counter/{name}")
class Counter(DurableObject):
    """A counter: ``get`` then ``put``, exact because the object's turns run one at a time."""

    namespace = "counter"

    async def on_connect(self, conn: Connection, request: ConnectRequest) -> None:
        await conn.send(str(await self.increment()))

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        if message == "increment":
            await conn.send(str(await self.increment()))

    async def increment(self) -> int:
        value: int = await self.storage.get("value", 0) + 1
        await self.storage.put("value", value)
        return value


@app.on_alarm("tick")
async def tick(alarm: AlarmInfo) -> None:
    """Nothing to do: the alarm's subjects are what matters."""
