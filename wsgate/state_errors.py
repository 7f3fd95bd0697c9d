"""The one place where state errors meet gRPC: statuses, ErrorInfo reasons, exceptions.

The server refuses bad input with INVALID_ARGUMENT, a readable details string, and a
serialized ``wsgate.v1.ErrorInfo`` in the trailing metadata key :data:`ERROR_INFO_KEY`;
the client turns that back into the same exception, with its fields. A write to an object
that an activation holds is refused with FAILED_PRECONDITION and the reason
``OBJECT_ACTIVE`` (:class:`~wsgate.errors.ObjectActive`). A write over a per-object quota
(:class:`~wsgate.errors.ObjectQuotaExceeded`) or refused for the disk's free space
(:class:`~wsgate.errors.StorageFull`) is RESOURCE_EXHAUSTED, with its ErrorInfo too. Both
sides use the table below, so a new refusal is added here once.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from wsgate.errors import (
    AttachmentTooLarge,
    InvalidObjectId,
    InvalidRequest,
    InvalidValue,
    KeyTooLarge,
    LimitExceeded,
    NotOwner,
    ObjectActive,
    ObjectNameTooLong,
    ObjectQuotaExceeded,
    ObjectTooLarge,
    StateError,
    StateTimeout,
    StateUnavailable,
    StorageFull,
    TagTooLarge,
    TooManyKeys,
    TooManyMembers,
    TooManyObjectKeys,
    TooManyTags,
    TransactionAborted,
    ValueTooLarge,
)
from wsgate.v1 import state_pb2 as pb

#: Trailing metadata key of the serialized ErrorInfo (``-bin``: gRPC carries it as bytes).
ERROR_INFO_KEY = "wsgate-error-bin"

#: ErrorInfo.key is cut to this many characters, as in the exceptions' messages.
MAX_ERROR_KEY_CHARS = 64


class Reason(enum.StrEnum):
    """``ErrorInfo.reason``: why the state service refused a call. Stable on the wire."""

    KEY_TOO_LARGE = "KEY_TOO_LARGE"
    VALUE_TOO_LARGE = "VALUE_TOO_LARGE"
    INVALID_VALUE = "INVALID_VALUE"
    INVALID_OBJECT_ID = "INVALID_OBJECT_ID"
    INVALID_REQUEST = "INVALID_REQUEST"
    TOO_MANY_KEYS = "TOO_MANY_KEYS"
    TOO_MANY_TAGS = "TOO_MANY_TAGS"
    TAG_TOO_LARGE = "TAG_TOO_LARGE"
    ATTACHMENT_TOO_LARGE = "ATTACHMENT_TOO_LARGE"
    OBJECT_ACTIVE = "OBJECT_ACTIVE"
    NOT_OWNER = "NOT_OWNER"
    OBJECT_NAME_TOO_LONG = "OBJECT_NAME_TOO_LONG"
    TOO_MANY_OBJECT_KEYS = "TOO_MANY_OBJECT_KEYS"
    OBJECT_TOO_LARGE = "OBJECT_TOO_LARGE"
    TOO_MANY_MEMBERS = "TOO_MANY_MEMBERS"
    STORAGE_FULL = "STORAGE_FULL"


#: The exceptions the server refuses calls with, and the reason each travels as.
REFUSALS: dict[type[StateError], Reason] = {
    KeyTooLarge: Reason.KEY_TOO_LARGE,
    ValueTooLarge: Reason.VALUE_TOO_LARGE,
    InvalidValue: Reason.INVALID_VALUE,
    InvalidObjectId: Reason.INVALID_OBJECT_ID,
    InvalidRequest: Reason.INVALID_REQUEST,
    TooManyKeys: Reason.TOO_MANY_KEYS,
    TooManyTags: Reason.TOO_MANY_TAGS,
    TagTooLarge: Reason.TAG_TOO_LARGE,
    AttachmentTooLarge: Reason.ATTACHMENT_TOO_LARGE,
    ObjectNameTooLong: Reason.OBJECT_NAME_TOO_LONG,
    TooManyObjectKeys: Reason.TOO_MANY_OBJECT_KEYS,
    ObjectTooLarge: Reason.OBJECT_TOO_LARGE,
    TooManyMembers: Reason.TOO_MANY_MEMBERS,
    StorageFull: Reason.STORAGE_FULL,
}

#: The limit exceptions, each rebuilt on the client from (size, limit, key).
_LIMITS: dict[str, Callable[[int, int, str], LimitExceeded]] = {
    Reason.KEY_TOO_LARGE: KeyTooLarge,
    Reason.VALUE_TOO_LARGE: ValueTooLarge,
    Reason.TOO_MANY_KEYS: TooManyKeys,
    Reason.TOO_MANY_TAGS: TooManyTags,
    Reason.TAG_TOO_LARGE: TagTooLarge,
    Reason.ATTACHMENT_TOO_LARGE: AttachmentTooLarge,
    Reason.OBJECT_NAME_TOO_LONG: ObjectNameTooLong,
    Reason.TOO_MANY_OBJECT_KEYS: TooManyObjectKeys,
    Reason.OBJECT_TOO_LARGE: ObjectTooLarge,
    Reason.TOO_MANY_MEMBERS: TooManyMembers,
}

#: The exception types a server refusal can be (for ``except`` clauses): REFUSALS' keys.
REFUSAL_TYPES = (InvalidValue, InvalidObjectId, InvalidRequest, LimitExceeded, StorageFull)
Refusal = InvalidValue | InvalidObjectId | InvalidRequest | LimitExceeded | StorageFull

#: The refusals about resources (quotas, the disk) rather than bad input.
EXHAUSTED_TYPES = (ObjectQuotaExceeded, StorageFull)
Exhausted = ObjectQuotaExceeded | StorageFull


def refusal_code(exc: Refusal) -> grpc.StatusCode:
    """The status a refusal is sent with: RESOURCE_EXHAUSTED for a quota or the disk
    (the request was well formed; the object or the service is full), INVALID_ARGUMENT for
    bad input."""
    if isinstance(exc, EXHAUSTED_TYPES):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INVALID_ARGUMENT


def error_info(exc: Refusal) -> pb.ErrorInfo:
    """The ErrorInfo describing a refusal the server is about to send."""
    reason = next(REFUSALS[cls] for cls in type(exc).__mro__ if cls in REFUSALS)
    if isinstance(exc, LimitExceeded):
        return pb.ErrorInfo(
            reason=reason, size=exc.size, limit=exc.limit, key=exc.key[:MAX_ERROR_KEY_CHARS]
        )
    if isinstance(exc, StorageFull):
        return pb.ErrorInfo(reason=reason, size=exc.free_bytes, limit=exc.threshold_bytes)
    return pb.ErrorInfo(reason=reason)


def refusal_metadata(exc: Refusal) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata carrying ``exc``'s ErrorInfo."""
    return ((ERROR_INFO_KEY, error_info(exc).SerializeToString()),)


def object_active_metadata(holder: str) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata of an OBJECT_ACTIVE refusal (sent with FAILED_PRECONDITION)."""
    info = pb.ErrorInfo(reason=Reason.OBJECT_ACTIVE, key=holder[:MAX_ERROR_KEY_CHARS])
    return ((ERROR_INFO_KEY, info.SerializeToString()),)


def not_owner_metadata(owner: str, address: str) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata of a NOT_OWNER refusal (sent with FAILED_PRECONDITION)."""
    info = pb.ErrorInfo(reason=Reason.NOT_OWNER, key=owner, owner_address=address)
    return ((ERROR_INFO_KEY, info.SerializeToString()),)


def exception_from_error_info(info: pb.ErrorInfo, details: str) -> StateError:
    """The exception a refusal stands for; a plain StateError for an unknown reason
    (a newer server), so the caller still gets the details."""
    limit_type = _LIMITS.get(info.reason)
    if limit_type is not None:
        return limit_type(info.size, info.limit, info.key)
    if info.reason == Reason.INVALID_VALUE:
        return InvalidValue(details)
    if info.reason == Reason.INVALID_OBJECT_ID:
        return InvalidObjectId(details)
    if info.reason == Reason.INVALID_REQUEST:
        return InvalidRequest(details)
    if info.reason == Reason.OBJECT_ACTIVE:
        return ObjectActive(details, holder=info.key)
    if info.reason == Reason.NOT_OWNER:
        return NotOwner(details, owner=info.key, address=info.owner_address)
    if info.reason == Reason.STORAGE_FULL:
        return StorageFull(details, free_bytes=info.size, threshold_bytes=info.limit)
    return StateError(f"state service refused the call ({info.reason}): {details}")


def exception_from_rpc_error(err: grpc.RpcError, what: str) -> StateError:
    """Map a failed call (``what``, e.g. ``"Get"``) to the state exception tree.

    UNAVAILABLE → StateUnavailable, DEADLINE_EXCEEDED → StateTimeout, INVALID_ARGUMENT,
    FAILED_PRECONDITION or RESOURCE_EXHAUSTED with an ErrorInfo → the refusal's own
    exception (ObjectActive for OBJECT_ACTIVE, the quota's for a quota, StorageFull for
    the disk); anything else → StateError naming the code.
    """
    code = _call_attr(err, "code")
    details = _call_attr(err, "details") or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return StateUnavailable(f"state service unavailable during {what}: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return StateTimeout(f"state service did not answer {what} in time: {details}")
    if code == grpc.StatusCode.ABORTED:
        return TransactionAborted(f"state service aborted {what}: {details}")
    if code in _WITH_ERROR_INFO:
        info = _error_info_of(err)
        if info is not None:
            return exception_from_error_info(info, details)
    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    return StateError(f"state service failed {what} with {name}: {details}")


_WITH_ERROR_INFO = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


def _error_info_of(err: grpc.RpcError) -> pb.ErrorInfo | None:
    for key, value in _call_attr(err, "trailing_metadata") or ():
        if key == ERROR_INFO_KEY and isinstance(value, bytes):
            try:
                return pb.ErrorInfo.FromString(value)
            except DecodeError:
                # A garbled ErrorInfo still leaves the status and its details to report.
                return None
    return None


def _call_attr(err: grpc.RpcError, name: str) -> Any:
    # grpc.RpcError itself declares nothing; the errors calls raise (grpc.aio.AioRpcError,
    # grpc.Call) have these methods.
    method = getattr(err, name, None)
    return method() if callable(method) else None
