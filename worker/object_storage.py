"""Durable objects' key/value storage, as handlers use it: :class:`ObjectStorage` and,
inside :meth:`ObjectStorage.transaction`, :class:`Transaction`.

Writes start when they are called, as in Cloudflare Durable Objects: ``put``, ``delete``
and the rest return a future that resolves once the write is durable, and a handler may
await it or not. Either way the handler's output waits for it (the output gate,
:mod:`wsgate.worker.gate`), and inside a handler every write carries an idempotency key, so a
redelivered event's writes are applied once.

Values go through :mod:`wsgate.values`: a value that cannot be stored raises InvalidValue
at the call. Limits (key and value sizes, keys per call) and the object id are checked by
the state service, the one authority on them, and come back as the same typed exceptions
(:class:`~wsgate.errors.KeyTooLarge` with ``size``, ``limit`` and ``key``, ...).
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, TypeVar, cast

import grpc

from wsgate.errors import InvalidRequest, NotOwner
from wsgate.v1 import state_pb2 as pb
from wsgate.values import StorableValue, Value, decode_value, encode_value
from wsgate.worker.gate import current_gate
from wsgate.worker.state_endpoint import DuplexCall
from wsgate.worker.state_writes import MAX_REDIRECTS, result_count

if TYPE_CHECKING:
    from wsgate.worker.state_client import StateClient

T = TypeVar("T")

#: The largest ``limit`` the wire carries (a uint32); larger ones mean "no limit".
_MAX_WIRE_LIMIT = 2**32 - 1


class ObjectStorage:
    """Key/value storage of one durable object, as a handler sees it.

    Keys are str (at most 2 KiB of UTF-8, at most 128 in one call); values are what
    :mod:`wsgate.values` stores (JSON types plus bytes, at most 128 KiB encoded). Every
    method raises StateUnavailable, StateTimeout, or the refusal's own StateError
    (KeyTooLarge, ValueTooLarge, TooManyKeys, InvalidValue, InvalidObjectId).

    Reads are coroutines. Writes (``put``, ``put_many``, ``delete``, ``delete_many``,
    ``delete_all``, ``transaction``) start at once and return a future that resolves when
    the write is durable; within a handler, its output waits for them (the output gate).
    """

    def __init__(self, client: StateClient, namespace: str, name: str) -> None:
        self._client = client
        self.namespace = namespace
        self.name = name
        self._object = pb.ObjectId(namespace=namespace, name=name)

    def __repr__(self) -> str:
        return f"<ObjectStorage {self.namespace!r}/{self.name!r}>"

    # -- reads ---------------------------------------------------------------------------

    async def get(self, key: str, default: Value = None) -> Value:
        """The value of ``key``, or ``default`` if it does not exist."""
        found = await self.get_many([key])
        return found.get(key, default)

    async def get_many(self, keys: Iterable[str]) -> dict[str, Value]:
        """The values of the keys that exist (at most 128 keys)."""
        request = pb.GetRequest(object=self._object, keys=list(keys))
        response = await self._client.kv.get(request)
        return {entry.key: decode_value(entry.value) for entry in response.entries}

    async def list(
        self,
        *,
        prefix: str = "",
        start: str | None = None,
        end: str | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> dict[str, Value]:
        """The entries whose keys start with ``prefix``, are ``>= start`` and ``< end``,
        as a dict in ascending UTF-8 byte order of keys (descending if ``reverse``).

        ``limit`` keeps the first entries in that order (with ``reverse``, the greatest
        keys); None means all, 0 means none. Raises ValueError for a negative limit.
        """
        request = _list_request(self._object, prefix, start, end, limit, reverse)
        if request is None:
            return {}
        response = await self._client.kv.list(request)
        return {entry.key: decode_value(entry.value) for entry in response.entries}

    # -- writes --------------------------------------------------------------------------

    def put(self, key: str, value: StorableValue) -> asyncio.Future[None]:
        """Set ``key`` to ``value``. Raises InvalidValue at once if it cannot be stored."""
        return self.put_many({key: value})

    def put_many(self, entries: Mapping[str, StorableValue]) -> asyncio.Future[None]:
        """Set every key of ``entries`` (at most 128), atomically."""
        encoded = [pb.Entry(key=key, value=encode_value(value)) for key, value in entries.items()]
        write = pb.Write(put=pb.PutRequest(object=self._object, entries=encoded))
        return self._start(write, lambda count: None)

    def delete(self, key: str) -> asyncio.Future[bool]:
        """Delete ``key``; resolves to whether it existed."""
        return self._start(
            pb.Write(delete=pb.DeleteRequest(object=self._object, keys=[key])),
            lambda count: count > 0,
        )

    def delete_many(self, keys: Iterable[str]) -> asyncio.Future[int]:
        """Delete the keys (at most 128), atomically; resolves to how many existed."""
        return self._start(
            pb.Write(delete=pb.DeleteRequest(object=self._object, keys=list(keys))),
            lambda count: count,
        )

    def delete_all(self) -> asyncio.Future[int]:
        """Delete every key of the object; resolves to how many there were."""
        return self._start(
            pb.Write(delete_all=pb.DeleteAllRequest(object=self._object)), lambda count: count
        )

    def transaction(
        self, fn: Callable[[Transaction], Awaitable[T]], *, timeout_s: float | None = None
    ) -> asyncio.Future[T]:
        """Run ``fn(txn)`` as one atomic read-modify-write of this object; resolves to what
        ``fn`` returned, once its writes are durable.

        While ``fn`` runs the object is held for it: other writes to it wait, so what ``fn``
        read is still true when its writes apply. Keep ``fn`` short: the state service
        aborts a transaction that holds its object longer than its transaction timeout
        (TransactionAborted, nothing written). If ``fn`` raises, nothing is written and the
        exception propagates. In a handler the transaction has an idempotency key: when a
        redelivered event runs it again after it committed, ``fn`` is not run again and
        the first result is returned, so ``fn``'s result must be a storable value.
        """
        gate = current_gate.get()
        key = gate.next_key() if gate is not None else ""
        task = asyncio.ensure_future(self._transaction(fn, key, timeout_s))
        if gate is not None:
            gate.hold(task)
        return task

    def _start(self, write: pb.Write, convert: Callable[[int], T]) -> asyncio.Future[T]:
        gate = current_gate.get()
        if gate is not None:
            write.idempotency_key = gate.next_key()
        future = asyncio.ensure_future(_await_write(self._client.kv.write(write), convert))
        if gate is not None:
            gate.hold(future)
        return future

    async def _transaction(
        self, fn: Callable[[Transaction], Awaitable[T]], key: str, timeout_s: float | None
    ) -> T:
        address = self._client.owner_address(self._object)
        for attempt in range(MAX_REDIRECTS + 1):
            try:
                return await self._transaction_at(address, fn, key, timeout_s)
            except NotOwner as exc:
                # Refused at begin, before fn ran: make it at the owner instead.
                if attempt == MAX_REDIRECTS:
                    raise
                address = self._client.follow(exc, self._object, attempt)
        raise AssertionError("unreachable")

    async def _transaction_at(
        self,
        address: str,
        fn: Callable[[Transaction], Awaitable[T]],
        key: str,
        timeout_s: float | None,
    ) -> T:
        endpoint = self._client.endpoint(address)
        call = endpoint.transaction_call(
            timeout_s=timeout_s or self._client.timeout_s,
            wait_for_ready=self._client.waits_for_ready,
        )
        try:
            begin = pb.TransactionBegin(object=self._object, idempotency_key=key)
            begun = (await _step(call, pb.TransactionRequest(begin=begin))).begun
            if begun.replayed:
                # What fn returned the first time (a storable value, as the contract says).
                return cast(T, decode_value(begun.result) if begun.result else None)
            txn = Transaction(self._object, call)
            result = await fn(txn)
            txn._finished = True
            encoded = b"" if result is None else encode_value(result)
            commit = pb.TransactionCommit(writes=txn._commit_writes(), result=encoded)
            await _step(call, pb.TransactionRequest(commit=commit))
            await call.done_writing()
            return result
        except grpc.RpcError as exc:
            raise self._client.error(exc, "Transaction", endpoint) from exc
        except asyncio.CancelledError:
            raise endpoint.gone_or_cancelled() from None
        finally:
            endpoint.untrack(call)
            # Ending the stream without a commit is the abort: nothing was written.
            call.cancel()


async def _await_write(future: asyncio.Future[pb.WriteResult], convert: Callable[[int], T]) -> T:
    return convert(result_count(await future))


async def _step(call: DuplexCall, request: pb.TransactionRequest) -> pb.TransactionResponse:
    try:
        await call.write(request)
        response = await call.read()
    except asyncio.InvalidStateError:
        response = grpc.aio.EOF  # the service already ended the call (aborted it)
    if not isinstance(response, pb.TransactionResponse):  # grpc.aio.EOF
        # The service ended the stream: its status says why; raised as the call's error.
        raise grpc.aio.AioRpcError(
            await call.code(),
            await call.initial_metadata(),
            await call.trailing_metadata(),
            await call.details(),
        )
    return response


def _list_request(
    obj: pb.ObjectId,
    prefix: str,
    start: str | None,
    end: str | None,
    limit: int | None,
    reverse: bool,
) -> pb.ListRequest | None:
    """The ListRequest for these bounds, or None when ``limit`` is 0 (nothing to ask)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    if limit == 0:
        # The wire's 0 means "no limit", so "none" is answered here.
        return None
    wire_limit = 0 if limit is None or limit > _MAX_WIRE_LIMIT else limit
    request = pb.ListRequest(object=obj, prefix=prefix, limit=wire_limit, reverse=reverse)
    if start is not None:
        request.start = start
    if end is not None:
        request.end = end
    return request


#: In a transaction's overlay: the key was deleted by the transaction.
_DELETED = object()


class Transaction:
    """The storage of one object inside :meth:`ObjectStorage.transaction`.

    Reads see the object as committed, overlaid with this transaction's own writes. Writes
    are kept here and applied together at the end, all or none (at most 128 keys).
    ``delete`` does not say whether the key existed (``await txn.get(key)`` does).
    Valid only while the transaction function runs.
    """

    def __init__(self, obj: pb.ObjectId, call: DuplexCall | None) -> None:
        self._object = obj
        # None for a subclass that reads otherwise (an activation's cached transaction).
        self._call = call
        self._cleared = False
        # key -> encoded value, or _DELETED; insertion order is the order of the writes.
        self._overlay: dict[str, bytes | object] = {}
        self._finished = False

    async def get(self, key: str, default: Value = None) -> Value:
        """The value of ``key`` as this transaction sees it, or ``default``."""
        found = await self.get_many([key])
        return found.get(key, default)

    async def get_many(self, keys: Iterable[str]) -> dict[str, Value]:
        """The values of the keys that exist, as this transaction sees them."""
        self._check_open()
        keys = list(keys)
        remote = [k for k in keys if k not in self._overlay] if not self._cleared else []
        found: dict[str, bytes] = {}
        if remote:
            request = pb.TransactionRequest(get=pb.GetRequest(keys=remote))
            for entry in (await _step(self._stream(), request)).get.entries:
                found[entry.key] = entry.value
        result: dict[str, Value] = {}
        for key in keys:
            local = self._overlay.get(key)
            if isinstance(local, bytes):
                result[key] = decode_value(local)
            elif local is None and key in found:
                result[key] = decode_value(found[key])
        return result

    async def list(
        self,
        *,
        prefix: str = "",
        start: str | None = None,
        end: str | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> dict[str, Value]:
        """As :meth:`ObjectStorage.list`, as this transaction sees the object."""
        self._check_open()
        request = _list_request(self._object, prefix, start, end, limit, reverse)
        if request is None:
            return {}

        def in_range(key: str) -> bool:
            return (
                key.startswith(prefix)
                and (start is None or key.encode() >= start.encode())
                and (end is None or key.encode() < end.encode())
            )

        mine = {k: v for k, v in self._overlay.items() if in_range(k)}
        merged: dict[str, bytes] = {}
        if not self._cleared:
            if limit is not None and request.limit:
                # Each of our deletes in range may hide one remote entry: ask for that many
                # more, so at least ``limit`` survive when the object has them.
                hidden = sum(1 for v in mine.values() if v is _DELETED)
                request.limit = min(limit + hidden, _MAX_WIRE_LIMIT)
            response = await _step(self._stream(), pb.TransactionRequest(list=request))
            merged = {entry.key: entry.value for entry in response.list.entries}
        for key, value in mine.items():
            if isinstance(value, bytes):
                merged[key] = value
            else:
                merged.pop(key, None)
        ordered = sorted(merged, key=lambda k: k.encode(), reverse=reverse)
        if limit is not None:
            ordered = ordered[:limit]
        return {key: decode_value(merged[key]) for key in ordered}

    def put(self, key: str, value: StorableValue) -> None:
        """Set ``key`` when the transaction commits. Raises InvalidValue at once."""
        self._check_open()
        self._overlay[key] = encode_value(value)

    def put_many(self, entries: Mapping[str, StorableValue]) -> None:
        """Set every key of ``entries`` when the transaction commits."""
        for key, value in entries.items():
            self.put(key, value)

    def delete(self, key: str) -> None:
        """Delete ``key`` when the transaction commits."""
        self._check_open()
        self._overlay[key] = _DELETED

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete the keys when the transaction commits."""
        for key in keys:
            self.delete(key)

    def delete_all(self) -> None:
        """Delete every key when the transaction commits (later puts still apply)."""
        self._check_open()
        self._cleared = True
        self._overlay.clear()

    def _stream(self) -> DuplexCall:
        if self._call is None:
            raise AssertionError("this transaction reads through no stream")
        return self._call

    def _check_open(self) -> None:
        if self._finished:
            raise InvalidRequest("the transaction is over; use it only inside its function")

    def _commit_writes(self) -> builtins.list[pb.Write]:
        writes: builtins.list[pb.Write] = []
        if self._cleared:
            writes.append(pb.Write(delete_all=pb.DeleteAllRequest()))
        deleted = [k for k, v in self._overlay.items() if v is _DELETED]
        if deleted:
            writes.append(pb.Write(delete=pb.DeleteRequest(keys=deleted)))
        entries = [
            pb.Entry(key=k, value=v) for k, v in self._overlay.items() if isinstance(v, bytes)
        ]
        if entries:
            writes.append(pb.Write(put=pb.PutRequest(entries=entries)))
        return writes
