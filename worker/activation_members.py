"""A durable object's connections inside its activation: the hibernation API.

Membership stays in the state service, the one place that also sees connections leave
when their gateway dies (its lease sweeps). The activation adds what it changed itself and
has not seen committed yet, so a turn sees its own joins, leaves and ``conn.state`` at once:

- a join (``Accept(tags=, state=)``), a leave (after ``on_close``) and an attachment change
  (``conn.state = ...``) join the turn's effects and are committed with it;
- ``connections(tag)`` lists the members from the state service, corrected by those
  uncommitted changes;
- ``broadcast(message, tag=, exclude=)`` asks the state service for the recipients by
  gateway (corrected the same way) and adds one command per gateway to the turn's output:
  it leaves with the turn's other output, in order, once the turn has committed;
- ``conn.state`` comes from memory: the attachment is read once per connection and
  activation, then kept (only the object's own turns change it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from wsgate import ids
from wsgate.fanout import plan
from wsgate.limits import check_attachment_size, check_tags
from wsgate.v1 import state_pb2 as pb
from wsgate.values import StorableValue, Value, decode_optional, encode_optional
from wsgate.worker import state_methods as methods
from wsgate.worker.connection import Connection
from wsgate.worker.membership import BroadcastResult, Member
from wsgate.worker.messages import message_envelope

if TYPE_CHECKING:
    from wsgate.worker.activation import Activation
    from wsgate.worker.turn import Turn


def _encode_attachment(value: StorableValue) -> bytes:
    encoded = encode_optional(value)
    check_attachment_size(encoded)
    return encoded


class ActivationMembers:
    """The members of one activation's object (see the module docstring)."""

    def __init__(self, activation: Activation) -> None:
        self._activation = activation
        #: Attachments known (encoded; b"" is null): read once, or set by this activation.
        self._attachments: dict[str, bytes] = {}
        #: Changes of turns not yet committed: connection id -> (turn number, change).
        self._pending: dict[str, tuple[int, pb.MemberChange]] = {}

    # -- changes, made by turns ----------------------------------------------------------

    def join(
        self, turn: Turn, connection_id: str, tags: Iterable[str], state: StorableValue
    ) -> None:
        """Accept a connection into the object with ``tags`` and attachment ``state``."""
        tags = list(dict.fromkeys(tags))
        check_tags(tags)
        attachment = _encode_attachment(state)
        change = pb.MemberChange(
            connection_id=connection_id, join=pb.MemberJoin(tags=tags, attachment=attachment)
        )
        turn.member(change)
        self._activation.quota.joined(turn.number)
        self._pending[connection_id] = (turn.number, change)
        self._attachments[connection_id] = attachment

    def set_attachment(self, turn: Turn, connection_id: str, value: StorableValue) -> None:
        """Replace a member's attachment (``conn.state = value``)."""
        attachment = _encode_attachment(value)
        change = pb.MemberChange(connection_id=connection_id, attachment=attachment)
        turn.member(change)
        previous = self._pending.get(connection_id)
        if previous is not None and previous[1].WhichOneof("change") == "join":
            # Still a join as far as listings go, with the new attachment.
            joined = pb.MemberChange()
            joined.CopyFrom(previous[1])
            joined.join.attachment = attachment
            change = joined
        self._pending[connection_id] = (turn.number, change)
        self._attachments[connection_id] = attachment

    def leave(self, turn: Turn, connection_id: str) -> None:
        """The connection closed: it leaves the object."""
        change = pb.MemberChange(connection_id=connection_id, leave=pb.MemberLeave())
        turn.member(change)
        self._activation.quota.left(turn.number)
        self._pending[connection_id] = (turn.number, change)
        self._attachments.pop(connection_id, None)

    def committed(self, through: int) -> None:
        """Turns up to number ``through`` are committed: the state service now shows their
        changes, which need no correcting any more."""
        done = [cid for cid, (number, _) in self._pending.items() if number <= through]
        for connection_id in done:
            del self._pending[connection_id]

    # -- reads ---------------------------------------------------------------------------

    async def load_attachment(self, connection_id: str) -> None:
        """Make ``conn.state`` of ``connection_id`` known (one call, the first time)."""
        if connection_id in self._attachments or connection_id in self._pending:
            return
        request = pb.GetAttachmentRequest(
            object=self._activation.object_pb, connection_id=connection_id
        )
        response = await self._activation.call(methods.GET_ATTACHMENT, request)
        if connection_id not in self._attachments:  # a turn may have set it meanwhile
            self._attachments[connection_id] = bytes(response.attachment)

    def attachment_of(self, connection_id: str) -> Value:
        """A member's attachment (None if it has none, or is not known to be a member)."""
        return decode_optional(self._attachments.get(connection_id, b""))

    async def connections(self, tag: str | None = None) -> list[Member]:
        """The object's open connections (with ``tag``, if given), in connection id order."""
        if tag is not None:
            check_tags([tag])
        members: dict[str, Member] = {}
        after = ""
        while True:
            request = pb.MembersRequest(
                object=self._activation.object_pb, after=after, details=True
            )
            if tag is not None:
                request.tag = tag
            page = await self._activation.call(methods.MEMBERS, request)
            for member in page.members:
                members[member.connection_id] = Member(
                    id=member.connection_id,
                    tags=tuple(member.tags),
                    attachment=decode_optional(member.attachment),
                )
            if not page.more or not page.members:
                break
            after = page.members[-1].connection_id
        for connection_id, (_, change) in self._pending.items():
            kind = change.WhichOneof("change")
            if kind == "leave" or (
                kind == "join" and tag is not None and tag not in change.join.tags
            ):
                members.pop(connection_id, None)
            elif kind == "join":
                members[connection_id] = Member(
                    id=connection_id,
                    tags=tuple(change.join.tags),
                    attachment=decode_optional(change.join.attachment),
                )
            elif connection_id in members:  # an attachment change
                old = members[connection_id]
                members[connection_id] = Member(
                    old.id, old.tags, decode_optional(change.attachment)
                )
        return [members[connection_id] for connection_id in sorted(members)]

    async def broadcast(
        self,
        turn: Turn,
        message: str | bytes | bytearray | memoryview,
        *,
        tag: str | None = None,
        exclude: Iterable[Connection | str] = (),
    ) -> BroadcastResult:
        """Send ``message`` to the object's connections (with ``tag``, if given) but
        ``exclude``: one command per gateway, in the turn's output."""
        envelope_message = message_envelope(message, "broadcast()")
        excluded = {c if isinstance(c, str) else c.id for c in exclude}
        if tag is not None:
            check_tags([tag])
        request = pb.RecipientsRequest(object=self._activation.object_pb, exclude=excluded)
        if tag is not None:
            request.tag = tag
        response = await self._activation.call(methods.RECIPIENTS, request)
        recipients = {
            connection_id: gateway.gateway_id
            for gateway in response.gateways
            for connection_id in gateway.connection_ids
        }
        for connection_id, (_, change) in self._pending.items():
            kind = change.WhichOneof("change")
            if kind == "leave" or (
                kind == "join" and tag is not None and tag not in change.join.tags
            ):
                recipients.pop(connection_id, None)
            elif kind == "join" and connection_id not in excluded:
                recipients[connection_id] = ids.gateway_of(connection_id)
        by_gateway: dict[str, list[str]] = {}
        for connection_id in sorted(recipients):
            by_gateway.setdefault(recipients[connection_id], []).append(connection_id)
        commands = plan(by_gateway, envelope_message, self._activation.payload_budget)
        for _, command in commands:
            turn.command(command)
        return BroadcastResult(recipients=len(recipients), commands=len(commands))
