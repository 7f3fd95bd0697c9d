"""Connections accepted into a durable object: the hibernation API, as handlers use it.

::

    room = conn.env.members("room", conn.params["room"])
    await room.accept(conn, tags=["admin"], attachment={"name": "ada"})
    for member in await room.connections(tag="admin"):
        print(member.id, member.attachment)
    await room.broadcast("hello", exclude=[conn.id])

Membership lives in the state service, so every worker sees the same members. A
connection leaves every object when it closes: the worker calls :func:`leave_all` when
it handles the close event (after the app's close handler), and the state service
removes the members of a gateway that died (its lease ran out). ``connections()`` lists
open connections only.

Limits, refused by the state service with typed errors carrying the numbers: at most 10
tags a connection (TooManyTags), each 1 to 256 characters (TagTooLarge), an attachment of
at most 16 KiB encoded (AttachmentTooLarge); an attachment is what :mod:`wsgate.values`
stores (InvalidValue, before any call, otherwise). Every method may raise
StateUnavailable or StateTimeout; an id that is not a connection id raises
InvalidConnectionId before any call.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wsgate import ids
from wsgate.v1 import state_pb2 as pb
from wsgate.values import StorableValue, Value, decode_optional, decode_value, encode_optional
from wsgate.worker.connection import current_connection
from wsgate.worker.gate import open_current_gate
from wsgate.worker.messages import message_envelope

if TYPE_CHECKING:
    from wsgate.worker.connection import Connection
    from wsgate.worker.state_client import StateClient


@dataclass(frozen=True)
class Member:
    """One connection accepted into an object."""

    #: The connection id (``conn.id``).
    id: str
    #: Its tags, in the order given to :meth:`ObjectMembers.accept` (duplicates dropped).
    tags: tuple[str, ...]
    #: Its attachment (None if it has none).
    attachment: Value


@dataclass(frozen=True)
class BroadcastResult:
    """What a broadcast did."""

    #: Connections it was addressed to.
    recipients: int
    #: Gateway commands that carried it: one per gateway holding recipients.
    commands: int


def _connection_id(conn_or_id: Connection | str) -> str:
    """The id of a connection handle, or the id itself, checked (InvalidConnectionId)."""
    connection_id = conn_or_id if isinstance(conn_or_id, str) else conn_or_id.id
    ids.gateway_of(connection_id)
    return connection_id


class ObjectMembers:
    """The connections accepted into one durable object (``env.members(namespace, name)``).

    Cheap to make (no call until a method is used). Writes are durable when they return.
    """

    def __init__(self, state: StateClient, namespace: str, name: str) -> None:
        self._state = state
        self.namespace = namespace
        self.name = name
        self._object = pb.ObjectId(namespace=namespace, name=name)

    def __repr__(self) -> str:
        return f"<ObjectMembers {self.namespace!r}/{self.name!r}>"

    async def accept(
        self,
        conn_or_id: Connection | str,
        *,
        tags: Iterable[str] = (),
        attachment: StorableValue = None,
    ) -> None:
        """Accept a connection into this object with ``tags`` and ``attachment``; if it
        is a member already, its tags and attachment are replaced. Accepting a connection
        that has already closed does nothing.

        Raises TypeError if ``tags`` is a single str (a common slip for ``[tag]``).
        """
        if isinstance(tags, str):
            raise TypeError("tags must be an iterable of str, not one str; use tags=[tag]")
        request = pb.JoinRequest(
            object=self._object,
            connection_id=_connection_id(conn_or_id),
            tags=list(tags),
            attachment=encode_optional(attachment),
        )
        await self._state.membership.join(request)

    async def leave(self, conn_or_id: Connection | str) -> bool:
        """Remove a connection from this object; returns whether it was a member."""
        request = pb.LeaveRequest(object=self._object, connection_id=_connection_id(conn_or_id))
        response = await self._state.membership.leave(request)
        return bool(response.left)

    async def connections(self, tag: str | None = None) -> list[Member]:
        """The open connections of this object (only those with ``tag``, if given), in
        connection id order, with their tags and attachments.

        Read a page at a time (1,000 members) until the end; a member that joins or leaves
        meanwhile may or may not be listed.
        """
        members: list[Member] = []
        after = ""
        while True:
            request = pb.MembersRequest(object=self._object, after=after, details=True)
            if tag is not None:
                request.tag = tag
            page = await self._state.membership.members(request)
            for member in page.members:
                members.append(
                    Member(
                        id=member.connection_id,
                        tags=tuple(member.tags),
                        attachment=decode_optional(member.attachment),
                    )
                )
            if not page.more or not page.members:
                return members
            after = page.members[-1].connection_id

    async def attachment(self, conn_or_id: Connection | str, default: Value = None) -> Value:
        """A member's attachment; ``default`` if it is not a member or has none."""
        request = pb.GetAttachmentRequest(
            object=self._object, connection_id=_connection_id(conn_or_id)
        )
        response = await self._state.membership.get_attachment(request)
        if not response.member or not response.attachment:
            return default
        return decode_value(response.attachment)

    async def set_attachment(self, conn_or_id: Connection | str, value: StorableValue) -> bool:
        """Replace a member's attachment (None removes it); returns whether the connection
        is a member (nothing is stored for a non-member)."""
        request = pb.SetAttachmentRequest(
            object=self._object,
            connection_id=_connection_id(conn_or_id),
            attachment=encode_optional(value),
        )
        response = await self._state.membership.set_attachment(request)
        return bool(response.member)

    async def broadcast(
        self,
        message: str | bytes | bytearray | memoryview,
        *,
        tag: str | None = None,
        exclude: Iterable[Connection | str] = (),
    ) -> BroadcastResult:
        """Send ``message`` (str: a text frame, bytes-like: binary) to every member (with
        ``tag``, if given) except those in ``exclude``.

        The state service publishes one command per gateway holding recipients. Like every
        output, it leaves only once the handler's storage writes are durable (the output
        gate); what the running handler sent to its own connection before goes first.
        Raises InvalidMessage for a message that is neither str nor bytes-like.
        """
        request = pb.BroadcastRequest(
            object=self._object,
            message=message_envelope(message, "broadcast()"),
            exclude=[c if isinstance(c, str) else c.id for c in exclude],
        )
        if tag is not None:
            request.tag = tag
        await open_current_gate()
        sender = current_connection.get()
        if sender is not None:
            # What the running handler sent to its own connection goes first.
            await sender.flush()
        response = await self._state.membership.broadcast(request)
        return BroadcastResult(recipients=response.recipients, commands=response.commands)


async def leave_all(state: StateClient, connection_id: str) -> int:
    """Remove ``connection_id`` from every object (it closed); returns how many objects it
    left. The worker calls this for each close event, after the app's close handler and
    before the ack: if it raises, the event is not acknowledged and comes again."""
    response = await state.membership.leave_all(pb.LeaveAllRequest(connection_id=connection_id))
    return int(response.left)
