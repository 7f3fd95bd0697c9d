"""An app for tests of calls of durable objects' methods (RPC): a naive counter whose
methods are called from outside, from a function route, and from other objects."""

from __future__ import annotations

import asyncio
import time

from wsgate import App, CallError, Connection, DurableObject, Value

app = App()


@app.durable("/counter/{name}")
class Counter(DurableObject):
    """Cloudflare's naive counter (get, then put), reached by calls and by connections."""

    async def add(self, n: int = 1) -> int:
        value = int(await self.storage.get("count", 0)) + n  # type: ignore[arg-type]
        await self.storage.put("count", value)
        return value

    async def read(self) -> Value:
        return await self.storage.get("count", 0)

    def echo(self, *args: Value, **kwargs: Value) -> Value:
        """A plain (not async) method: its arguments back."""
        return {"args": list(args), "kwargs": kwargs}

    async def fail(self, text: str) -> None:
        """Writes, then raises: the write stays (as a handler's), the caller gets CallFailed."""
        await self.storage.put("before_failure", text)
        raise ValueError(text)

    async def blob(self, size: int) -> bytes:
        return b"x" * size

    async def nothing(self, blob: bytes) -> int:
        return len(blob)

    async def sleep(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "slept"

    async def shout(self, text: str) -> int:
        """Broadcasts to the object's connections (released once the turn committed)."""
        result = await self.broadcast(f"shout: {text}")
        return result.commands

    async def call(self, namespace: str, name: str, method: str, *args: Value) -> Value:
        """Calls another object's method from this object's turn."""
        return await self.env.objects(namespace).get(name).call(method, *args)

    async def call_at_alarm(self, target: str) -> None:
        """Sets the alarm to now; its turn calls ``add(10)`` on Counter ``target``."""
        await self.storage.put("alarm_target", target)
        await self.alarm.set(time.time())

    async def on_alarm(self) -> None:
        target = await self.storage.get("alarm_target")
        if isinstance(target, str):
            await self.env.objects("Counter").get(target).call("add", 10)

    def _private(self) -> str:
        return "never callable"

    not_a_method = 5

    async def on_connect(self, conn: Connection, request: object) -> None:
        return None

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        """ "add" adds one (a turn like a call's, in the same order); anything else reads."""
        if message == "add":
            await conn.send(str(await self.add()))
        else:
            await conn.send(str(await self.read()))


@app.durable("/relay/{name}")
class Relay(DurableObject):
    """Calls onwards: ``relay(chain)`` calls the first object of ``chain`` with the rest."""

    async def relay(self, chain: list[list[str]]) -> Value:
        if not chain:
            return f"end at {self.name}"
        (namespace, name), rest = chain[0], chain[1:]
        return await self.env.objects(namespace).get(name).call("relay", rest)

    async def relay_catching(self, chain: list[list[str]]) -> Value:
        """relay(), answering the name of a CallError's class instead of raising it."""
        try:
            return await self.relay(chain)
        except CallError as exc:
            return type(exc).__name__


caller = app.route("/call/{name}")


@caller.on_message
async def call_counter(conn: Connection, message: str | bytes) -> None:
    """A function route: each message adds its length to counter ``{name}``; the answer
    is the counter's new value."""
    value = await conn.env.objects("Counter").get(conn.params["name"]).call("add", len(message))
    await conn.send(str(value))
