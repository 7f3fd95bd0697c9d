"""The example app ``wsgate dev`` serves by default.

Routes:

- ``/echo``: every message comes back as it came, text as text, binary as binary.
- ``/private/echo?token=...``: the same, but the upgrade is refused with 401 unless the
  token matches ``WSGATE_DEMO_TOKEN`` (default ``let-me-in``): a connect handler that
  refuses, as a Worker returns ``new Response("...", {status: 401})``. A demo for ``wsgate
  dev``: a real app verifies a signed token, as ``/jwt/echo`` does (the prod overlay of
  deploy/k8s runs your app, never this one).
- ``/jwt/echo``: the same, for a client with a valid JWT (``Authorization: Bearer``,
  the subprotocols ``bearer, <token>``, or ``?token=``); anyone else gets 401 with the
  reason, before any handler runs. Its keys come from the environment
  (``WSGATE_JWT_SECRET``, ``WSGATE_JWT_PUBLIC_KEY`` or ``WSGATE_JWT_JWKS``, and
  ``WSGATE_JWT_AUDIENCE``, ``WSGATE_JWT_ISSUER``...: ``JWTVerifier.from_env``); with none
  set, as out of the box, the route is not served (no secret is built in). The first
  message it sends is ``hello, <sub>``: the verified claims reach the handler.
- ``/chat/{room}?name=...``: a chat room, one durable object per room. Whoever joins gets
  the room's last 100 messages and who is there; everyone hears joins, leaves and
  messages. The browser page at ``/`` (examples/static/index.html) is its client. A
  backend posts a system announcement to a room with a plain request (the room's
  ``on_request``): ``curl -H "Authorization: Bearer $WSGATE_ANNOUNCE_TOKEN" -d 'text'
  http://127.0.0.1:8080/chat/lobby``; off unless the workers have WSGATE_ANNOUNCE_TOKEN.
- ``/counter/{name}``: a durable counter shared by every connection to the same name.
  Opening a connection adds one and sends the new value; the message ``"increment"`` adds
  one more, any other message reads it. Values are JSON: ``{"counter": name, "value": n}``.

Text typed in a command-line client counts as what a browser sends: websocat sends each
line with its ending (``"increment\n"``), wscat without, a browser without; the counter
compares, and the chat keeps, the text without one trailing ``\n`` or ``\r\n``
(``without_line_ending``). The echo sends back exactly what came.

The chat speaks JSON text frames from the server, one event each:
``{"type": "message", "name", "text", "at"}`` (with ``"replay": true`` for history),
``{"type": "announcement", "text", "at"}`` (``"replay"`` too),
``{"type": "join", "name"}``, ``{"type": "leave", "name"}``,
``{"type": "presence", "names": [...]}``; the client sends plain text.
"""

from __future__ import annotations

import hmac
import json
import os
import time

from wsgate import (
    Accept,
    App,
    Connection,
    ConnectRequest,
    DurableObject,
    HttpRequest,
    JWTVerifier,
    Reject,
    Response,
    Value,
)

app = App()


def without_line_ending(message: str | bytes) -> str | bytes:
    """Text without one trailing ``\n`` or ``\r\n``, as a browser would have sent it (a
    line typed in websocat arrives with its ending); binary as it came."""
    if isinstance(message, str) and message.endswith("\n"):
        return message[:-1].removesuffix("\r")
    return message


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


if JWTVerifier.configured():
    # Browsers cannot set headers on a WebSocket: the query parameter is allowed too.
    jwt_echo = app.route("/jwt/echo", auth=JWTVerifier.from_env(query_param="token"))

    @jwt_echo.on_connect
    async def greet(conn: Connection, request: ConnectRequest) -> None:
        sub = request.claims.get("sub")
        await conn.send(f"hello, {sub if isinstance(sub, str) else 'anonymous'}")

    jwt_echo.on_message(echo_message)


#: How many messages a room keeps and replays to whoever joins.
HISTORY = 100
#: Longest name and message the room takes (characters).
MAX_NAME = 32
MAX_TEXT = 1000


def name_of(conn: Connection) -> str:
    """The name a chat connection joined with (kept in its state)."""
    state = conn.state
    return str(state.get("name")) if isinstance(state, dict) else "anonymous"


@app.durable("/chat/{room}")
class ChatRoom(DurableObject):
    """One chat room. Its storage keeps ``history`` (the last 100 messages); its members
    are the connections in the room, tagged with their names (presence by tag)."""

    namespace = "chat"

    async def on_connect(self, conn: Connection, request: ConnectRequest) -> Accept | Reject:
        name = request.query.get("name", "").strip() or "anonymous"
        if len(name) > MAX_NAME:
            return Reject(400, f"name is longer than {MAX_NAME} characters")
        # Sent in on_connect, these arrive first, right after the upgrade completes.
        for message in await self.history():
            await conn.send(json.dumps({**message, "replay": True}))
        # Presence by tag: every member is tagged with its name.
        names = sorted({tag for peer in await self.connections() for tag in peer.tags})
        await conn.send(json.dumps({"type": "presence", "names": names}))
        await self.broadcast(json.dumps({"type": "join", "name": name}))
        return Accept(tags=[name], state={"name": name})

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        message = without_line_ending(message)
        if not isinstance(message, str) or not message.strip():
            return
        event: dict[str, Value] = {
            "type": "message",
            "name": name_of(conn),
            "text": message[:MAX_TEXT],
            "at": int(time.time() * 1000),
        }
        history = await self.history()
        await self.storage.put("history", [*history, event][-HISTORY:])
        await self.broadcast(json.dumps(event))  # leaves once the history is durable

    async def on_close(self, conn: Connection, code: int, reason: str) -> None:
        await self.broadcast(json.dumps({"type": "leave", "name": name_of(conn)}), exclude=[conn])

    async def on_request(self, request: HttpRequest) -> Response:
        """``POST /chat/<room>`` with ``Authorization: Bearer $WSGATE_ANNOUNCE_TOKEN`` and a
        text body: a system announcement to everyone in the room (kept in its history).
        Off (403) unless the workers have WSGATE_ANNOUNCE_TOKEN; a wrong token is 401."""
        if request.method != "POST":
            return Response(405, "POST an announcement\n", {"Allow": "POST"})
        token = os.environ.get("WSGATE_ANNOUNCE_TOKEN", "")
        if not token:
            return Response(403, "Announcements are off: set WSGATE_ANNOUNCE_TOKEN\n")
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return Response(401, "Wrong or missing token\n", {"WWW-Authenticate": "Bearer"})
        text = str(without_line_ending(request.text())).strip()
        if not text:
            return Response(400, "An announcement needs a text body\n")
        event: dict[str, Value] = {
            "type": "announcement",
            "text": text[:MAX_TEXT],
            "at": int(time.time() * 1000),
        }
        history = await self.history()
        await self.storage.put("history", [*history, event][-HISTORY:])
        sent = await self.broadcast(json.dumps(event))  # once the history is durable
        return Response.json({"room": self.name, "recipients": sent.recipients})

    async def history(self) -> list[dict[str, Value]]:
        """The stored messages (storage gives back a Value: check its shape)."""
        stored = await self.storage.get("history", [])
        return [m for m in stored if isinstance(m, dict)] if isinstance(stored, list) else []


@app.durable("/counter/{name}")
class Counter(DurableObject):
    """A counter every connection to the same name shares, written as for Cloudflare: a
    ``get``, then a ``put``. Exact without a transaction: the object's events run one at a
    time in its one activation, so no other increment comes between the two."""

    namespace = "counter"

    async def on_connect(self, conn: Connection, request: ConnectRequest) -> None:
        await self.report(conn, await self.increment())

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        if without_line_ending(message) == "increment":
            value = await self.increment()
        else:
            value = await self.value()
        await self.report(conn, value)

    async def increment(self) -> int:
        value = await self.value() + 1
        await self.storage.put("value", value)  # durable before the report leaves
        return value

    async def value(self) -> int:
        stored = await self.storage.get("value", 0)
        return stored if isinstance(stored, int) else 0

    async def report(self, conn: Connection, value: int) -> None:
        await conn.send(json.dumps({"counter": self.name, "value": value}))
