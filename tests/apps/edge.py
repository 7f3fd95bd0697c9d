"""An app for the gateway's edge tests: it tells each client the address the app saw."""

from __future__ import annotations

from wsgate import Accept, App, Connection, ConnectRequest

app = App()

peer = app.route("/peer")


@peer.on_connect
async def peer_connect(conn: Connection, request: ConnectRequest) -> Accept:
    await conn.send(request.remote_address)
    return Accept()


@peer.on_message
async def peer_message(conn: Connection, message: str | bytes) -> None:
    await conn.send(message)
