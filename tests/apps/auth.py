"""An app for tests of authentication at connect: a verifier from ``WSGATE_JWT_*``
(tests/tokens.py), declared on routes (function and durable object) and called from
``on_connect``. Each route's first message is the claims its handler saw, as JSON."""

from __future__ import annotations

import json

from wsgate import Accept, App, Connection, ConnectRequest, DurableObject, JWTVerifier

verifier = JWTVerifier.from_env(query_param="token")
app = App()

declared = app.route("/declared", auth=verifier)


@declared.on_connect
async def declared_connect(conn: Connection, request: ConnectRequest) -> None:
    await conn.send(json.dumps(dict(request.claims)))


@declared.on_message
async def echo(conn: Connection, message: str | bytes) -> None:
    await conn.send(message)


called = app.route("/called")


@called.on_connect
async def called_connect(conn: Connection, request: ConnectRequest) -> None:
    claims = verifier.verify(request)  # an Unauthorized left to the SDK: the 401
    await conn.send(json.dumps(claims))


@app.durable("/room/{name}", auth=verifier)
class Room(DurableObject):
    """Keeps the subject in the attachment: later events see it without the token."""

    async def on_connect(self, conn: Connection, request: ConnectRequest) -> Accept:
        await conn.send(json.dumps(dict(request.claims)))
        return Accept(state={"sub": request.claims["sub"]})

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        await conn.send(f"{conn.state['sub']}: {message}")


@app.durable("/called-room/{name}")
class CalledRoom(DurableObject):
    async def on_connect(self, conn: Connection, request: ConnectRequest) -> Accept:
        claims = verifier.verify(request)
        await conn.send(json.dumps(claims))
        return Accept(state={"sub": claims["sub"]})
