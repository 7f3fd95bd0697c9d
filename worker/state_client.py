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
:mod:`wsgate.worker.gate`), and inside a handler every write carries an idempotency key, so a
redelivered event's writes are applied once.

Writes from concurrent callers are coalesced: what is called in one turn of the event loop
(and while earlier calls are in flight) travels in one ``Write`` call, and the state service
commits it in one batch. Each write still succeeds or fails on its own.

Values go through :mod:`wsgate.values`: a value that cannot be stored raises InvalidValue
at the call. Limits (key and value sizes, keys per call) and the object id are checked by
the state service, the one authority on them, and come back as the same typed exceptions
(:class:`~wsgate.errors.KeyTooLarge` with ``size``, ``limit`` and ``key``, ...).

Channels are plaintext, or TLS with the :class:`~wsgate.grpc_tls.ClientTls` given
(``WSGATE_STATE_TLS_*``). When a channel fails to connect (a refused handshake, a closed
port), the client logs why at once, with the setting most likely at fault, counts it, and
the calls that give up on that replica say why too; it logs again when the channel
connects.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import enum
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from wsgate.errors import InvalidRequest, NotOwner, StateError, StateUnavailable
from wsgate.grpc_tls import ClientTls, explain_connect_failure, open_channel
from wsgate.placement import Replica, ReplicaWatch, object_key
from wsgate.service import StartsAndCloses
from wsgate.state_errors import exception_from_error_info, exception_from_rpc_error
from wsgate.v1 import state_pb2 as pb
from wsgate.v1 import state_pb2_grpc
from wsgate.values import decode_value, encode_value
from wsgate.worker.gate import current_gate

log = logging.getLogger(__name__)

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

#: The deadline of the call that asks a failed channel why it failed (it fails at once,
#: locally, while the channel is down).
DIAGNOSIS_TIMEOUT_S = 1.0


class ClientPhase(enum.Enum):
    """The client's lifecycle; it only moves forward."""

    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class _Endpoint:
    """A gRPC channel to one state replica, its stubs and its write pipeline."""

    def __init__(self, client: StateClient, address: str) -> None:
        self.address = address
        self.client = client
        self.channel = open_channel(address, client.tls, _CHANNEL_OPTIONS)
        self.stubs: dict[str, Any] = {
            "State": state_pb2_grpc.StateStub(self.channel),
            "Membership": state_pb2_grpc.MembershipStub(self.channel),
            "Alarms": state_pb2_grpc.AlarmsStub(self.channel),
            "Activations": state_pb2_grpc.ActivationsStub(self.channel),
        }
        self.writes = _WritePipeline(client, self)
        #: The replica left the view: its calls in flight were cancelled and failed with
        #: ReplicaGone ("unavailable, try the new owner"); none is made here any more.
        self.closed = False
        # The calls in flight, so that they can be abandoned when the replica leaves: a
        # paused replica keeps its connections open and would hold them to their deadline.
        self.calls: set[Any] = set()
        #: Why the channel last failed to connect; None once it is connected.
        self.connect_error: str | None = None
        self._watcher = asyncio.get_running_loop().create_task(self._watch_connectivity())

    async def _watch_connectivity(self) -> None:
        """Log (and count) each time the channel fails to connect, with the reason, and
        when it connects again. gRPC keeps a channel in TRANSIENT_FAILURE while it retries
        (with backoff), so an outage is reported once, not once per attempt."""
        channel = self.channel
        state = channel.get_state(try_to_connect=False)
        while state is not grpc.ChannelConnectivity.SHUTDOWN:
            await channel.wait_for_state_change(state)
            state = channel.get_state(try_to_connect=False)
            if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                await self._diagnose()
            elif state is grpc.ChannelConnectivity.READY and self.connect_error is not None:
                self.connect_error = None
                log.info("connected to the state service at %s", self.address)

    async def _diagnose(self) -> None:
        # The channel keeps the reason of its last failure to itself, except in the status
        # of a call that fails for it: make one that does not wait for the channel.
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            await stub.Check(
                health_pb2.HealthCheckRequest(),
                timeout=DIAGNOSIS_TIMEOUT_S,
                wait_for_ready=False,
            )
            return  # connected in the meantime
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                return  # it reached a server: the connection works
            reason = explain_connect_failure(exc.details() or "", self.client.tls)
        self.connect_error = reason
        self.client.connect_failures += 1
        if self.client.on_connect_failure is not None:
            self.client.on_connect_failure()
        log.warning(
            "cannot connect to the state service at %s (%s): %s",
            self.address,
            "plaintext" if self.client.tls is None else self.client.tls.describe(),
            reason,
        )

    async def close(self) -> None:
        """Stop watching and close the channel (calls in flight are cancelled)."""
        self._watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watcher
        await self.channel.close()

    async def unary(self, method: Any, request: Any, **kwargs: Any) -> Any:
        """Make one unary call with ``method`` (a stub's), tracked: ReplicaGone if the
        replica leaves the view before it answers."""
        if self.closed:
            raise ReplicaGone(f"state replica at {self.address} left")
        call = method(request, **kwargs)
        self.calls.add(call)
        try:
            return await call
        except asyncio.CancelledError:
            raise self.gone_or_cancelled() from None
        finally:
            self.calls.discard(call)

    def gone_or_cancelled(self) -> BaseException:
        """What a call ended by CancelledError raises: ReplicaGone if this endpoint
        cancelled it (its replica left), else the cancellation, which was the caller's."""
        task = asyncio.current_task()
        if self.closed and (task is None or not task.cancelling()):
            return ReplicaGone(f"state replica at {self.address} left the view")
        return asyncio.CancelledError()

    def leave(self) -> None:
        """The replica left the view: abandon the calls in flight (their callers retry at
        the objects' new owners)."""
        self.closed = True
        for call in list(self.calls):
            call.cancel()


class ReplicaGone(StateUnavailable):
    """A call was abandoned because its replica left the view (it died, paused, or shut
    down): make it again at the object's owner now."""


class StateClient(StartsAndCloses):
    """gRPC channels to the state tier: one replica (``address``), or the replicas alive on
    the bus once :meth:`use_replicas` is given their watch.

    With replicas, every call about an object goes to the replica that owns it
    (rendezvous hashing, :mod:`wsgate.placement`); a replica that does not own it (the
    views differ for a moment) answers NotOwner naming the owner, and the call is made
    there. Calls about no object (LookupTurn, LeaveAll) go to any live replica. Until a
    replica has been heard (or when none is), calls go to ``address``.

    Use ``async with StateClient(address)`` or call :meth:`start`, then :meth:`close`.
    ``start`` does not wait for the service: a channel connects on its first call, so a
    worker may start before the state service. A call waits for the service to be
    reachable (a restart, say) within its deadline of ``timeout_s`` seconds; after it,
    StateTimeout, or StateUnavailable when the service could not be reached at all.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 5.0,
        tls: ClientTls | None = None,
        on_connect_failure: Callable[[], None] | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.address = address
        self.timeout_s = timeout_s
        #: The channels' TLS; None for plaintext.
        self.tls = tls
        #: Called each time a channel fails to connect (after the failure is logged).
        self.on_connect_failure = on_connect_failure
        #: Times a channel failed to connect (an outage of one replica counts once).
        self.connect_failures = 0
        self.phase = ClientPhase.NEW
        self._endpoints: dict[str, _Endpoint] = {}
        self._watch: ReplicaWatch | None = None
        #: Calls made again at the owner a replica named (NotOwner followed).
        self.redirects = 0

    async def start(self) -> None:
        """Create the channel. Idempotent while open; RuntimeError once closed."""
        if self.phase is ClientPhase.OPEN:
            return
        if self.phase is ClientPhase.CLOSED:
            raise RuntimeError("state client is closed; make a new StateClient")
        self._endpoints[self.address] = _Endpoint(self, self.address)
        self.phase = ClientPhase.OPEN

    def use_replicas(self, watch: ReplicaWatch) -> None:
        """Route calls by object over the replicas ``watch`` hears (see the class doc)."""
        self._watch = watch

    @property
    def waits_for_ready(self) -> bool:
        """Whether a call waits for its channel to connect (within its deadline), or fails
        at once with UNAVAILABLE when the replica cannot be reached.

        One replica (none heard on the bus): wait, so a restarting state service is waited
        for. Several: fail fast, because the callers retry and each retry goes to the
        object's owner as the view has it then; a call waiting on a dead replica's channel
        would wait out its whole deadline even after the others took its objects over.
        """
        return self._watch is None or not self._watch.known()

    def replicas_changed(self, live: list[Replica]) -> None:
        """Forget the channels of replicas that are gone (keep the configured address);
        the calls in flight on them are abandoned (ReplicaGone: their callers retry at the
        new owners), and each channel is closed a while later, when nothing can be using it
        any more."""
        alive = {replica.address for replica in live} | {self.address}
        loop = asyncio.get_running_loop()
        for address in list(self._endpoints):
            if address not in alive:
                endpoint = self._endpoints.pop(address)
                endpoint.leave()
                loop.call_later(CHANNEL_LINGER_S, _close_later, endpoint)

    async def close(self) -> None:
        """Close the channels; calls in flight are cancelled. Idempotent."""
        if self.phase is ClientPhase.CLOSED:
            return
        self.phase = ClientPhase.CLOSED
        endpoints, self._endpoints = self._endpoints, {}
        for endpoint in endpoints.values():
            await endpoint.close()

    async def wait_closed(self) -> None:
        """Nothing to wait for once :meth:`close` returned; here for the common lifecycle."""

    def storage(self, namespace: str, name: str) -> ObjectStorage:
        """The storage of the durable object ``name`` in ``namespace``.

        Cheap (no call is made); usable once the client is started. An empty namespace is
        refused by the service at the first call (InvalidObjectId).
        """
        return ObjectStorage(self, namespace, name)

    # -- routing -------------------------------------------------------------------------

    def owner_address(self, obj: pb.ObjectId | None) -> str:
        """The address of the replica that owns ``obj`` (any live one for None), or the
        configured address while no replica is known."""
        watch = self._watch
        if watch is None:
            return self.address
        if obj is None:
            live = watch.known()
            return live[0].address if live else self.address
        owner = watch.owner(object_key(obj.namespace, obj.name))
        return self.address if owner is None else owner.address

    def endpoint(self, address: str) -> _Endpoint:
        """The channel to ``address``, made on first use; RuntimeError unless open."""
        if self.phase is not ClientPhase.OPEN:
            raise RuntimeError(f"state client is {self.phase.value}, not open")
        endpoint = self._endpoints.get(address)
        if endpoint is None:
            endpoint = self._endpoints[address] = _Endpoint(self, address)
        return endpoint

    def stub(self, service: str, obj: pb.ObjectId | None = None) -> Any:
        """The stub of ``service`` ("State", "Membership", "Alarms", "Activations") on the
        replica that owns ``obj`` (any replica for None); RuntimeError unless open."""
        return self.endpoint(self.owner_address(obj)).stubs[service]

    async def unary(
        self, service: str, method: str, request: Any, *, timeout_s: float | None = None
    ) -> Any:
        """Call ``service.method`` (e.g. ``"Membership", "Join"``) with ``request``, at
        the replica that owns ``request.object`` when the request names one.

        Waits for the channel to be ready (a restarting state service) up to the deadline
        (``timeout_s``, by default the client's); failures come back as the state exception
        tree (:func:`wsgate.state_errors.exception_from_rpc_error`). NotOwner is followed to
        the owner it names, a few times within the deadline.
        """
        obj = getattr(request, "object", None) if _names_object(request) else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout_s or self.timeout_s)
        address = self.owner_address(obj)
        redirects = 0
        backoff_s = RETRY_FIRST_BACKOFF_S
        while True:
            endpoint = self.endpoint(address)
            try:
                return await endpoint.unary(
                    getattr(endpoint.stubs[service], method),
                    request,
                    timeout=max(deadline - loop.time(), 0.001),
                    wait_for_ready=self.waits_for_ready,
                )
            except (grpc.RpcError, ReplicaGone) as exc:
                error = exc if isinstance(exc, ReplicaGone) else self._error(exc, method, endpoint)
                if isinstance(error, NotOwner) and redirects < MAX_REDIRECTS:
                    address = self._follow(error, obj, redirects)
                    await asyncio.sleep(REDIRECT_BACKOFF_S * redirects)
                    redirects += 1
                    continue
                if (
                    isinstance(error, StateUnavailable)
                    and self._watch is not None
                    and loop.time() + backoff_s < deadline
                ):
                    # A replica died: once the view drops it, the call goes to the object's
                    # new owner (the data is in the shared database).
                    await asyncio.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, RETRY_MAX_BACKOFF_S)
                    address = self.owner_address(obj)
                    continue
                raise error from exc

    async def unary_at(
        self,
        address: str,
        service: str,
        method: str,
        request: Any,
        *,
        timeout_s: float | None = None,
    ) -> Any:
        """Call ``service.method`` at the replica at ``address`` (a call about several
        objects, split by owner by the caller), failures as in :meth:`unary`."""
        endpoint = self.endpoint(address)
        try:
            return await endpoint.unary(
                getattr(endpoint.stubs[service], method),
                request,
                timeout=timeout_s or self.timeout_s,
                wait_for_ready=self.waits_for_ready,
            )
        except grpc.RpcError as exc:
            raise self._error(exc, method, endpoint) from exc

    def _follow(self, error: NotOwner, obj: pb.ObjectId | None, attempt: int) -> str:
        """Where to make a call again after NotOwner: the owner it names, else (its view
        knows none, or naming went round) the owner in this client's view."""
        self.redirects += 1
        if error.address and attempt == 0:
            return error.address
        return self.owner_address(obj) if error.address == "" else error.address

    def _error(
        self, exc: grpc.RpcError, what: str, endpoint: _Endpoint | None = None
    ) -> StateError:
        error = exception_from_rpc_error(exc, what)
        endpoint = endpoint or self._endpoints.get(self.address)
        if endpoint is not None and endpoint.closed and not isinstance(error, NotOwner):
            return StateUnavailable(f"state replica at {endpoint.address} left: {error}")
        if (
            isinstance(error, TimeoutError)
            and endpoint is not None
            and endpoint.channel.get_state() is not grpc.ChannelConnectivity.READY
        ):
            # The deadline passed while waiting for the service, not for its answer.
            why = "" if endpoint.connect_error is None else f" ({endpoint.connect_error})"
            return StateUnavailable(
                f"state service at {endpoint.address} unreachable{why}: {error}"
            )
        return error

    def write(self, write: pb.Write) -> asyncio.Future[pb.WriteResult]:
        """Queue ``write`` for the next Write call to its object's replica; the future
        resolves with its result."""
        return self.endpoint(self.owner_address(_write_object(write))).writes.submit(write)


#: A call refused with NotOwner is made again at most this many times.
MAX_REDIRECTS = 3
#: ... waiting this long times the attempt before the second and later (views settle).
REDIRECT_BACKOFF_S = 0.1

#: A gone replica's channel is closed this long after it left the view.
CHANNEL_LINGER_S = 30.0

#: Channels being closed (kept referenced until they are).
_closing: set[asyncio.Future[Any]] = set()


def _close_later(endpoint: _Endpoint) -> None:
    task = asyncio.ensure_future(endpoint.close())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


def _names_object(request: Any) -> bool:
    try:
        return bool(request.HasField("object"))
    except ValueError:  # the message has no such field
        return False


def _write_object(write: pb.Write) -> pb.ObjectId | None:
    kind = write.WhichOneof("op")
    if kind is None:
        return None
    op: Any = getattr(write, kind)
    obj: pb.ObjectId = op.object
    return obj


class _WritePipeline:
    """Coalesces concurrent writes into few Write calls.

    A write called while fewer than MAX_WRITE_CALLS_IN_FLIGHT calls are out goes at the end
    of this turn of the event loop, with every write called in the same turn; otherwise it
    waits for a call to finish, and goes with everything that queued meanwhile. So a lone
    write pays one round trip, and under load one call (and one commit) serves many.
    """

    def __init__(self, client: StateClient, endpoint: _Endpoint) -> None:
        self._client = client
        self._endpoint = endpoint
        self._queue: list[tuple[pb.Write, asyncio.Future[pb.WriteResult]]] = []
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, write: pb.Write) -> asyncio.Future[pb.WriteResult]:
        if self._client.phase is not ClientPhase.OPEN:  # RuntimeError now, not later
            raise RuntimeError(f"state client is {self._client.phase.value}, not open")
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
                    if self._endpoint.closed:
                        raise ReplicaGone(f"state replica at {self._endpoint.address} left")
                    call = self._endpoint.stubs["State"].Write(
                        request,
                        timeout=max(deadline - loop.time(), 0.001),
                        wait_for_ready=self._client.waits_for_ready,
                    )
                    async for response in _tracked_stream(self._endpoint, call):
                        for result in response.results:
                            write, future = unanswered.pop(positions[result.index])
                            if _not_owner(result):
                                # Another replica owns its object: send it there.
                                self._redirect(write, result, future)
                            elif not future.done():
                                future.set_result(result)
                        if holding_slot:
                            holding_slot = False
                            self._release_slot()
                    if unanswered:
                        raise StateError(f"state service left {len(unanswered)} writes unanswered")
                    return
                except (grpc.RpcError, ReplicaGone) as exc:
                    error = (
                        exc
                        if isinstance(exc, ReplicaGone)
                        else self._client._error(exc, "Write", self._endpoint)
                    )
                    if isinstance(error, StateUnavailable) and loop.time() + backoff_s < deadline:
                        await asyncio.sleep(backoff_s)
                        backoff_s = min(backoff_s * 2, RETRY_MAX_BACKOFF_S)
                        self._reroute_moved(unanswered)
                        continue
                    raise error from exc
        except Exception as exc:
            for _, future in unanswered.values():
                if not future.done():
                    future.set_exception(exc)
        finally:
            if holding_slot:
                self._release_slot()

    def _reroute_moved(
        self, unanswered: dict[int, tuple[pb.Write, asyncio.Future[pb.WriteResult]]]
    ) -> None:
        """Hand the writes whose object another replica owns now (this one died and left
        the view) to that replica's pipeline."""
        for position, (write, future) in list(unanswered.items()):
            address = self._client.owner_address(_write_object(write))
            if address != self._endpoint.address:
                del unanswered[position]
                again = self._client.endpoint(address).writes.submit(write)
                again.add_done_callback(functools.partial(copy_into, future))

    def _redirect(
        self, write: pb.Write, result: pb.WriteResult, future: asyncio.Future[pb.WriteResult]
    ) -> None:
        """Send ``write`` again to the owner a NotOwner result named, at most
        MAX_REDIRECTS times; then its result (the NotOwner failure) stands."""
        hops = getattr(future, "_wsgate_hops", 0)
        address = result.failure.info.owner_address
        if hops >= MAX_REDIRECTS or not address or address == self._endpoint.address:
            if not future.done():
                future.set_result(result)
            return
        self._client.redirects += 1
        again = self._client.endpoint(address).writes.submit(write)
        again._wsgate_hops = hops + 1  # type: ignore[attr-defined]
        again.add_done_callback(lambda done: _copy_outcome(done, future))

    def _release_slot(self) -> None:
        self._in_flight -= 1
        if self._queue and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send_queued)


async def _tracked_stream(endpoint: _Endpoint, call: Any) -> AsyncIterator[Any]:
    """The responses of a streaming ``call``, tracked as :meth:`_Endpoint.unary` tracks
    a unary one."""
    endpoint.calls.add(call)
    try:
        async for response in call:
            yield response
    except asyncio.CancelledError:
        raise endpoint.gone_or_cancelled() from None
    finally:
        endpoint.calls.discard(call)


def _not_owner(result: pb.WriteResult) -> bool:
    return result.WhichOneof("outcome") == "failure" and result.failure.info.reason == "NOT_OWNER"


def copy_into(target: asyncio.Future[Any], source: asyncio.Future[Any]) -> None:
    """Give ``target`` the outcome of ``source`` (a done callback, used with partial)."""
    _copy_outcome(source, target)


def _copy_outcome(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]
    else:
        target.set_result(source.result())


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
        address = self._client.owner_address(self._object)
        for attempt in range(MAX_REDIRECTS + 1):
            try:
                return await self._transaction_at(address, fn, key, timeout_s)
            except NotOwner as exc:
                # Refused at begin, before fn ran: make it at the owner instead.
                if attempt == MAX_REDIRECTS:
                    raise
                address = self._client._follow(exc, self._object, attempt)
        raise AssertionError("unreachable")

    async def _transaction_at(
        self,
        address: str,
        fn: Callable[[Transaction], Awaitable[T]],
        key: str,
        timeout_s: float | None,
    ) -> T:
        endpoint = self._client.endpoint(address)
        call = endpoint.stubs["State"].Transaction(
            timeout=timeout_s or self._client.timeout_s,
            wait_for_ready=self._client.waits_for_ready,
        )
        endpoint.calls.add(call)
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
            raise self._client._error(exc, "Transaction", endpoint) from exc
        except asyncio.CancelledError:
            raise endpoint.gone_or_cancelled() from None
        finally:
            endpoint.calls.discard(call)
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
