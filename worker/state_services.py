"""The state service's gRPC services, one typed client each.

A :class:`~wsgate.worker.state_client.StateClient` owns the channels, the placement of
objects on replicas and the retries; it exposes these as ``state.kv``, ``state.membership``,
``state.alarms`` and ``state.activations``. Each method takes and returns the generated
protobuf messages of ``wsgate.v1``; a call about an object goes to the replica that owns
``request.object``. Failures are the state exception tree of :mod:`wsgate.errors`
(StateUnavailable, StateTimeout, NotOwner once redirects are used up, the refusals...).

``timeout_s`` is the call's deadline; None means the client's own.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from wsgate.v1 import state_pb2 as pb
from wsgate.worker import state_methods as methods

if TYPE_CHECKING:
    from wsgate.worker.state_client import StateClient


class _ServiceClient:
    """A state-service client bound to the StateClient that routes its calls."""

    def __init__(self, state: StateClient) -> None:
        self._state = state

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self._state.address}>"


class KvClient(_ServiceClient):
    """``wsgate.v1.State``: an object's key/value storage (reads and coalesced writes).

    Handlers use :class:`~wsgate.worker.object_storage.ObjectStorage` on top of it, which
    encodes values and holds the output gate.
    """

    async def get(
        self, request: pb.GetRequest, *, timeout_s: float | None = None
    ) -> pb.GetResponse:
        """The entries of ``request.keys`` that exist."""
        return await self._state.call(methods.GET, request, timeout_s=timeout_s)

    async def list(
        self, request: pb.ListRequest, *, timeout_s: float | None = None
    ) -> pb.ListResponse:
        """The entries in the range ``request`` names."""
        return await self._state.call(methods.LIST, request, timeout_s=timeout_s)

    async def usage(
        self, request: pb.UsageRequest, *, timeout_s: float | None = None
    ) -> pb.UsageResponse:
        """What the object uses (keys and bytes) against its quotas."""
        return await self._state.call(methods.USAGE, request, timeout_s=timeout_s)

    async def list_objects(
        self, request: pb.ListObjectsRequest, *, timeout_s: float | None = None
    ) -> pb.ListObjectsResponse:
        """A page of a namespace's objects that hold storage or members (any replica)."""
        return await self._state.call(methods.LIST_OBJECTS, request, timeout_s=timeout_s)

    def write(self, write: pb.Write) -> asyncio.Future[pb.WriteResult]:
        """Queue ``write`` for the next Write call to its object's replica; the future
        resolves with its result (a refusal is a result, not an exception)."""
        return self._state.write(write)


class MembershipClient(_ServiceClient):
    """``wsgate.v1.Membership``: the connections accepted into objects."""

    async def join(
        self, request: pb.JoinRequest, *, timeout_s: float | None = None
    ) -> pb.JoinResponse:
        """Accept a connection into the object (replacing its tags and attachment)."""
        return await self._state.call(methods.JOIN, request, timeout_s=timeout_s)

    async def leave(
        self, request: pb.LeaveRequest, *, timeout_s: float | None = None
    ) -> pb.LeaveResponse:
        """Remove a connection from the object."""
        return await self._state.call(methods.LEAVE, request, timeout_s=timeout_s)

    async def leave_all(
        self, request: pb.LeaveAllRequest, *, timeout_s: float | None = None
    ) -> pb.LeaveAllResponse:
        """Remove a connection from every object (it closed); at any replica."""
        return await self._state.call(methods.LEAVE_ALL, request, timeout_s=timeout_s)

    async def members(
        self, request: pb.MembersRequest, *, timeout_s: float | None = None
    ) -> pb.MembersResponse:
        """One page of the object's members."""
        return await self._state.call(methods.MEMBERS, request, timeout_s=timeout_s)

    async def get_attachment(
        self, request: pb.GetAttachmentRequest, *, timeout_s: float | None = None
    ) -> pb.GetAttachmentResponse:
        """A member's attachment."""
        return await self._state.call(methods.GET_ATTACHMENT, request, timeout_s=timeout_s)

    async def set_attachment(
        self, request: pb.SetAttachmentRequest, *, timeout_s: float | None = None
    ) -> pb.SetAttachmentResponse:
        """Replace a member's attachment."""
        return await self._state.call(methods.SET_ATTACHMENT, request, timeout_s=timeout_s)

    async def broadcast(
        self, request: pb.BroadcastRequest, *, timeout_s: float | None = None
    ) -> pb.BroadcastResponse:
        """Send a message to the object's members (one command per gateway)."""
        return await self._state.call(methods.BROADCAST, request, timeout_s=timeout_s)

    async def recipients(
        self, request: pb.RecipientsRequest, *, timeout_s: float | None = None
    ) -> pb.RecipientsResponse:
        """The members a broadcast would reach, by gateway."""
        return await self._state.call(methods.RECIPIENTS, request, timeout_s=timeout_s)


class AlarmsClient(_ServiceClient):
    """``wsgate.v1.Alarms``: each object's one alarm."""

    async def set(
        self, request: pb.SetAlarmRequest, *, timeout_s: float | None = None
    ) -> pb.SetAlarmResponse:
        """Set the object's alarm, replacing any previous one."""
        return await self._state.call(methods.SET_ALARM, request, timeout_s=timeout_s)

    async def get(
        self, request: pb.GetAlarmRequest, *, timeout_s: float | None = None
    ) -> pb.GetAlarmResponse:
        """The object's alarm, if one is set."""
        return await self._state.call(methods.GET_ALARM, request, timeout_s=timeout_s)

    async def delete(
        self, request: pb.DeleteAlarmRequest, *, timeout_s: float | None = None
    ) -> pb.DeleteAlarmResponse:
        """Remove the object's alarm."""
        return await self._state.call(methods.DELETE_ALARM, request, timeout_s=timeout_s)


class ActivationsClient(_ServiceClient):
    """``wsgate.v1.Activations``: leases on objects and their committed turns.

    The ``*_at`` methods go to the replica at ``address`` (the caller split a call about
    several objects by owner), made once: no redirect, no retry.
    """

    async def activate(
        self, request: pb.ActivateRequest, *, timeout_s: float | None = None
    ) -> pb.ActivateResponse:
        """Take (or renew) the lease on the object."""
        return await self._state.call(methods.ACTIVATE, request, timeout_s=timeout_s)

    async def lookup_turn(
        self, request: pb.LookupTurnRequest, *, timeout_s: float | None = None
    ) -> pb.LookupTurnResponse:
        """The committed turn of an event key, if any; at any replica."""
        return await self._state.call(methods.LOOKUP_TURN, request, timeout_s=timeout_s)

    async def renew_at(
        self, address: str, request: pb.RenewRequest, *, timeout_s: float | None = None
    ) -> pb.RenewResponse:
        """Renew leases held at the replica at ``address``."""
        return await self._state.call_at(address, methods.RENEW, request, timeout_s=timeout_s)

    async def release_at(
        self, address: str, request: pb.ReleaseRequest, *, timeout_s: float | None = None
    ) -> pb.ReleaseResponse:
        """Give back leases held at the replica at ``address``."""
        return await self._state.call_at(address, methods.RELEASE, request, timeout_s=timeout_s)

    async def commit_turns_at(
        self, address: str, request: pb.CommitTurnsRequest, *, timeout_s: float | None = None
    ) -> pb.CommitTurnsResponse:
        """Commit the turns of objects owned by the replica at ``address``."""
        return await self._state.call_at(
            address, methods.COMMIT_TURNS, request, timeout_s=timeout_s
        )
