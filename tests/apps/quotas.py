"""An app for tests of the state service's quotas, seen from handler code."""

from __future__ import annotations

from wsgate import App, Connection, DurableObject, ObjectQuotaExceeded

app = App()


def _refusal(stored: int, exc: ObjectQuotaExceeded) -> str:
    return f"{stored}|{type(exc).__name__}|{exc.size}|{exc.limit}"


@app.durable("/fill/{name}")
class Filler(DurableObject):
    """Commands: "fill <value chars>" puts keys k0000, k0001, ... until a quota refuses one
    and answers "<keys put>|<exception>|<size>|<limit>"; "overwrite" puts k0000 again
    without reading it first and answers "ok" (or the refusal); "count" answers how many
    keys the object holds; "over <value chars>" puts one key and lets a refusal escape."""

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        assert isinstance(message, str)
        verb, _, arg = message.partition(" ")
        if verb == "fill":
            put = 0
            try:
                while True:
                    await self.storage.put(f"k{put:04}", "v" * int(arg))
                    put += 1
            except ObjectQuotaExceeded as exc:
                await conn.send(_refusal(put, exc))
        elif verb == "overwrite":
            try:
                await self.storage.put("k0000", "w" * 10)
            except ObjectQuotaExceeded as exc:
                await conn.send(_refusal(0, exc))
            else:
                await conn.send("ok")
        elif verb == "count":
            await conn.send(str(len(await self.storage.list())))
        elif verb == "over":
            await conn.send("sent before the refusal")
            await self.storage.put("over", "v" * int(arg))


remote = app.route("/remote/{name}")


@remote.on_message
async def remote_fill(conn: Connection, message: str | bytes) -> None:
    """Puts keys into the object ``remote/<name>`` through the state service (no
    activation) until a quota refuses one; answers as Filler's "fill"."""
    storage = conn.env.storage("remote", conn.params["name"])
    put = 0
    try:
        while True:
            await storage.put(f"k{put:04}", "v" * int(message))
            put += 1
    except ObjectQuotaExceeded as exc:
        await conn.send(_refusal(put, exc))
