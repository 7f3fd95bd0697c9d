"""An app for tests of durable objects' activations: the naive counter from Cloudflare's
docs, and objects that show one behaviour each."""

from __future__ import annotations

import asyncio
import os
import time

from wsgate import App, Connection, DurableObject, StateError

app = App()


@app.durable("/naive/{name}")
class Naive(DurableObject):
    """Cloudflare's counter as a Worker author writes it: get, then put, no transaction.
    "read" answers the value without changing it; "alarm" sets the alarm to now (its turn
    increments too) and answers "alarm", "alarm-in <ms>" that far ahead; "alarm?" answers
    whether an alarm is set ("set" or "none"); anything else increments it."""

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        if message == "read":
            await conn.send(str(await self.storage.get("count", 0)))
            return
        if message == "alarm":
            await self.alarm.set(time.time())
            await conn.send("alarm")
            return
        if isinstance(message, str) and message.startswith("alarm-in "):
            await self.alarm.set(time.time() + int(message.split(" ")[1]) / 1000)
            await conn.send("alarm")
            return
        if message == "alarm?":
            await conn.send("none" if await self.alarm.get() is None else "set")
            return
        value = (await self.storage.get("count", 0)) + 1
        await self.storage.put("count", value)
        await conn.send(str(value))

    async def on_alarm(self) -> None:
        # A turn like any other: it never interleaves with the increments.
        value = (await self.storage.get("count", 0)) + 1
        await self.storage.put("count", value)


@app.durable("/tagged/{name}")
class Tagged(DurableObject):
    """The naive counter, answering "<value>|<pid of the worker that ran the turn>"."""

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        value = (await self.storage.get("count", 0)) + 1
        await self.storage.put("count", value)
        await conn.send(f"{value}|{os.getpid()}")


@app.durable("/slow/{name}")
class Slow(DurableObject):
    """Increments, then takes 2 s before answering: a turn that can be cut before it ends."""

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        value = (await self.storage.get("count", 0)) + 1
        await self.storage.put("count", value)
        await asyncio.sleep(2)
        await conn.send(str(value))


@app.durable("/where/{name}")
class Where(DurableObject):
    """Answers "<pid>|<message>"; "hang" never answers (the turn limit cancels it)."""

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        if message == "hang":
            await asyncio.Event().wait()
        await conn.send(f"{os.getpid()}|{message!s}")


@app.durable("/store/{name}")
class Store(DurableObject):
    """Storage as a turn sees it. Commands (text, space-separated):

    - ``put <key> <value>``: put, then answer what a get of the key now says;
    - ``get <key>``: the value (or "-");
    - ``put-list <prefix> <key>...``: put each key (value 1), then answer the keys a list
      of the prefix shows, comma-separated;
    - ``delete-list <prefix> <key>``: delete the key, then answer the list of the prefix;
    - ``clear``: delete every key; answer how many there were;
    - ``big <bytes>``: put a value of that many bytes; answer "stored" or the error's type;
    - ``alarm-in <ms>``: set the alarm that far ahead; on_alarm stores ``alarm-ran``.
    """

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        assert isinstance(message, str)
        verb, *args = message.split(" ")
        if verb == "put":
            await self.storage.put(args[0], args[1])
            await conn.send(str(await self.storage.get(args[0])))
        elif verb == "get":
            await conn.send(str(await self.storage.get(args[0], "-")))
        elif verb == "put-list":
            for key in args[1:]:
                self.storage.put(key, 1)  # not awaited: applied at once all the same
            await conn.send(",".join(await self.storage.list(prefix=args[0])))
        elif verb == "delete-list":
            existed = await self.storage.delete(args[1])
            listed = ",".join(await self.storage.list(prefix=args[0]))
            await conn.send(f"{existed}:{listed}")
        elif verb == "clear":
            await conn.send(str(await self.storage.delete_all()))
        elif verb == "big":
            try:
                await self.storage.put("big", "x" * int(args[0]))
            except StateError as exc:
                await conn.send(type(exc).__name__)
            else:
                await conn.send("stored")
        elif verb == "alarm-in":
            await self.alarm.set(time.time() + int(args[0]) / 1000)
            await conn.send("set")

    async def on_alarm(self) -> None:
        await self.storage.put("alarm-ran", True)
