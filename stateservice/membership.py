"""Membership, the hibernation API: connections accepted into objects, with tags and an
attachment, listed and broadcast to by the state service.

Storage (one SQLite file with the objects' data, see :mod:`wsgate.stateservice.storage`):

- ``members``: one row per (object, connection) with its gateway, tags (a JSON array, in
  the order given) and attachment (a serialized Value; empty: null). It is a rowid table
  on purpose: attachments of up to 16 KiB make rows large, and a large row in a WITHOUT
  ROWID table lives inside the b-tree that listing walks. Its indexes:

  - ``members_key (namespace, name, connection_id)``, unique: listing an object's members
    in connection id order, from a cursor, is one range scan of it, and without details
    the index alone answers (it holds every column the query reads).
  - ``members_by_connection (connection_id)``: LeaveAll is an index lookup.
  - ``members_by_gateway (gateway_id)``: removing a dead gateway's members is one too.

- ``member_tags``: one row per (object, tag, connection), WITHOUT ROWID with that primary
  key, so listing (or broadcasting to) an object's members with one tag is a range scan
  in connection id order. A member's tag rows are found from its ``tags`` column, so no
  other index is needed to delete them.
- ``departed``: connections that closed (LeaveAll) with when, kept for
  ``idempotency_retention_s``. A late join of such a connection (the stale copy of a
  redelivered event, run after the close) is ignored instead of leaving a member that is
  not open; after the retention no copy of an event can still be running.

Writes to one object (Join, Leave, SetAttachment) take their place behind a transaction
holding the object (:class:`~wsgate.stateservice.locks.ObjectLocks`), as key/value writes do.
LeaveAll and gateway sweeps remove one connection's (or gateway's) rows from many objects
at once: they go straight to storage, so that no transaction on one object can hold up
the cleanup of a closed connection everywhere (transactions read keys, never members).

Limits (checked here, refused with a typed ErrorInfo): at most 10 tags a member, each 1
to 256 characters; an attachment of at most 16 KiB encoded, which must parse as a Value.
Members pages hold at most :data:`PAGE_SIZE` members (and about :data:`PAGE_BYTES` of
details). The number of members of an object is capped by its quota
(``WSGATE_MAX_MEMBERS_PER_OBJECT``, 100,000 by default): a join over it is refused with
RESOURCE_EXHAUSTED and TOO_MANY_MEMBERS, checked against the member count kept in
``object_usage`` by the join's own transaction (:mod:`wsgate.stateservice.usage`). Joins and
attachments are refused while the disk is low (:mod:`wsgate.stateservice.quotas`); leaves never.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from wsgate import ids
from wsgate.clock import now_ms
from wsgate.errors import (
    InvalidConnectionId,
    InvalidObjectId,
    InvalidValue,
    LimitExceeded,
    ObjectActive,
    StorageFull,
)
from wsgate.limits import check_attachment_size, check_tags
from wsgate.placement import task_key
from wsgate.state_errors import ERROR_INFO_KEY, MAX_ERROR_KEY_CHARS
from wsgate.stateservice import rpc, usage
from wsgate.stateservice.broadcast import BusUnavailable, MessageTooLarge, fan_out
from wsgate.stateservice.component import StateContext
from wsgate.stateservice.presence import GRACE_S, PresenceMonitor
from wsgate.stateservice.storage import ObjectId, Operation, Sql, for_update
from wsgate.stateservice.usage import ObjectQuotas
from wsgate.supervision import stop_task
from wsgate.v1 import state_pb2 as pb
from wsgate.v1 import state_pb2_grpc
from wsgate.values import decode_value

log = logging.getLogger(__name__)


#: Members listed per page, by default and at most.
PAGE_SIZE = 1000

#: A page with details stops once its tags and attachments pass this many bytes (a page
#: of 1,000 members with 16 KiB attachments would otherwise be 16 MiB); ``more`` is then
#: set, as for a full page.
PAGE_BYTES = 4 * 1024 * 1024

#: Members of a dead gateway removed per storage operation: other operations are not held
#: up by a sweep of a large gateway.
SWEEP_BATCH = 1000

#: How often departed connections past their retention are pruned.
PRUNE_INTERVAL_S = 60.0

#: ``ErrorInfo.reason`` of a connection id that does not parse (named in state.proto).
INVALID_CONNECTION_ID = "INVALID_CONNECTION_ID"


# -- storage operations -------------------------------------------------------------------


@dataclass(frozen=True)
class StoredMember:
    """One member as stored: its connection, tags (in the order given) and attachment
    (a serialized Value; empty: null)."""

    connection_id: str
    tags: tuple[str, ...] = ()
    attachment: bytes = b""


def _stored_tags(conn: Sql, obj: ObjectId, connection_id: str) -> str | None:
    """A member's tags as stored (JSON), locking its row; None for a non-member."""
    row = conn.execute(
        "SELECT tags FROM members WHERE namespace = ? AND name = ? AND connection_id = ?"
        + _locked(conn),
        (obj.namespace, obj.name, connection_id),
    ).fetchone()
    return None if row is None else str(row[0])


def _insert_tag_rows(
    conn: Sql, namespace: str, name: str, connection_id: str, tags: tuple[str, ...]
) -> None:
    """Index a member's ``tags`` (``member_tags``: listing and broadcast by tag)."""
    conn.executemany(
        "INSERT INTO member_tags (namespace, name, tag, connection_id) VALUES (?, ?, ?, ?)",
        [(namespace, name, tag, connection_id) for tag in tags],
    )


def _delete_tag_rows(
    conn: Sql, namespace: str, name: str, connection_id: str, tags_json: str
) -> None:
    conn.executemany(
        "DELETE FROM member_tags "
        "WHERE namespace = ? AND name = ? AND tag = ? AND connection_id = ?",
        [(namespace, name, tag, connection_id) for tag in json.loads(tags_json)],
    )


def _delete_members(conn: Sql, rows: list[tuple[int, str, str, str, str]]) -> None:
    """Delete members given as (rowid, namespace, name, connection_id, tags) rows, read
    (and on PostgreSQL locked, :func:`_locked`) in this transaction; their objects' member
    counts follow."""
    counts: dict[tuple[str, str], int] = {}
    for _, namespace, name, connection_id, tags_json in rows:
        _delete_tag_rows(conn, namespace, name, connection_id, tags_json)
        counts[(namespace, name)] = counts.get((namespace, name), 0) + 1
    conn.executemany("DELETE FROM members WHERE rowid = ?", [(row[0],) for row in rows])
    usage.decrement_members(conn, counts)


def _locked(conn: Sql) -> str:
    # The rows a leave deletes are locked as it reads them: a replica sweeping the same
    # members at once waits, then skips them, so each leave is counted once.
    return for_update(conn)


@dataclass(frozen=True)
class JoinMember:
    """Make a connection a member of an object, or replace its tags and attachment.

    Returns False (and stores nothing) if the connection has departed (closed).
    ``tags`` must hold no duplicates. With ``quotas``, a join that would give the object
    more members than its quota raises TooManyMembers (nothing stored); replacing a
    member's tags and attachment is always allowed.
    """

    obj: ObjectId
    connection_id: str
    gateway_id: str
    tags: tuple[str, ...]
    attachment: bytes
    quotas: ObjectQuotas | None = None
    writes = True

    def __call__(self, conn: Sql) -> bool:
        if conn.execute(
            "SELECT 1 FROM departed WHERE connection_id = ?", (self.connection_id,)
        ).fetchone():
            return False
        namespace, name = self.obj.namespace, self.obj.name
        stored = _stored_tags(conn, self.obj, self.connection_id)
        if stored is not None:
            _delete_tag_rows(conn, namespace, name, self.connection_id, stored)
        else:
            # A new member (a connection's joins come one at a time, so no other
            # transaction adds this one meanwhile).
            after = usage.add(conn, self.obj, members=1)
            usage.check_members(after, self.quotas, self.connection_id)
        conn.execute(
            "INSERT INTO members (namespace, name, connection_id, gateway_id, tags, attachment) "
            "VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (namespace, name, connection_id) DO UPDATE SET "
            "gateway_id = excluded.gateway_id, tags = excluded.tags, "
            "attachment = excluded.attachment",
            (
                namespace,
                name,
                self.connection_id,
                self.gateway_id,
                json.dumps(list(self.tags), ensure_ascii=False),
                self.attachment,
            ),
        )
        _insert_tag_rows(conn, namespace, name, self.connection_id, self.tags)
        return True


@dataclass(frozen=True)
class LeaveMember:
    """Remove a connection from one object; returns whether it was a member."""

    obj: ObjectId
    connection_id: str
    writes = True

    def __call__(self, conn: Sql) -> bool:
        rows = conn.execute(
            "SELECT rowid, namespace, name, connection_id, tags FROM members "
            "WHERE namespace = ? AND name = ? AND connection_id = ?" + _locked(conn),
            (self.obj.namespace, self.obj.name, self.connection_id),
        ).fetchall()
        _delete_members(conn, rows)
        return bool(rows)


@dataclass(frozen=True)
class LeaveEverything:
    """A connection closed: remove it from every object and record it as departed (so a
    late join is ignored). Returns how many objects it left."""

    connection_id: str
    at_ms: int
    writes = True

    def __call__(self, conn: Sql) -> int:
        rows = conn.execute(
            "SELECT rowid, namespace, name, connection_id, tags FROM members "
            "WHERE connection_id = ? ORDER BY rowid" + _locked(conn),
            (self.connection_id,),
        ).fetchall()
        _delete_members(conn, rows)
        conn.execute(
            "INSERT INTO departed (connection_id, at_ms) VALUES (?, ?) "
            "ON CONFLICT (connection_id) DO UPDATE SET at_ms = excluded.at_ms",
            (self.connection_id, self.at_ms),
        )
        return len(rows)


@dataclass(frozen=True)
class RemoveGatewayMembers:
    """Remove up to ``limit`` members held by a gateway, from every object; returns how
    many (fewer than ``limit``: none are left)."""

    gateway_id: str
    limit: int = SWEEP_BATCH
    writes = True

    def __call__(self, conn: Sql) -> int:
        rows = conn.execute(
            # In rowid order: replicas sweeping the same gateway lock rows in one order.
            "SELECT rowid, namespace, name, connection_id, tags FROM members "
            "WHERE gateway_id = ? ORDER BY rowid LIMIT ?" + _locked(conn),
            (self.gateway_id, self.limit),
        ).fetchall()
        _delete_members(conn, rows)
        return len(rows)


@dataclass(frozen=True)
class GatewaysWithMembers:
    """The gateways that hold members of some object."""

    writes = False

    def __call__(self, conn: Sql) -> list[str]:
        return [row[0] for row in conn.execute("SELECT DISTINCT gateway_id FROM members")]


@dataclass(frozen=True)
class PruneDeparted:
    """Forget departed connections recorded before ``before_ms``; returns how many."""

    before_ms: int
    writes = True

    def __call__(self, conn: Sql) -> int:
        return conn.execute("DELETE FROM departed WHERE at_ms < ?", (self.before_ms,)).rowcount


@dataclass(frozen=True, kw_only=True)
class MembersPage:
    """A page of an object's members in connection id order: those with ``tag`` (None:
    all) whose id is greater than ``after``, at most ``limit``. Returns the members and
    whether more follow. With ``details``, tags and attachments too, and the page ends
    before the member whose tags (as JSON) and attachment would take it past
    ``max_bytes`` (its first member always comes, so paging makes progress)."""

    obj: ObjectId
    tag: str | None = None
    after: str = ""
    limit: int = PAGE_SIZE
    details: bool = False
    max_bytes: int = PAGE_BYTES
    writes = False

    def __call__(self, conn: Sql) -> tuple[list[StoredMember], bool]:
        params: tuple[object, ...]
        columns = "m.connection_id, m.tags, m.attachment" if self.details else "connection_id"
        if self.tag is None:
            source = "members" + (" AS m" if self.details else "")
            where = (
                "m.namespace = ? AND m.name = ? AND m.connection_id > ?"
                if self.details
                else "namespace = ? AND name = ? AND connection_id > ?"
            )
            order = "m.connection_id" if self.details else "connection_id"
            params = (self.obj.namespace, self.obj.name, self.after)
        else:
            columns = columns if self.details else "t.connection_id"
            source = "member_tags AS t" + (
                " JOIN members AS m ON m.namespace = t.namespace AND m.name = t.name "
                "AND m.connection_id = t.connection_id"
                if self.details
                else ""
            )
            where = "t.namespace = ? AND t.name = ? AND t.tag = ? AND t.connection_id > ?"
            order = "t.connection_id"
            params = (self.obj.namespace, self.obj.name, self.tag, self.after)
        sql = f"SELECT {columns} FROM {source} WHERE {where} ORDER BY {order} LIMIT ?"
        cursor = conn.execute(sql, (*params, self.limit + 1))
        members: list[StoredMember] = []
        size = 0
        for row in cursor:
            if len(members) == self.limit:
                return members, True
            if self.details:
                connection_id, tags_json, attachment = row
                entry = len(tags_json) + len(attachment)
                if members and size + entry > self.max_bytes:
                    return members, True
                size += entry
                members.append(
                    StoredMember(connection_id, tuple(json.loads(tags_json)), attachment)
                )
            else:
                members.append(StoredMember(row[0]))
        return members, False


@dataclass(frozen=True)
class GetMember:
    """A member's tags and attachment (b"" for null), or None if the connection is not a
    member."""

    obj: ObjectId
    connection_id: str
    writes = False

    def __call__(self, conn: Sql) -> StoredMember | None:
        row = conn.execute(
            "SELECT tags, attachment FROM members "
            "WHERE namespace = ? AND name = ? AND connection_id = ?",
            (self.obj.namespace, self.obj.name, self.connection_id),
        ).fetchone()
        if row is None:
            return None
        return StoredMember(self.connection_id, tuple(json.loads(row[0])), bytes(row[1]))


@dataclass(frozen=True)
class SetMemberAttachment:
    """Replace a member's attachment; returns False (storing nothing) for a non-member."""

    obj: ObjectId
    connection_id: str
    attachment: bytes
    writes = True

    def __call__(self, conn: Sql) -> bool:
        cursor = conn.execute(
            "UPDATE members SET attachment = ? "
            "WHERE namespace = ? AND name = ? AND connection_id = ?",
            (self.attachment, self.obj.namespace, self.obj.name, self.connection_id),
        )
        return cursor.rowcount > 0


@dataclass(frozen=True)
class SetMemberTags:
    """Replace a member's tags (``tags``: no duplicates), keeping its attachment; returns
    False (storing nothing) for a non-member."""

    obj: ObjectId
    connection_id: str
    tags: tuple[str, ...]
    writes = True

    def __call__(self, conn: Sql) -> bool:
        namespace, name = self.obj.namespace, self.obj.name
        stored = _stored_tags(conn, self.obj, self.connection_id)
        if stored is None:
            return False
        _delete_tag_rows(conn, namespace, name, self.connection_id, stored)
        conn.execute(
            "UPDATE members SET tags = ? WHERE namespace = ? AND name = ? AND connection_id = ?",
            (json.dumps(list(self.tags), ensure_ascii=False), namespace, name, self.connection_id),
        )
        _insert_tag_rows(conn, namespace, name, self.connection_id, self.tags)
        return True


@dataclass(frozen=True)
class BroadcastRecipients:
    """The members of an object (with ``tag``; None: all) not in ``exclude``, grouped by
    gateway: ``{gateway_id: [connection_id, ...]}``, ids in connection id order."""

    obj: ObjectId
    tag: str | None = None
    exclude: frozenset[str] = frozenset()
    writes = False

    def __call__(self, conn: Sql) -> dict[str, list[str]]:
        if self.tag is None:
            rows = conn.execute(
                "SELECT connection_id, gateway_id FROM members "
                "WHERE namespace = ? AND name = ? ORDER BY connection_id",
                (self.obj.namespace, self.obj.name),
            )
        else:
            rows = conn.execute(
                "SELECT t.connection_id, m.gateway_id FROM member_tags AS t "
                "JOIN members AS m ON m.namespace = t.namespace AND m.name = t.name "
                "AND m.connection_id = t.connection_id "
                "WHERE t.namespace = ? AND t.name = ? AND t.tag = ? ORDER BY t.connection_id",
                (self.obj.namespace, self.obj.name, self.tag),
            )
        by_gateway: defaultdict[str, list[str]] = defaultdict(list)
        exclude = self.exclude
        for connection_id, gateway_id in rows:
            if connection_id not in exclude:
                by_gateway[gateway_id].append(connection_id)
        return dict(by_gateway)


# -- the servicer -------------------------------------------------------------------------


def checked_attachment(attachment: bytes) -> bytes:
    """``attachment`` if it is at most 16 KiB and a Value (or empty, for null); raises
    AttachmentTooLarge or InvalidValue."""
    check_attachment_size(attachment)
    if attachment:
        decode_value(attachment)
    return attachment


def _checked_tag(request: Any) -> str | None:
    """The request's optional tag filter, checked as a member's tag would be."""
    if not request.HasField("tag"):
        return None
    check_tags((request.tag,))
    return str(request.tag)


class MembershipServicer(state_pb2_grpc.MembershipServicer):
    """``wsgate.v1.Membership`` over the shared storage.

    Bad input is refused with INVALID_ARGUMENT and an ErrorInfo: INVALID_OBJECT_ID,
    INVALID_CONNECTION_ID, TOO_MANY_TAGS, TAG_TOO_LARGE, ATTACHMENT_TOO_LARGE,
    INVALID_VALUE. A storage failure is INTERNAL; a broadcast NATS cannot take is
    UNAVAILABLE (some of its commands may still be delivered).
    """

    def __init__(self, context: StateContext, presence: PresenceMonitor) -> None:
        self._context = context
        self._storage = context.storage
        self._presence = presence

    # -- the calls -----------------------------------------------------------------------

    async def Join(self, request: pb.JoinRequest, context: Any) -> pb.JoinResponse:
        """Accept a connection into an object, replacing its tags and attachment if it
        is a member already (an upsert). A connection that has closed is not accepted
        (nothing is stored): it could never be reached."""
        obj = await self._object(context, request.object)
        await rpc.require_owner(context, self._context.ownership, obj)
        gateway_id = await _gateway(context, request.connection_id)
        try:
            check_tags(list(request.tags))
            attachment = checked_attachment(request.attachment)
            self._context.quotas.check_disk()
        except (LimitExceeded, InvalidValue, StorageFull) as exc:
            await rpc.refuse(context, exc)
        op = JoinMember(
            obj,
            request.connection_id,
            gateway_id,
            tuple(dict.fromkeys(request.tags)),  # a tag given twice is one tag
            attachment,
            self._context.quotas.objects,
        )
        # Before the write: a sweep of the gateway running meanwhile must leave it due.
        self._presence.member_joined(gateway_id)
        if not await self._write(context, obj, op):
            log.debug("join of departed connection %s ignored", request.connection_id)
        return pb.JoinResponse()

    async def Leave(self, request: pb.LeaveRequest, context: Any) -> pb.LeaveResponse:
        """Remove a connection from one object."""
        obj = await self._object(context, request.object)
        await rpc.require_owner(context, self._context.ownership, obj)
        await _gateway(context, request.connection_id)
        left = await self._write(context, obj, LeaveMember(obj, request.connection_id))
        return pb.LeaveResponse(left=left)

    async def LeaveAll(self, request: pb.LeaveAllRequest, context: Any) -> pb.LeaveAllResponse:
        """Remove a connection from every object (it closed); later joins are ignored."""
        await _gateway(context, request.connection_id)
        left = await rpc.stored(
            context, self._storage.run(LeaveEverything(request.connection_id, now_ms()))
        )
        return pb.LeaveAllResponse(left=left)

    async def Members(self, request: pb.MembersRequest, context: Any) -> pb.MembersResponse:
        """A page of an object's members in connection id order (see MembersRequest)."""
        obj = await self._object(context, request.object)
        await rpc.require_owner(context, self._context.ownership, obj)
        try:
            tag = _checked_tag(request)
        except LimitExceeded as exc:
            await rpc.refuse(context, exc)
        limit = min(request.limit or PAGE_SIZE, PAGE_SIZE)
        page = MembersPage(
            obj=obj, tag=tag, after=request.after, limit=limit, details=request.details
        )
        members, more = await rpc.stored(context, self._storage.run(page))
        response = pb.MembersResponse(more=more)
        for member in members:
            response.members.add(
                connection_id=member.connection_id,
                tags=member.tags,
                attachment=member.attachment,
            )
        return response

    async def GetAttachment(
        self, request: pb.GetAttachmentRequest, context: Any
    ) -> pb.GetAttachmentResponse:
        """A member's attachment (``member`` false for a non-member)."""
        obj = await self._object(context, request.object)
        await rpc.require_owner(context, self._context.ownership, obj)
        await _gateway(context, request.connection_id)
        found = await rpc.stored(context, self._storage.run(GetMember(obj, request.connection_id)))
        if found is None:
            return pb.GetAttachmentResponse(member=False)
        return pb.GetAttachmentResponse(member=True, attachment=found.attachment, tags=found.tags)

    async def SetAttachment(
        self, request: pb.SetAttachmentRequest, context: Any
    ) -> pb.SetAttachmentResponse:
        """Replace a member's attachment; nothing is stored for a non-member."""
        obj = await self._object(context, request.object)
        await rpc.require_owner(context, self._context.ownership, obj)
        await _gateway(context, request.connection_id)
        try:
            attachment = checked_attachment(request.attachment)
            self._context.quotas.check_disk()
        except (LimitExceeded, InvalidValue, StorageFull) as exc:
            await rpc.refuse(context, exc)
        op = SetMemberAttachment(obj, request.connection_id, attachment)
        member = await self._write(context, obj, op)
        return pb.SetAttachmentResponse(member=member)

    async def Broadcast(self, request: pb.BroadcastRequest, context: Any) -> pb.BroadcastResponse:
        """Send a message to an object's members (with a tag, less the excluded): one
        command per gateway holding recipients. Returns once NATS has the commands."""
        obj = await self._object(context, request.object)
        await rpc.require_owner(context, self._context.ownership, obj)
        try:
            tag = _checked_tag(request)
        except LimitExceeded as exc:
            await rpc.refuse(context, exc)
        if request.message.WhichOneof("data") is None:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "no message to broadcast")
        query = BroadcastRecipients(obj, tag, frozenset(request.exclude))
        recipients = await rpc.stored(context, self._storage.run(query))
        try:
            done = await fan_out(
                self._context.nc, self._context.config.prefix, recipients, request.message
            )
        except MessageTooLarge as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except BusUnavailable as exc:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, str(exc))
        return pb.BroadcastResponse(recipients=done.recipients, commands=done.commands)

    async def Recipients(
        self, request: pb.RecipientsRequest, context: Any
    ) -> pb.RecipientsResponse:
        """Who a broadcast would reach, by gateway (an activation publishes it itself)."""
        obj = await self._object(context, request.object)
        await rpc.require_owner(context, self._context.ownership, obj)
        try:
            tag = _checked_tag(request)
        except LimitExceeded as exc:
            await rpc.refuse(context, exc)
        query = BroadcastRecipients(obj, tag, frozenset(request.exclude))
        recipients = await rpc.stored(context, self._storage.run(query))
        return pb.RecipientsResponse(
            gateways=[
                pb.GatewayRecipients(gateway_id=gateway_id, connection_ids=connection_ids)
                for gateway_id, connection_ids in recipients.items()
            ]
        )

    # -- helpers -------------------------------------------------------------------------

    async def _write(self, context: Any, obj: ObjectId, op: Operation[Any]) -> Any:
        """Submit a write to ``obj`` in its turn: at once if no transaction holds the
        object or waits for it, else behind them (the hold is needed only to submit, as
        storage applies submissions in order). Refused (FAILED_PRECONDITION) while an
        activation holds the object: its members are changed by its own turns."""
        locks = self._context.locks
        await rpc.stored(context, self._context.leases.check_outside_writes([obj]))
        try:
            if locks.is_free(obj):
                future = self._submit_outside_write(obj, op)
            else:
                async with locks.holding(obj):
                    future = self._submit_outside_write(obj, op)
        except ObjectActive as exc:
            await rpc.refuse_active(context, exc)
        return await rpc.stored(context, future, self._context.quotas)

    async def _object(self, context: Any, message: pb.ObjectId) -> ObjectId:
        try:
            return self._context.quotas.object_id(message)
        except InvalidObjectId as exc:
            await rpc.refuse(context, exc)

    def _submit_outside_write(self, obj: ObjectId, op: Operation[Any]) -> asyncio.Future[Any]:
        self._context.leases.admit_outside_write(obj, time.monotonic())
        return self._storage.submit(op)


async def _abort(context: Any, code: grpc.StatusCode, details: str) -> NoReturn:
    await context.abort(code, details)
    raise AssertionError("unreachable: ServicerContext.abort() raises")


async def _gateway(context: Any, connection_id: str) -> str:
    """The gateway ``connection_id`` names; refuses the call if it is not a connection id."""
    try:
        return ids.gateway_of(connection_id)
    except InvalidConnectionId as exc:
        # Not a StateError, so not in wsgate.state_errors' table: its ErrorInfo is built
        # here, with the reason state.proto names; clients see a StateError with details.
        info = pb.ErrorInfo(reason=INVALID_CONNECTION_ID, key=connection_id[:MAX_ERROR_KEY_CHARS])
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            str(exc),
            trailing_metadata=((ERROR_INFO_KEY, info.SerializeToString()),),
        )
        raise AssertionError("unreachable: ServicerContext.abort() raises") from exc


# -- the component ------------------------------------------------------------------------


class MembershipComponent:
    """The Membership service, broadcast, and the gateways' leases (see
    :mod:`wsgate.stateservice.presence`): members of a gateway whose lease ran out are removed
    from every object. ``grace_s`` is the lease of a gateway not heard from yet."""

    def __init__(self, context: StateContext, *, grace_s: float = GRACE_S) -> None:
        self.context = context
        self.presence = PresenceMonitor(
            context.nc, context.config.prefix, self.remove_gateway_members, grace_s=grace_s
        )
        self.servicer = MembershipServicer(context, self.presence)
        self._pruner: asyncio.Task[None] | None = None

    def register(self, server: Any) -> None:
        """Add the Membership servicer."""
        state_pb2_grpc.add_MembershipServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        """Give the gateways of stored members a grace lease, listen to presence, sweep,
        and prune departed connections past their retention."""
        gateways = await self.context.storage.run(GatewaysWithMembers())
        await self.presence.start(gateways, self.context.spawn)
        self._pruner = self.context.spawn("departed_pruner", self._prune_loop())

    async def close(self) -> None:
        """Stop the background work. Idempotent."""
        await self.presence.close()
        pruner, self._pruner = self._pruner, None
        await stop_task(pruner)

    async def remove_gateway_members(self, gateway_id: str) -> int:
        """Remove every member of ``gateway_id`` from every object, in batches; returns
        how many were removed."""
        removed = 0
        while True:
            batch = await self.context.storage.run(RemoveGatewayMembers(gateway_id))
            removed += batch
            if batch < SWEEP_BATCH:
                return removed

    async def _prune_loop(self) -> None:
        retention_ms = int(self.context.config.idempotency_retention_s * 1000)
        while True:
            await asyncio.sleep(PRUNE_INTERVAL_S)
            if not self.context.ownership.owns_key(task_key("prune-departed")):
                continue  # another replica prunes for the tier
            try:
                pruned = await self.context.storage.run(PruneDeparted(now_ms() - retention_ms))
            except Exception:
                log.exception("pruning departed connections failed")
                continue
            if pruned:
                log.debug("forgot %d departed connection(s)", pruned)
