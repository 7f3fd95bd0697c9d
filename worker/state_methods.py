"""Every RPC of ``wsgate.v1`` (proto/wsgate/v1/state.proto), typed: the one place a
state-service method is named.

A :class:`Unary` knows its path and its request and response types, so a call made with it
is checked end to end: ``await state.call(methods.JOIN, pb.JoinRequest(...))`` is a
``pb.JoinResponse`` to mypy, and a request of the wrong type is an error before it runs.
The per-service clients (:mod:`wsgate.worker.state_services`) are built on these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from google.protobuf.message import Message

from wsgate.v1 import state_pb2 as pb

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)

#: The proto package of the services.
PACKAGE = "wsgate.v1"


class Rpc(Protocol):
    """What every RPC descriptor says about itself."""

    @property
    def service(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def path(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Unary(Generic[Req, Resp]):
    """One unary RPC: ``service.name`` taking ``request`` and answering ``response``."""

    service: str
    name: str
    request: type[Req]
    response: type[Resp]

    @property
    def path(self) -> str:
        """The gRPC method path, ``/wsgate.v1.<service>/<name>``."""
        return f"/{PACKAGE}.{self.service}/{self.name}"


@dataclass(frozen=True, slots=True)
class Stream(Generic[Req, Resp]):
    """One streaming RPC (responses streamed; requests too when ``bidirectional``)."""

    service: str
    name: str
    request: type[Req]
    response: type[Resp]
    bidirectional: bool

    @property
    def path(self) -> str:
        """The gRPC method path, ``/wsgate.v1.<service>/<name>``."""
        return f"/{PACKAGE}.{self.service}/{self.name}"


# -- State: an object's key/value storage -------------------------------------------------
GET = Unary("State", "Get", pb.GetRequest, pb.GetResponse)
LIST = Unary("State", "List", pb.ListRequest, pb.ListResponse)
USAGE = Unary("State", "Usage", pb.UsageRequest, pb.UsageResponse)
LIST_OBJECTS = Unary("State", "ListObjects", pb.ListObjectsRequest, pb.ListObjectsResponse)
WRITE = Stream("State", "Write", pb.WriteRequest, pb.WriteResponse, bidirectional=False)
TRANSACTION = Stream(
    "State", "Transaction", pb.TransactionRequest, pb.TransactionResponse, bidirectional=True
)

# -- Membership: an object's connections --------------------------------------------------
JOIN = Unary("Membership", "Join", pb.JoinRequest, pb.JoinResponse)
LEAVE = Unary("Membership", "Leave", pb.LeaveRequest, pb.LeaveResponse)
LEAVE_ALL = Unary("Membership", "LeaveAll", pb.LeaveAllRequest, pb.LeaveAllResponse)
MEMBERS = Unary("Membership", "Members", pb.MembersRequest, pb.MembersResponse)
GET_ATTACHMENT = Unary(
    "Membership", "GetAttachment", pb.GetAttachmentRequest, pb.GetAttachmentResponse
)
SET_ATTACHMENT = Unary(
    "Membership", "SetAttachment", pb.SetAttachmentRequest, pb.SetAttachmentResponse
)
BROADCAST = Unary("Membership", "Broadcast", pb.BroadcastRequest, pb.BroadcastResponse)
RECIPIENTS = Unary("Membership", "Recipients", pb.RecipientsRequest, pb.RecipientsResponse)

# -- Alarms: an object's alarm -------------------------------------------------------------
SET_ALARM = Unary("Alarms", "SetAlarm", pb.SetAlarmRequest, pb.SetAlarmResponse)
GET_ALARM = Unary("Alarms", "GetAlarm", pb.GetAlarmRequest, pb.GetAlarmResponse)
DELETE_ALARM = Unary("Alarms", "DeleteAlarm", pb.DeleteAlarmRequest, pb.DeleteAlarmResponse)

# -- Activations: leases and committed turns ----------------------------------------------
ACTIVATE = Unary("Activations", "Activate", pb.ActivateRequest, pb.ActivateResponse)
RENEW = Unary("Activations", "Renew", pb.RenewRequest, pb.RenewResponse)
RELEASE = Unary("Activations", "Release", pb.ReleaseRequest, pb.ReleaseResponse)
COMMIT_TURNS = Unary("Activations", "CommitTurns", pb.CommitTurnsRequest, pb.CommitTurnsResponse)
LOOKUP_TURN = Unary("Activations", "LookupTurn", pb.LookupTurnRequest, pb.LookupTurnResponse)

#: Every RPC above, to check against the service descriptors (a test does).
ALL: tuple[Rpc, ...] = (
    GET, LIST, USAGE, LIST_OBJECTS, WRITE, TRANSACTION,
    JOIN, LEAVE, LEAVE_ALL, MEMBERS, GET_ATTACHMENT, SET_ATTACHMENT, BROADCAST, RECIPIENTS,
    SET_ALARM, GET_ALARM, DELETE_ALARM,
    ACTIVATE, RENEW, RELEASE, COMMIT_TURNS, LOOKUP_TURN,
)  # fmt: skip
