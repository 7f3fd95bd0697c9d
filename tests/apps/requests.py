"""An app for tests of plain HTTP requests to routes (``on_request``): a function route,
a durable object that answers as a turn, and routes without a request handler."""

from __future__ import annotations

import asyncio
import json

from wsgate import App, Connection, DurableObject, HttpRequest, Response

app = App()

echo = app.route("/echo")


@echo.on_message
async def echo_message(conn: Connection, message: str | bytes) -> None:
    await conn.send(message)  # a WebSocket route without a request handler


info = app.route("/info/{name}")


@info.on_request
async def describe(request: HttpRequest) -> Response:
    """What came, as JSON; ``?status=`` and ``?header=`` shape the answer, ``?fail=1``
    raises, ``?sleep=`` waits, ``?size=`` answers that many bytes, ``?bad=1`` returns no
    Response."""
    if "fail" in request.query:
        raise RuntimeError("asked to fail")
    if "sleep" in request.query:
        await asyncio.sleep(float(request.query["sleep"]))
    if "size" in request.query:
        return Response(200, b"x" * int(request.query["size"]))
    if "bad" in request.query:
        return "not a response"  # type: ignore[return-value]
    described = {
        "method": request.method,
        "path": request.path,
        "params": dict(request.params),
        "query": dict(request.query),
        "body": request.text(),
        "header": request.headers.get("X-Test", ""),
        "remote": bool(request.remote_address),
    }
    return Response.json(
        described,
        status=int(request.query.get("status", "200")),
        headers={"X-Answer": "yes", "Connection": "close", "Content-Length": "1"},
    )


@app.durable("/counter/{name}")
class Counter(DurableObject):
    """A counter reached by WebSockets (any message adds one and answers the value) and by
    plain requests: GET reads, POST adds the body's number, as turns in one order."""

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        value = int(await self.storage.get("count", 0)) + 1  # type: ignore[arg-type]
        await self.storage.put("count", value)
        await conn.send(str(value))

    async def on_request(self, request: HttpRequest) -> Response:
        value = int(await self.storage.get("count", 0))  # type: ignore[arg-type]
        if request.method == "POST":
            value += int(request.text() or "1")
            await self.storage.put("count", value)
            await self.broadcast(json.dumps({"announced": value}))
        if request.method == "DELETE":
            await self.storage.put("count", -1)
            raise ValueError("a write, then a failure")
        return Response(200, str(value), {"X-Object": self.name})


@app.durable("/plain/{name}")
class Plain(DurableObject):
    """A durable object without on_request: its routes answer 400 Expected websocket."""
