"""An app for tests of durable objects' activations: the naive counter from Cloudflare's
docs and objects that show one behaviour each. Replies that name the worker carry its pid.
"""

from __future__ import annotations

import asyncio
import os

from worker import App, Connection, DurableObject

app = App()


@app.durable("/naive/{name}")
class Naive(DurableObject):
    """Cloudflare's counter as a Worker author writes it: get, then put, no transaction."""

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        if message == "read":
            await conn.send(str(await self.storage.get("count", 0)))
            return
        value = (await self.storage.get("count", 0)) + 1
        await self.storage.put("count", value)
        await conn.send(str(value))


@app.durable("/where/{name}")
class Where(DurableObject):
    """Answers with the pid of the worker that holds the object."""

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        if message == "hang":
            await asyncio.Event().wait()
        await conn.send(f"{os.getpid()}|{message!s}")
