"""``wsgate.v1.State``: per-object key/value storage and transactions over gRPC.

Design (recorded in docs/architecture.md): **server-side per-object serialization**. Every
operation goes through one storage queue (:mod:`wsgate.stateservice.storage`), which already
orders all operations of all objects; a transaction additionally *holds* its object
(:class:`~wsgate.stateservice.locks.ObjectLocks`) from begin to commit, so writes to that object
wait behind it while reads and other objects go on. A transaction therefore never
conflicts and never retries: under contention (many clients incrementing one counter,
the common case for a durable object) it queues instead of wasting work, and a holder
that stalls is cut off by ``transaction_timeout_s`` (ABORTED, nothing written); one that
dies drops its stream, which releases the object at once.

Quotas (:mod:`wsgate.stateservice.quotas`): a put is checked against its object's key and byte
quotas by the storage operation that applies it (a transaction's writes together), and
refused whole (RESOURCE_EXHAUSTED); puts are refused while the disk is low, deletes never.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc

from wsgate.errors import InvalidRequest, NotOwner, ObjectActive
from wsgate.limits import check_batch, check_key, check_value_size
from wsgate.state_errors import EXHAUSTED_TYPES, REFUSAL_TYPES, Reason, error_info, refusal_code
from wsgate.stateservice.component import StateContext
from wsgate.stateservice.idempotency import Applied, Idempotent, LookupApplied
from wsgate.stateservice.quotas import Quotas, storage_full
from wsgate.stateservice.rpc import refuse, refuse_active, require_owner, stored
from wsgate.stateservice.storage import (
    RETRY_WHOLE_BATCH,
    DeleteAll,
    DeleteKeys,
    GetKeys,
    ListQuery,
    ObjectId,
    Operation,
    PutKeys,
    Sql,
)
from wsgate.stateservice.usage import (
    DEFAULT_LIST_LIMIT,
    MAX_LIST_LIMIT,
    CheckedGrowth,
    ListObjects,
    ObjectQuotas,
    ReadUsage,
)
from wsgate.v1 import state_pb2 as pb
from wsgate.v1 import state_pb2_grpc
from wsgate.values import decode_value

log = logging.getLogger(__name__)


class KeyValueComponent(state_pb2_grpc.StateServicer):
    """The State service of one state service process."""

    def __init__(self, context: StateContext) -> None:
        self._context = context
        self._storage = context.storage
        self._locks = context.locks
        self._leases = context.leases
        self._quotas = context.quotas

    # -- Component -----------------------------------------------------------------------

    def register(self, server: Any) -> None:
        """Add ``wsgate.v1.State`` to the server."""
        state_pb2_grpc.add_StateServicer_to_server(self, server)

    async def start(self) -> None:
        """No background work."""

    async def close(self) -> None:
        """No background work."""

    # -- reads ---------------------------------------------------------------------------

    async def Get(self, request: pb.GetRequest, context: Any) -> pb.GetResponse:
        try:
            op = _get_op(self._quotas.object_id(request.object), request)
        except REFUSAL_TYPES as exc:
            await refuse(context, exc)
        await require_owner(context, self._context.ownership, op.obj)
        entries = await stored(context, self._storage.submit(op))
        return pb.GetResponse(entries=[pb.Entry(key=k, value=v) for k, v in entries])

    async def List(self, request: pb.ListRequest, context: Any) -> pb.ListResponse:
        try:
            op = _list_op(self._quotas.object_id(request.object), request)
        except REFUSAL_TYPES as exc:
            await refuse(context, exc)
        await require_owner(context, self._context.ownership, op.obj)
        entries = await stored(context, self._storage.submit(op))
        return pb.ListResponse(entries=[pb.Entry(key=k, value=v) for k, v in entries])

    async def Usage(self, request: pb.UsageRequest, context: Any) -> pb.UsageResponse:
        """What the object holds, as its quotas count it."""
        try:
            obj = self._quotas.object_id(request.object)
        except REFUSAL_TYPES as exc:
            await refuse(context, exc)
        await require_owner(context, self._context.ownership, obj)
        held = await stored(context, self._storage.submit(ReadUsage(obj)))
        return pb.UsageResponse(
            usage=pb.ObjectUsage(keys=held.keys, bytes=held.bytes, members=held.members)
        )

    async def ListObjects(
        self, request: pb.ListObjectsRequest, context: Any
    ) -> pb.ListObjectsResponse:
        """A page of a namespace's objects that hold storage or members, in name order.
        Any replica answers for every object: they share one database (a listing reads,
        it needs no ownership), so a namespace spread over the replicas lists whole."""
        try:
            # A namespace, prefix or cursor over the name limit names no object.
            for part in (request.namespace, request.prefix, request.after):
                self._quotas.object_id(pb.ObjectId(namespace=request.namespace, name=part))
            if not request.namespace:
                raise InvalidRequest("a listing needs a namespace")
            if request.limit > MAX_LIST_LIMIT:
                raise InvalidRequest(f"a page is at most {MAX_LIST_LIMIT} objects")
        except REFUSAL_TYPES as exc:
            await refuse(context, exc)
        op = ListObjects(
            request.namespace,
            prefix=request.prefix,
            after=request.after,
            limit=request.limit or DEFAULT_LIST_LIMIT,
        )
        page, more = await stored(context, self._storage.submit(op))
        return pb.ListObjectsResponse(
            objects=[
                pb.ObjectSummary(
                    name=name,
                    usage=pb.ObjectUsage(keys=held.keys, bytes=held.bytes, members=held.members),
                )
                for name, held in page
            ],
            more=more,
        )

    # -- writes --------------------------------------------------------------------------

    async def Write(
        self, request: pb.WriteRequest, context: Any
    ) -> AsyncIterator[pb.WriteResponse]:
        """Each write is checked and applied on its own; one bad write fails alone.

        Results stream back as writes finish: the writes to free objects (normally all of
        them) in the first message, and each write that waits behind a transaction holding
        its object when it is done, so it never holds back the others.
        """
        ready: list[pb.WriteResult] = []
        free: list[Operation[Applied]] = []
        free_indexes: list[int] = []
        held: dict[asyncio.Future[Applied], int] = {}
        objects: dict[tuple[str, str], ObjectId] = {}  # one ObjectId per object of the call
        ownership = self._context.ownership
        await stored(context, self._leases.check_outside_writes(_write_objects(request)))
        now = time.monotonic()
        quotas = self._quotas
        for index, write in enumerate(request.writes):
            try:
                obj, op = _write_op(write, quotas, objects)
                if write.WhichOneof("op") == "put":
                    quotas.check_disk()
                not_owner = ownership.refusal(obj)
                if not_owner is not None:
                    raise not_owner
                self._leases.admit_outside_write(obj, now)
            except REFUSAL_TYPES as exc:
                ready.append(_refused_write(exc, index))
                continue
            except ObjectActive as exc:
                failure = pb.WriteFailure(
                    code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
                    details=str(exc),
                    info=pb.ErrorInfo(reason=Reason.OBJECT_ACTIVE, key=exc.holder),
                )
                ready.append(pb.WriteResult(failure=failure, index=index))
                continue
            except NotOwner as exc:
                failure = pb.WriteFailure(
                    code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
                    details=str(exc),
                    info=pb.ErrorInfo(
                        reason=Reason.NOT_OWNER, key=exc.owner, owner_address=exc.address
                    ),
                )
                ready.append(pb.WriteResult(failure=failure, index=index))
                continue
            keyed = _keyed(op, write.idempotency_key)
            if self._locks.is_free(obj):
                free.append(keyed)
                free_indexes.append(index)
            else:
                # Its turn comes after the transaction holding its object.
                held[asyncio.ensure_future(self._submit_in_turn(obj, keyed))] = index
        # The free writes, in order, as one storage operation: one future for the call.
        group = self._storage.submit(_WriteGroup(free)) if free else None
        if held:
            # Some writes wait behind a transaction: answer what is known at once (maybe
            # nothing), so the client stops counting this call against those it keeps in
            # flight while the rest waits.
            yield pb.WriteResponse(results=ready)
            ready = []
        if group is not None:
            try:
                outcomes: list[Applied | Exception] = await group
            except Exception as exc:  # the batch's commit failed: none of it was stored
                outcomes = [exc] * len(free)
            ready.extend(
                self._write_result(outcome, index)
                for outcome, index in zip(outcomes, free_indexes, strict=True)
            )
            yield pb.WriteResponse(results=ready)
            ready = []
        while held:
            done, _ = await asyncio.wait(held, return_when=asyncio.FIRST_COMPLETED)
            results = []
            for future in done:
                index = held.pop(future)
                try:
                    outcome: Applied | Exception = future.result()
                except Exception as exc:
                    outcome = exc
                results.append(self._write_result(outcome, index))
            yield pb.WriteResponse(results=results)
        if ready:
            yield pb.WriteResponse(results=ready)

    def _write_result(self, outcome: Applied | Exception, index: int) -> pb.WriteResult:
        if isinstance(outcome, Exception):
            refusal = outcome if isinstance(outcome, EXHAUSTED_TYPES) else storage_full(outcome)
            if refusal is not None:
                # Over a quota, or no room on the disk: refused, nothing of it stored.
                return _refused_write(self._quotas.counted(refusal), index)
        return _write_result(outcome, index)

    async def _submit_in_turn(self, obj: ObjectId, op: Operation[Applied]) -> Applied:
        async with self._locks.holding(obj):
            future = self._storage.submit(op)
        return await future

    # -- transactions --------------------------------------------------------------------

    async def Transaction(self, request_iterator: Any, context: Any) -> None:
        """begin → (get | list)* → commit, on one stream; see TransactionRequest."""
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        if first.WhichOneof("step") != "begin":
            await _invalid(context, "a transaction starts with begin")
        begin = first.begin
        try:
            obj = self._quotas.object_id(begin.object)
        except REFUSAL_TYPES as exc:
            await refuse(context, exc)
        await require_owner(context, self._context.ownership, obj)
        await stored(context, self._leases.check_outside_writes([obj]))
        try:
            self._leases.admit_outside_write(obj, time.monotonic())
        except ObjectActive as exc:
            await refuse_active(context, exc)
        key = begin.idempotency_key
        replay = await self._replay(context, key)
        if replay is not None:
            await context.write(pb.TransactionResponse(begun=replay))
            return
        timeout_s = self._context.config.transaction_timeout_s
        held = False
        try:
            async with asyncio.timeout(timeout_s):
                await self._locks.acquire(obj)
                held = True
                # A copy of this transaction (a redelivered event) may have committed while
                # this one waited for the object.
                replay = await self._replay(context, key)
                if replay is not None:
                    await context.write(pb.TransactionResponse(begun=replay))
                    return
                await context.write(pb.TransactionResponse(begun=pb.TransactionBegun()))
                while True:
                    request = await context.read()
                    if request is grpc.aio.EOF:
                        return  # the client ended without commit: aborted, nothing written
                    step = request.WhichOneof("step")
                    if step == "commit":
                        break
                    await context.write(await self._transaction_read(context, obj, request))
                try:
                    op = _commit_op(obj, request.commit, key, self._quotas.objects)
                    if any(w.WhichOneof("op") == "put" for w in request.commit.writes):
                        self._quotas.check_disk()
                    # Again: an activation may have taken the object while this one ran.
                    self._leases.admit_outside_write(obj, time.monotonic())
                except REFUSAL_TYPES as exc:
                    await refuse(context, exc)
                except ObjectActive as exc:
                    await refuse_active(context, exc)
                future = self._storage.submit(op)
                # Submitted: whatever comes next is ordered after it by the queue.
                self._locks.release(obj)
                held = False
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.ABORTED,
                f"transaction on {obj.namespace}/{obj.name} took longer than {timeout_s:g} s; "
                "none of its writes were applied",
            )
        finally:
            if held:
                self._locks.release(obj)
        # Outside the deadline: once submitted, the commit is the storage's to finish.
        await stored(context, future, self._quotas)
        await context.write(pb.TransactionResponse(committed=pb.TransactionCommitted()))

    async def _replay(self, context: Any, key: str) -> pb.TransactionBegun | None:
        if not key:
            return None
        applied = await stored(context, self._storage.submit(LookupApplied(key)))
        if applied is None:
            return None
        return pb.TransactionBegun(replayed=True, result=applied.result or b"")

    async def _transaction_read(
        self, context: Any, obj: ObjectId, request: pb.TransactionRequest
    ) -> pb.TransactionResponse:
        step = request.WhichOneof("step")
        if step not in ("get", "list"):
            await _invalid(context, f"unexpected {step or 'empty'} step in a transaction")
        try:
            op: Operation[list[tuple[str, bytes]]] = (
                _get_op(obj, request.get) if step == "get" else _list_op(obj, request.list)
            )
        except REFUSAL_TYPES as exc:
            await refuse(context, exc)
        found = await stored(context, self._storage.submit(op))
        entries = [pb.Entry(key=k, value=v) for k, v in found]
        if step == "get":
            return pb.TransactionResponse(get=pb.GetResponse(entries=entries))
        return pb.TransactionResponse(list=pb.ListResponse(entries=entries))


def _refused_write(exc: Exception, index: int) -> pb.WriteResult:
    """The result of a write refused for bad input, a quota or the disk."""
    assert isinstance(exc, REFUSAL_TYPES)
    failure = pb.WriteFailure(
        code=refusal_code(exc).value[0], details=str(exc), info=error_info(exc)
    )
    return pb.WriteResult(failure=failure, index=index)


def _write_result(outcome: Applied | Exception, index: int) -> pb.WriteResult:
    if isinstance(outcome, Exception):
        # The disk failed this write (or its batch's commit): nothing of it was stored.
        log.error("write failed: %s", outcome)
        failure = pb.WriteFailure(
            code=grpc.StatusCode.INTERNAL.value[0], details=f"storage failed: {outcome}"
        )
        return pb.WriteResult(failure=failure, index=index)
    return pb.WriteResult(count=outcome.count, replayed=outcome.replayed, index=index)


class _WriteGroup:
    """The free writes of one Write call, in order, each applied on its own: one storage
    operation (one future, one queue entry) instead of one per write.

    Returns each write's outcome or exception. The first run uses no savepoints; if a
    write raises, the group raises too, the storage runs the batch again, and this time
    each write runs in a savepoint of its own and fails alone.
    """

    __slots__ = ("careful", "ops")
    writes = True

    def __init__(self, ops: list[Operation[Applied]]) -> None:
        self.ops = ops
        self.careful = False

    @property
    def write_count(self) -> int:
        """How many writes this operation is (for the storage's statistics)."""
        return len(self.ops)

    def __call__(self, conn: Sql) -> list[Applied | Exception]:
        if not self.careful:
            try:
                return [op(conn) for op in self.ops]
            except Exception as exc:
                # A lost transaction (deadlock) is the batch's to run again, not a write's.
                self.careful = not isinstance(exc, RETRY_WHOLE_BATCH)
                raise
        outcomes: list[Applied | Exception] = []
        for op in self.ops:
            conn.execute("SAVEPOINT write")
            try:
                outcomes.append(op(conn))
            except Exception as exc:
                if isinstance(exc, RETRY_WHOLE_BATCH):
                    raise
                conn.execute("ROLLBACK TO write")
                outcomes.append(exc)
            conn.execute("RELEASE write")
        return outcomes


async def _invalid(context: Any, details: str) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details)


# -- requests to operations (checking every limit) ------------------------------------------


def _get_op(obj: ObjectId, request: pb.GetRequest) -> GetKeys:
    keys = request.keys
    check_batch(len(keys), keys[0] if keys else "")
    return GetKeys(obj, tuple(check_key(key) for key in keys))


def _list_op(obj: ObjectId, request: pb.ListRequest) -> ListQuery:
    return ListQuery(
        obj=obj,
        prefix=request.prefix.encode(),
        start=request.start.encode() if request.HasField("start") else None,
        end=request.end.encode() if request.HasField("end") else None,
        # On the wire 0 means no limit (proto3 cannot tell 0 from unset).
        limit=request.limit or None,
        reverse=request.reverse,
    )


def _write_op(
    write: pb.Write, quotas: Quotas, objects: dict[tuple[str, str], ObjectId]
) -> tuple[ObjectId, Operation[int]]:
    kind = write.WhichOneof("op")
    if kind == "put":
        obj = _cached_object_id(write.put.object, quotas, objects)
        return obj, _put_op(obj, write.put.entries, quotas.objects)
    if kind == "delete":
        obj = _cached_object_id(write.delete.object, quotas, objects)
        return obj, _delete_op(obj, write.delete.keys)
    if kind == "delete_all":
        obj = _cached_object_id(write.delete_all.object, quotas, objects)
        return obj, DeleteAll(obj)
    raise InvalidRequest("a write names no operation")


def _write_objects(request: pb.WriteRequest) -> list[ObjectId]:
    """The objects a Write call's well-formed writes name (malformed ones are refused
    later, one by one)."""
    found: list[ObjectId] = []
    for write in request.writes:
        kind = write.WhichOneof("op")
        if kind is None:
            continue
        message = getattr(write, kind).object
        if message.namespace:
            found.append(ObjectId(message.namespace, message.name))
    return found


def _cached_object_id(
    message: pb.ObjectId, quotas: Quotas, objects: dict[tuple[str, str], ObjectId]
) -> ObjectId:
    pair = (message.namespace, message.name)
    obj = objects.get(pair)
    if obj is None:
        obj = objects[pair] = quotas.object_id(message)
    return obj


def _put_op(obj: ObjectId, entries: Any, quotas: ObjectQuotas | None = None) -> PutKeys:
    check_batch(len(entries), entries[0].key if entries else "")
    checked = []
    for entry in entries:
        key = check_key(entry.key)
        # Size first: it is cheap, and parsing a huge value is not.
        check_value_size(entry.value, entry.key)
        # Parsed only to refuse garbage; the bytes are stored as received.
        decode_value(entry.value)
        checked.append((key, entry.value))
    return PutKeys(obj, tuple(checked), quotas)


def _delete_op(obj: ObjectId, keys: Any) -> DeleteKeys:
    check_batch(len(keys), keys[0] if keys else "")
    return DeleteKeys(obj, tuple(check_key(key) for key in keys))


def _keyed(op: Operation[int], idempotency_key: str) -> Operation[Applied]:
    return Idempotent(op, idempotency_key) if idempotency_key else _Unkeyed(op)


class _Unkeyed:
    """A write without an idempotency key, answering like a keyed one."""

    __slots__ = ("op",)
    writes = True

    def __init__(self, op: Operation[int]) -> None:
        self.op = op

    def __call__(self, conn: Any) -> Applied:
        return Applied(self.op(conn))


class _Atomic:
    """A transaction's writes, in order, all in one savepoint (all or none)."""

    __slots__ = ("ops",)
    writes = True

    def __init__(self, ops: list[Operation[int]]) -> None:
        self.ops = ops

    def __call__(self, conn: Any) -> int:
        return sum(op(conn) for op in self.ops)


def object_write_ops(obj: ObjectId, writes: Iterable[pb.Write]) -> tuple[list[Operation[int]], int]:
    """The operations of ``writes`` on ``obj`` (whatever object each write names), with
    every limit checked, and how many keys they name in all. Raises a refusal. The quotas
    are not checked op by op: the caller checks the writes together (CheckedGrowth)."""
    ops: list[Operation[int]] = []
    keys = 0
    for write in writes:
        kind = write.WhichOneof("op")
        if kind == "put":
            keys += len(write.put.entries)
            ops.append(_put_op(obj, write.put.entries))
        elif kind == "delete":
            keys += len(write.delete.keys)
            ops.append(_delete_op(obj, write.delete.keys))
        elif kind == "delete_all":
            ops.append(DeleteAll(obj))
        else:
            raise InvalidRequest("a write names no operation")
    return ops, keys


def first_put(writes: Iterable[pb.Write]) -> str | None:
    """The first key that ``writes`` put, or None if they put none."""
    for write in writes:
        if write.WhichOneof("op") == "put":
            return write.put.entries[0].key if write.put.entries else ""
    return None


def _commit_op(
    obj: ObjectId, commit: pb.TransactionCommit, key: str, quotas: ObjectQuotas
) -> Operation[Applied]:
    # The transaction's object, whatever the writes name.
    ops, keys = object_write_ops(obj, commit.writes)
    check_batch(keys)
    if commit.result:
        decode_value(commit.result)
    # All or none, and checked against the quotas together (a put the transaction's
    # delete makes room for fits), as the worker's activations count a transaction.
    putting = first_put(commit.writes)
    atomic: Operation[int] = (
        CheckedGrowth(obj, tuple(ops), quotas, putting) if putting is not None else _Atomic(ops)
    )
    if key:
        return Idempotent(atomic, key, result=commit.result or None)
    return _Unkeyed(atomic)
