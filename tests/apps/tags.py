"""An app for tests of live tags: a room whose connections change their own tags, list
the room by tag and broadcast to a tag, each in one message."""

from __future__ import annotations

import json

from wsgate import (
    Accept,
    App,
    Connection,
    ConnectRequest,
    DurableObject,
    LimitExceeded,
    NoConnectionState,
    Reject,
)

app = App()


def _listed(text: str) -> list[str]:
    return [tag for tag in text.split(",") if tag]


@app.durable("/tags/{room}")
class Room(DurableObject):
    """Text commands, each answered in one frame:

    - ``add a,b`` / ``remove a,b`` / ``set a,b`` (``set`` alone: no tags): ``tags [...]``,
      the tags after the change; a change over the limits: ``refused <error class>``;
    - ``tags``: ``tags [...]``;
    - ``who <tag>``: ``who [[id, [tags]], ...]``, the room's connections with the tag;
    - ``me``: ``me <connection id>``;
    - ``send <tag> <n>``: broadcasts ``b <n>`` to the tag, answers ``sent <n> <recipients>``;
    - ``add-then-send <tag> <n>``: adds the tag, then broadcasts to it in the same turn.
    """

    async def on_connect(self, conn: Connection, request: ConnectRequest) -> Accept | Reject:
        if "peek" in request.query:  # not accepted yet: no tags to read
            try:
                _ = conn.tags
            except NoConnectionState as exc:
                return Reject(409, type(exc).__name__)
        return Accept(tags=_listed(request.query.get("tags", "")))

    async def on_message(self, conn: Connection, message: str | bytes) -> None:
        assert isinstance(message, str)
        verb, _, rest = message.partition(" ")
        try:
            if verb == "add":
                conn.add_tags(*_listed(rest))
            elif verb == "remove":
                conn.remove_tags(*_listed(rest))
            elif verb == "set":
                conn.tags = _listed(rest)
            elif verb == "set-one-string":
                conn.tags = rest  # type: ignore[assignment]
        except (LimitExceeded, TypeError) as exc:
            await conn.send(f"refused {type(exc).__name__}")
            return
        if verb in ("add", "remove", "set", "tags"):
            await conn.send(f"tags {json.dumps(list(conn.tags))}")
        elif verb == "who":
            found = await self.connections(tag=rest)
            await conn.send(f"who {json.dumps([[peer.id, list(peer.tags)] for peer in found])}")
        elif verb == "me":
            await conn.send(f"me {conn.id}")
        elif verb in ("send", "add-then-send"):
            tag, n = rest.split(" ")
            if verb == "add-then-send":
                conn.add_tags(tag)
            result = await self.broadcast(f"b {n}", tag=tag)
            await conn.send(f"sent {n} {result.recipients}")
