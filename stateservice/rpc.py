"""What every servicer of the state service does the same way: read an object id, refuse
bad input with a typed ErrorInfo, and turn storage failures into INTERNAL (a quota's
refusal raised by an operation, or a full disk, into RESOURCE_EXHAUSTED)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any, NoReturn, TypeVar

import grpc
import psycopg

from wsgate.errors import ObjectActive
from wsgate.state_errors import (
    EXHAUSTED_TYPES,
    Refusal,
    not_owner_metadata,
    object_active_metadata,
    refusal_code,
    refusal_metadata,
)
from wsgate.stateservice.ownership import Ownership
from wsgate.stateservice.quotas import Quotas, storage_full
from wsgate.stateservice.storage import DATABASE_ERRORS, ObjectId
from wsgate.v1 import state_pb2 as pb

log = logging.getLogger(__name__)

T = TypeVar("T")


def object_id(message: pb.ObjectId) -> ObjectId:
    """The object a request names; raises InvalidObjectId (a refusal) for an empty namespace.
    Its length is not checked: see :meth:`wsgate.stateservice.quotas.Quotas.object_id`."""
    return ObjectId(message.namespace, message.name)


async def refuse(context: Any, exc: Refusal) -> NoReturn:
    """End the call with ``exc``'s status (INVALID_ARGUMENT; RESOURCE_EXHAUSTED for a
    quota or the disk), its message and its ErrorInfo."""
    await context.abort(refusal_code(exc), str(exc), trailing_metadata=refusal_metadata(exc))
    raise AssertionError("unreachable: ServicerContext.abort() raises")


async def refuse_active(context: Any, exc: ObjectActive) -> NoReturn:
    """End the call with FAILED_PRECONDITION: a write from outside to an object that an
    activation holds (the ErrorInfo names the holder)."""
    await context.abort(
        grpc.StatusCode.FAILED_PRECONDITION,
        str(exc),
        trailing_metadata=object_active_metadata(exc.holder),
    )
    raise AssertionError("unreachable: ServicerContext.abort() raises")


async def require_owner(context: Any, ownership: Ownership | None, obj: ObjectId) -> None:
    """End the call with FAILED_PRECONDITION and NOT_OWNER, naming the owner, unless this
    replica owns ``obj`` (None: a replica alone, which owns everything)."""
    refusal = None if ownership is None else ownership.refusal(obj)
    if refusal is None:
        return
    await context.abort(
        grpc.StatusCode.FAILED_PRECONDITION,
        str(refusal),
        trailing_metadata=not_owner_metadata(refusal.owner, refusal.address),
    )
    raise AssertionError("unreachable: ServicerContext.abort() raises")


async def stored(context: Any, operation: Awaitable[T], quotas: Quotas | None = None) -> T:
    """Await a storage operation; a disk failure ends the call with INTERNAL (the batch was
    rolled back, nothing of it was stored). A lost connection to PostgreSQL (a failover,
    a restart) ends it with UNAVAILABLE instead, which clients retry: whether its COMMIT
    happened is unknown, and every write that retries may be made twice (keyed writes and
    commits of turns are recognised; the others set absolutely).

    An operation over a quota (it raised ObjectQuotaExceeded, and stored nothing) or one
    that found the disk full ends the call with RESOURCE_EXHAUSTED and its ErrorInfo,
    counted in ``quotas`` when given."""
    try:
        return await operation
    except EXHAUSTED_TYPES as exc:
        if quotas is not None:
            quotas.counted(exc)
        await refuse(context, exc)
    except DATABASE_ERRORS as exc:
        full = storage_full(exc)
        if full is not None:
            log.error("storage failed: %s", full)
            if quotas is not None:
                quotas.counted(full)
            await refuse(context, full)
        log.exception("storage failed")
        code = (
            grpc.StatusCode.UNAVAILABLE
            if isinstance(exc, psycopg.OperationalError)
            else grpc.StatusCode.INTERNAL
        )
        await context.abort(code, f"storage failed: {exc}")
        raise AssertionError("unreachable: ServicerContext.abort() raises") from exc
