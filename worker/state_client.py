"""The workers' client of the state service: durable object storage over gRPC.

::

    async with StateClient("127.0.0.1:7070") as state:
        room = state.storage("room", "lobby")
        await room.put("topic", {"text": "hello", "votes": [1, 2]})
        topic = await room.get("topic")
        count = await room.transaction(increment)   # atomic read-modify-write

Writes start when they are called, as in Cloudflare Durable Objects: ``put``, ``delete``
and the rest return a future that resolves once the write is durable, and a handler may
await it or not. Either way the handler's output waits for it (the output gate,
:mod:`worker.gate`), and inside a handler every write carries an idempotency key, so a
redelivered event's writes are applied once.

Writes from concurrent callers are coalesced: what is called in one turn of the event loop
(and while earlier calls are in flight) travels in one ``Write`` call, and the state service
commits it in one batch. Each write still succeeds or fails on its own.

Values go through :mod:`wsgate.values`: a value that cannot be stored raises InvalidValue
at the call. Limits (key and value sizes, keys per call) and the object id are checked by
the state service, the one authority on them, and come back as the same typed exceptions
(:class:`~wsgate.errors.KeyTooLarge` with ``size``, ``limit`` and ``key``, ...).
"""

from __future__ import annotations

import asyncio
import builtins
import enum
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import grpc

from worker.gate import current_gate
from wsgate.errors import InvalidRequest, StateError, StateUnavailable
from wsgate.service import StartsAndCloses
from wsgate.state_errors import exception_from_error_info, exception_from_rpc_error
from wsgate.v1 import state_pb2 as pb
from wsgate.v1 import state_pb2_grpc
from wsgate.values import decode_value, encode_value

T = TypeVar("T")

#: The largest ``limit`` the wire carries (a uint32); larger ones mean "no limit".
_MAX_WIRE_LIMIT = 2**32 - 1

#: Write calls in flight at once; more writes wait and travel together in the next call.
MAX_WRITE_CALLS_IN_FLIGHT = 4
#: A Write call carries at most this many writes ...
MAX_WRITES_PER_CALL = 64
#: ... and about this many bytes (gRPC's default message limit is 4 MiB).
MAX_WRITE_CALL_BYTES = 4 * 1024 * 1024

#: A Write call that failed with UNAVAILABLE is tried again after this, doubling up to ...
RETRY_FIRST_BACKOFF_S = 0.05
#: ... this, for as long as the client's deadline allows.
RETRY_MAX_BACKOFF_S = 1.0

_CHANNEL_OPTIONS = (
    # A list answer is bounded by what the object holds, not by gRPC's 4 MiB default;
    # the caller bounds it with ``limit``.
    ("grpc.max_receive_message_length", -1),
    # After the state service restarts, reconnect within seconds: the default backoff
    # grows to 120 s, failing every call fast with UNAVAILABLE meanwhile.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


class ClientPhase(enum.Enum):
    """The client's lifecycle; it only moves forward."""

    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class StateClient(StartsAndCloses):
    """A gRPC channel to one state service.

    Use ``async with StateClient(address)`` or call :meth:`start`, then :meth:`close`.
    ``start`` does not wait for the service: the channel connects on the first call, so a
    worker may start before the state service. A call waits for the service to be
    reachable (a restart, say) within its deadline of ``timeout_s`` seconds; after it,
    StateTimeout, or StateUnavailable when the service could not be reached at all.
    """

    def __init__(self, address: str, *, timeout_s: float = 5.0) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.address = address
        self.timeout_s = timeout_s
        self.phase = ClientPhase.NEW
        self._channel: Any = None  # grpc.aio.Channel while open
        self._stubs: dict[str, Any] = {}  # service name -> stub, while open
        self._writes = _WritePipeline(self)

    async def start(self) -> None:
        """Create the channel. Idempotent while open; RuntimeError once closed."""
        if self.phase is ClientPhase.OPEN:
            return
        if self.phase is ClientPhase.CLOSED:
            raise RuntimeError("state client is closed; make a new StateClient")
        self._channel = grpc.aio.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
        self._stubs = {
            "State": state_pb2_grpc.StateStub(self._channel),
            "Membership": state_pb2_grpc.MembershipStub(self._channel),
            "Alarms": state_pb2_grpc.AlarmsStub(self._channel),
            "Activations": state_pb2_grpc.ActivationsStub(self._channel),
        }
        self.phase = ClientPhase.OPEN

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled. Idempotent."""
        if self.phase is ClientPhase.CLOSED:
            return
        self.phase = ClientPhase.CLOSED
        channel, self._channel = self._channel, None
        self._stubs = {}
        if channel is not None:
            await channel.close()

    async def wait_closed(self) -> None:
        """Nothing to wait for once :meth:`close` returned; here for the common lifecycle."""

    def storage(self, namespace: str, name: str) -> ObjectStorage:
        """The storage of the durable object ``name`` in ``namespace``.

        Cheap (no call is made); usable once the client is started. An empty namespace is
        refused by the service at the first call (InvalidObjectId).
        """
        return ObjectStorage(self, namespace, name)

    def stub(self, service: str) -> Any:
        """The stub of ``service`` ("State", "Membership", "Alarms", "Activations");
        RuntimeError unless open."""
        stub = self._stubs.get(service)
        if self.phase is not ClientPhase.OPEN or stub is None:
            raise RuntimeError(f"state client is {self.phase.value}, not open")
        return stub

    async def unary(
        self, service: str, method: str, request: Any, *, timeout_s: float | None = None
    ) -> Any:
        """Call ``service.method`` (e.g. ``"Membership", "Join"``) with ``request``.

        Waits for the channel to be ready (a restarting state service) up to the deadline
        (``timeout_s``, by default the client's); failures come back as the state exception
        tree (:func:`wsgate.state_errors.exception_from_rpc_error`).
        """
        stub = self.stub(service)
        try:
            return await getattr(stub, method)(
                request, timeout=timeout_s or self.timeout_s, wait_for_ready=True
            )
        except grpc.RpcError as exc:
            raise self._error(exc, method) from exc

    def _error(self, exc: grpc.RpcError, what: str) -> StateError:
        error = exception_from_rpc_error(exc, what)
        channel = self._channel
        if (
            isinstance(error, TimeoutError)
            and channel is not None
            and channel.get_state() is not grpc.ChannelConnectivity.READY
        ):
            # The deadline passed while waiting for the service, not for its answer.
            return StateUnavailable(f"state service at {self.address} unreachable: {error}")
        return error

    def write(self, write: pb.Write) -> asyncio.Future[pb.WriteResult]:
        """Queue ``write`` for the next Write call; the future resolves with its result."""
        return self._writes.submit(write)


class _WritePipeline:
    """Coalesces concurrent writes into few Write calls.

    A write called while fewer than MAX_WRITE_CALLS_IN_FLIGHT calls are out goes at the end
    of this turn of the event loop, with every write called in the same turn; otherwise it
    waits for a call to finish, and goes with everything that queued meanwhile. So a lone
    write pays one round trip, and under load one call (and one commit) serves many.
    """

    def __init__(self, client: StateClient) -> None:
        self._client = client
        self._queue: list[tuple[pb.Write, asyncio.Future[pb.WriteResult]]] = []
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, write: pb.Write) -> asyncio.Future[pb.WriteResult]:
        self._client.stub("State")  # RuntimeError now, not later, unless open
        loop = asyncio.get_running_loop()
        future: asyncio.Future[pb.WriteResult] = loop.create_future()
        self._queue.append((write, future))
        if not self._scheduled and self._in_flight < MAX_WRITE_CALLS_IN_FLIGHT:
            self._scheduled = True
            loop.call_soon(self._send_queued)
        return future

    def _send_queued(self) -> None:
        self._scheduled = False
        loop = asyncio.get_running_loop()
        while self._queue and self._in_flight < MAX_WRITE_CALLS_IN_FLIGHT:
            batch = self._take_batch()
            self._in_flight += 1
            task = loop.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take_batch(self) -> list[tuple[pb.Write, asyncio.Future[pb.WriteResult]]]:
        size = 0
        count = 0
        for write, _ in self._queue:
            size += write.ByteSize()
            if count and (count >= MAX_WRITES_PER_CALL or size > MAX_WRITE_CALL_BYTES):
                break
            count += 1
        batch = self._queue[:count]
        del self._queue[:count]
        return batch

    async def _send(self, batch: list[tuple[pb.Write, asyncio.Future[pb.WriteResult]]]) -> None:
        """One Write call for ``batch``; each future resolves with its write's result.

        The call's slot is given back with its first answer: what is still unanswered then
        waits behind a transaction holding its object, and must not keep other writes from
        going out. A call the service dropped mid-way (UNAVAILABLE: a restart) is made again
        for the writes not answered yet, within the client's deadline. That is safe: a keyed
        write is recognised if it was applied, and an unkeyed one (outside handlers) sets,
        deletes or clears absolutely, so applying it twice leaves what applying it once does
        unless another writer wrote the same key in between.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._client.timeout_s
        backoff_s = RETRY_FIRST_BACKOFF_S
        unanswered = dict(enumerate(batch))
        holding_slot = True
        try:
            while unanswered:
                positions = list(unanswered)
                request = pb.WriteRequest(writes=[unanswered[i][0] for i in positions])
                try:
                    call = self._client.stub("State").Write(
                        request,
                        timeout=max(deadline - loop.time(), 0.001),
                        wait_for_ready=True,
                    )
                    async for response in call:
                        for result in response.results:
                            _, future = unanswered.pop(positions[result.index])
                            if not future.done():
                                future.set_result(result)
                        if holding_slot:
                            holding_slot = False
                            self._release_slot()
                    if unanswered:
                        raise StateError(f"state service left {len(unanswered)} writes unanswered")
                    return
                except grpc.RpcError as exc:
                    error = self._client._error(exc, "Write")
                    if isinstance(error, StateUnavailable) and loop.time() + backoff_s < deadline:
                        await asyncio.sleep(backoff_s)
                        backoff_s = min(backoff_s * 2, RETRY_MAX_BACKOFF_S)
                        continue
                    raise error from exc
        except Exception as exc:
            for _, future in unanswered.values():
                if not future.done():
                    future.set_exception(exc)
        finally:
            if holding_slot:
                self._release_slot()

    def _release_slot(self) -> None:
        self._in_flight -= 1
        if self._queue and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send_queued)


def _result_count(result: pb.WriteResult) -> int:
    """The count of a successful write, or its failure raised as the typed exception."""
    if result.WhichOneof("outcome") == "failure":
        failure = result.failure
        if failure.info.reason:
            raise exception_from_error_info(failure.info, failure.details)
        code = _status_name(failure.code)
        raise StateError(f"state service failed a write with {code}: {failure.details}")
    return result.count


def _status_name(code: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return str(code)


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

    async def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` if it does not exist."""
        found = await self.get_many([key])
        return found.get(key, default)

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The values of the keys that exist (at most 128 keys)."""
        request = pb.GetRequest(object=self._object, keys=list(keys))
        response = await self._client.unary("State", "Get", request)
        return {entry.key: decode_value(entry.value) for entry in response.entries}

    async def list(
        self,
        *,
        prefix: str = "",
        start: str | None = None,
        end: str | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> dict[str, Any]:
        """The entries whose keys start with ``prefix``, are ``>= start`` and ``< end``,
        as a dict in ascending UTF-8 byte order of keys (descending if ``reverse``).

        ``limit`` keeps the first entries in that order (with ``reverse``, the greatest
        keys); None means all, 0 means none. Raises ValueError for a negative limit.
        """
        request = _list_request(self._object, prefix, start, end, limit, reverse)
        if request is None:
            return {}
        response = await self._client.unary("State", "List", request)
        return {entry.key: decode_value(entry.value) for entry in response.entries}

    # -- writes --------------------------------------------------------------------------

    def put(self, key: str, value: Any) -> asyncio.Future[None]:
        """Set ``key`` to ``value``. Raises InvalidValue at once if it cannot be stored."""
        return self.put_many({key: value})

    def put_many(self, entries: Mapping[str, Any]) -> asyncio.Future[None]:
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
        future = asyncio.ensure_future(_await_write(self._client.write(write), convert))
        if gate is not None:
            gate.hold(future)
        return future

    async def _transaction(
        self, fn: Callable[[Transaction], Awaitable[T]], key: str, timeout_s: float | None
    ) -> T:
        call = self._client.stub("State").Transaction(
            timeout=timeout_s or self._client.timeout_s, wait_for_ready=True
        )
        try:
            begin = pb.TransactionBegin(object=self._object, idempotency_key=key)
            begun = (await _step(call, pb.TransactionRequest(begin=begin))).begun
            if begun.replayed:
                replayed: Any = decode_value(begun.result) if begun.result else None
                return replayed  # what fn returned the first time
            txn = Transaction(self._object, call)
            result = await fn(txn)
            txn._finished = True
            encoded = b"" if result is None else encode_value(result)
            commit = pb.TransactionCommit(writes=txn._commit_writes(), result=encoded)
            await _step(call, pb.TransactionRequest(commit=commit))
            await call.done_writing()
            return result
        except grpc.RpcError as exc:
            raise self._client._error(exc, "Transaction") from exc
        finally:
            # Ending the stream without a commit is the abort: nothing was written.
            call.cancel()


async def _await_write(future: asyncio.Future[pb.WriteResult], convert: Callable[[int], T]) -> T:
    return convert(_result_count(await future))


async def _step(call: Any, request: pb.TransactionRequest) -> pb.TransactionResponse:
    try:
        await call.write(request)
        response = await call.read()
    except asyncio.InvalidStateError:
        response = grpc.aio.EOF  # the service already ended the call (aborted it)
    if response is grpc.aio.EOF:
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

    def __init__(self, obj: pb.ObjectId, call: Any) -> None:
        self._object = obj
        self._call = call
        self._cleared = False
        # key -> encoded value, or _DELETED; insertion order is the order of the writes.
        self._overlay: dict[str, bytes | object] = {}
        self._finished = False

    async def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` as this transaction sees it, or ``default``."""
        found = await self.get_many([key])
        return found.get(key, default)

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The values of the keys that exist, as this transaction sees them."""
        self._check_open()
        keys = list(keys)
        remote = [k for k in keys if k not in self._overlay] if not self._cleared else []
        found: dict[str, bytes] = {}
        if remote:
            request = pb.TransactionRequest(get=pb.GetRequest(keys=remote))
            for entry in (await _step(self._call, request)).get.entries:
                found[entry.key] = entry.value
        result: dict[str, Any] = {}
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
    ) -> dict[str, Any]:
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
            response = await _step(self._call, pb.TransactionRequest(list=request))
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

    def put(self, key: str, value: Any) -> None:
        """Set ``key`` when the transaction commits. Raises InvalidValue at once."""
        self._check_open()
        self._overlay[key] = encode_value(value)

    def put_many(self, entries: Mapping[str, Any]) -> None:
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
