"""A durable object's connections inside its activation: the hibernation API.

Membership stays in the state service, the one place that also sees connections leave
when their gateway dies (its lease sweeps). The activation adds what it changed itself and
has not seen committed yet, so a turn sees its own joins, leaves and ``conn.state`` at once:

- a join (``Accept(tags=, state=)``), a leave (after ``on_close``), an attachment change
  (``conn.state = ...``) and a change of tags (``conn.tags = ...``) join the turn's effects
  and are committed with it;
- ``connections(tag)`` lists the members from the state service, corrected by those
  uncommitted changes;
- ``broadcast(message, tag=, exclude=)`` asks the state service for the recipients by
  gateway (corrected the same way) and adds one command per gateway to the turn's output:
  it leaves with the turn's other output, in order, once the turn has committed;
- ``conn.state`` and ``conn.tags`` come from memory: they are read once per connection
  and activation, then kept (only the object's own turns change them).

What a connection's uncommitted changes add up to is kept as one :class:`_Pending` per
connection (a join, then new tags, then a new attachment: still a join, with both), so the
corrections see every change, whatever order the turns made them in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
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


@dataclass
class _Pending:
    """A connection's changes not committed yet: the last turn that made one, and what
    they add up to (None: not changed; a join sets both ``tags`` and ``attachment``)."""

    number: int
    joined: bool = False
    left: bool = False
    tags: tuple[str, ...] | None = None
    attachment: bytes | None = None


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
        #: Tags known, read with the attachment or set by this activation.
        self._tags: dict[str, tuple[str, ...]] = {}
        #: Changes of turns not yet committed, by connection id.
        self._pending: dict[str, _Pending] = {}

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
        self._pending[connection_id] = _Pending(
            turn.number, joined=True, tags=tuple(tags), attachment=attachment
        )
        self._attachments[connection_id] = attachment
        self._tags[connection_id] = tuple(tags)

    def set_attachment(self, turn: Turn, connection_id: str, value: StorableValue) -> None:
        """Replace a member's attachment (``conn.state = value``)."""
        attachment = _encode_attachment(value)
        turn.member(pb.MemberChange(connection_id=connection_id, attachment=attachment))
        self._changed(turn, connection_id).attachment = attachment
        self._attachments[connection_id] = attachment

    def set_tags(self, turn: Turn, connection_id: str, tags: Iterable[str]) -> None:
        """Replace a member's tags (``conn.tags = ...``); duplicates are dropped. Raises
        TooManyTags or TagTooLarge over the limits (nothing changed)."""
        new = tuple(dict.fromkeys(tags))
        check_tags(new)
        turn.member(pb.MemberChange(connection_id=connection_id, tags=pb.MemberTags(tags=new)))
        self._changed(turn, connection_id).tags = new
        self._tags[connection_id] = new

    def _changed(self, turn: Turn, connection_id: str) -> _Pending:
        """The pending changes of ``connection_id``, to which ``turn`` adds one."""
        pending = self._pending.get(connection_id)
        if pending is None or pending.left:
            pending = self._pending[connection_id] = _Pending(turn.number)
        pending.number = turn.number
        return pending

    def leave(self, turn: Turn, connection_id: str) -> None:
        """The connection closed: it leaves the object."""
        change = pb.MemberChange(connection_id=connection_id, leave=pb.MemberLeave())
        turn.member(change)
        self._activation.quota.left(turn.number)
        self._pending[connection_id] = _Pending(turn.number, left=True)
        self._attachments.pop(connection_id, None)
        self._tags.pop(connection_id, None)

    def committed(self, through: int) -> None:
        """Turns up to number ``through`` are committed: the state service now shows their
        changes, which need no correcting any more."""
        done = [cid for cid, pending in self._pending.items() if pending.number <= through]
        for connection_id in done:
            del self._pending[connection_id]

    # -- reads ---------------------------------------------------------------------------

    async def load_attachment(self, connection_id: str) -> None:
        """Make ``conn.state`` and ``conn.tags`` of ``connection_id`` known (one call, the
        first time)."""
        if connection_id in self._tags or connection_id in self._pending:
            return
        request = pb.GetAttachmentRequest(
            object=self._activation.object_pb, connection_id=connection_id
        )
        response = await self._activation.call(methods.GET_ATTACHMENT, request)
        # A turn may have set them meanwhile.
        self._attachments.setdefault(connection_id, bytes(response.attachment))
        self._tags.setdefault(connection_id, tuple(response.tags))

    def tags_of(self, connection_id: str) -> tuple[str, ...]:
        """A member's tags (none if it is not known to be a member)."""
        return self._tags.get(connection_id, ())

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
        for connection_id, pending in self._pending.items():
            corrected = self._corrected(connection_id, pending, members.get(connection_id))
            if corrected is None or (tag is not None and tag not in corrected.tags):
                members.pop(connection_id, None)
            else:
                members[connection_id] = corrected
        return [members[connection_id] for connection_id in sorted(members)]

    def _corrected(
        self, connection_id: str, pending: _Pending, listed: Member | None
    ) -> Member | None:
        """A member as its uncommitted changes leave it (``listed``: as the state service
        listed it, if it did), or None: not a member, or not one to list."""
        if pending.left:
            return None
        tags: tuple[str, ...]
        if listed is not None and not pending.joined:
            tags, attachment = listed.tags, listed.attachment
        elif pending.joined or pending.tags is not None:
            # Joined here (both are pending), or a member with new tags that the service
            # left out for the tags it has committed (only members' tags change).
            tags, attachment = (), decode_optional(self._attachments.get(connection_id, b""))
        else:
            return None  # a new attachment only, of a member the listing rightly left out
        if pending.tags is not None:
            tags = pending.tags
        if pending.attachment is not None:
            attachment = decode_optional(pending.attachment)
        return Member(id=connection_id, tags=tags, attachment=attachment)

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
        for connection_id, pending in self._pending.items():
            if pending.left:
                recipients.pop(connection_id, None)
            elif pending.tags is not None:  # joined here, or its tags changed: decided here
                if connection_id not in excluded and (tag is None or tag in pending.tags):
                    recipients[connection_id] = ids.gateway_of(connection_id)
                else:
                    recipients.pop(connection_id, None)
        by_gateway: dict[str, list[str]] = {}
        for connection_id in sorted(recipients):
            by_gateway.setdefault(recipients[connection_id], []).append(connection_id)
        commands = plan(by_gateway, envelope_message, self._activation.payload_budget)
        for _, command in commands:
            turn.command(command)
        return BroadcastResult(recipients=len(recipients), commands=len(commands))
