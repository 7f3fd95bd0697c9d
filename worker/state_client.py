"""The workers' client of the state service: durable objects over gRPC.

::

    async with StateClient("127.0.0.1:7070") as state:
        room = state.storage("room", "lobby")
        await room.put("topic", {"text": "hello", "votes": [1, 2]})
        topic = await room.get("topic")
        count = await room.transaction(increment)   # atomic read-modify-write
        await state.membership.join(pb.JoinRequest(object=..., connection_id=...))

The client owns the channels (one per replica), the placement of objects on replicas and
the retries. Each gRPC service of ``wsgate.v1`` has a typed client on it
(:mod:`wsgate.worker.state_services`): ``state.kv``, ``state.membership``, ``state.alarms``
and ``state.activations``, whose methods take and return the generated messages. The
methods themselves are named once, in :mod:`wsgate.worker.state_methods`. Handlers use
:class:`~wsgate.worker.object_storage.ObjectStorage` (``state.storage(ns, name)``), which
encodes values and holds the output gate.

Writes from concurrent callers are coalesced (:mod:`wsgate.worker.state_writes`): what is
called in one turn of the event loop (and while earlier calls are in flight) travels in one
``Write`` call, and the state service commits it in one batch. Each write still succeeds or
fails on its own.

Channels are plaintext, or TLS with the :class:`~wsgate.grpc_tls.ClientTls` given
(``WSGATE_STATE_TLS_*``). When a channel fails to connect (a refused handshake, a closed
port), the client logs why at once, with the setting most likely at fault, counts it, and
the calls that give up on that replica say why too; it logs again when the channel
connects (:mod:`wsgate.worker.state_endpoint`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable

import grpc
from google.protobuf.message import Message

from wsgate.errors import NotOwner, StateError, StateUnavailable
from wsgate.grpc_tls import ClientTls
from wsgate.placement import Replica, ReplicaWatch, object_key
from wsgate.service import StartsAndCloses
from wsgate.state_errors import exception_from_rpc_error
from wsgate.v1 import state_pb2 as pb
from wsgate.worker.object_storage import ObjectStorage
from wsgate.worker.state_endpoint import Endpoint, ReplicaGone
from wsgate.worker.state_methods import Req, Resp, Unary
from wsgate.worker.state_services import (
    ActivationsClient,
    AlarmsClient,
    KvClient,
    MembershipClient,
)
from wsgate.worker.state_writes import (
    RETRY_FIRST_BACKOFF_S,
    RETRY_MAX_BACKOFF_S,
    WritePipeline,
    write_object,
)

log = logging.getLogger(__name__)

__all__ = ["ClientPhase", "ReplicaGone", "StateClient"]

#: A call refused with NotOwner is made again at most this many times.
MAX_REDIRECTS = 3
#: ... waiting this long times the attempt before the second and later (views settle).
REDIRECT_BACKOFF_S = 0.1

#: A gone replica's channel is closed this long after it left the view.
CHANNEL_LINGER_S = 30.0


class ClientPhase(enum.Enum):
    """The client's lifecycle; it only moves forward."""

    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


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
        #: Called with each Write request as its call starts (the bench counts them).
        self.on_write_call: Callable[[pb.WriteRequest], None] | None = None
        #: Times a channel failed to connect (an outage of one replica counts once).
        self.connect_failures = 0
        self.phase = ClientPhase.NEW
        #: Calls made again at the owner a replica named (NotOwner followed).
        self.redirects = 0
        #: ``wsgate.v1.State``: reads, usage and coalesced writes.
        self.kv = KvClient(self)
        #: ``wsgate.v1.Membership``.
        self.membership = MembershipClient(self)
        #: ``wsgate.v1.Alarms``.
        self.alarms = AlarmsClient(self)
        #: ``wsgate.v1.Activations``.
        self.activations = ActivationsClient(self)
        self._endpoints: dict[str, Endpoint] = {}
        self._writes: dict[str, WritePipeline] = {}
        self._watch: ReplicaWatch | None = None
        # Channels of gone replicas being closed (kept referenced until they are).
        self._closing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Create the channel. Idempotent while open; RuntimeError once closed."""
        if self.phase is ClientPhase.OPEN:
            return
        if self.phase is ClientPhase.CLOSED:
            raise RuntimeError("state client is closed; make a new StateClient")
        self.phase = ClientPhase.OPEN
        self.endpoint(self.address)

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
                self._writes.pop(address, None)
                endpoint.leave()
                loop.call_later(CHANNEL_LINGER_S, self._close_later, endpoint)

    def _close_later(self, endpoint: Endpoint) -> None:
        task = asyncio.ensure_future(endpoint.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close the channels; calls in flight are cancelled. Idempotent."""
        if self.phase is ClientPhase.CLOSED:
            return
        self.phase = ClientPhase.CLOSED
        endpoints, self._endpoints = self._endpoints, {}
        self._writes = {}
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

    def check_open(self) -> None:
        """RuntimeError unless the client is open."""
        if self.phase is not ClientPhase.OPEN:
            raise RuntimeError(f"state client is {self.phase.value}, not open")

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

    def endpoint(self, address: str) -> Endpoint:
        """The channel to ``address``, made on first use; RuntimeError unless open."""
        self.check_open()
        endpoint = self._endpoints.get(address)
        if endpoint is None:
            endpoint = self._endpoints[address] = Endpoint(address, self.tls, self._connect_failed)
        return endpoint

    def writes_to(self, address: str) -> WritePipeline:
        """The write pipeline of the replica at ``address``; RuntimeError unless open."""
        endpoint = self.endpoint(address)
        pipeline = self._writes.get(address)
        if pipeline is None:
            pipeline = self._writes[address] = WritePipeline(self, endpoint)
        return pipeline

    def _connect_failed(self) -> None:
        self.connect_failures += 1
        if self.on_connect_failure is not None:
            self.on_connect_failure()

    async def call(
        self, method: Unary[Req, Resp], request: Req, *, timeout_s: float | None = None
    ) -> Resp:
        """Make a ``method`` call with ``request``, at the replica that owns
        ``request.object`` when the request names one (any replica else).

        Waits for the channel to be ready (a restarting state service) up to the deadline
        (``timeout_s``, by default the client's); failures come back as the state exception
        tree (:func:`wsgate.state_errors.exception_from_rpc_error`). NotOwner is followed to
        the owner it names, a few times within the deadline; with replicas, an unavailable
        one is tried again at the object's owner as the view changes.
        """
        obj = _object_of(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout_s or self.timeout_s)
        address = self.owner_address(obj)
        redirects = 0
        backoff_s = RETRY_FIRST_BACKOFF_S
        while True:
            endpoint = self.endpoint(address)
            try:
                return await endpoint.unary(
                    method,
                    request,
                    timeout_s=max(deadline - loop.time(), 0.001),
                    wait_for_ready=self.waits_for_ready,
                )
            except (grpc.RpcError, ReplicaGone) as exc:
                error = (
                    exc if isinstance(exc, ReplicaGone) else self.error(exc, method.name, endpoint)
                )
                if isinstance(error, NotOwner) and redirects < MAX_REDIRECTS:
                    address = self.follow(error, obj, redirects)
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

    async def call_at(
        self,
        address: str,
        method: Unary[Req, Resp],
        request: Req,
        *,
        timeout_s: float | None = None,
    ) -> Resp:
        """Make a ``method`` call once, at the replica at ``address`` (a call about several
        objects, split by owner by the caller); failures as in :meth:`call` (ReplicaGone
        when the replica left meanwhile), with no redirect and no retry."""
        endpoint = self.endpoint(address)
        try:
            return await endpoint.unary(
                method,
                request,
                timeout_s=max(timeout_s or self.timeout_s, 0.001),
                wait_for_ready=self.waits_for_ready,
            )
        except grpc.RpcError as exc:
            raise self.error(exc, method.name, endpoint) from exc

    def follow(self, error: NotOwner, obj: pb.ObjectId | None, attempt: int) -> str:
        """Where to make a call again after NotOwner: the owner it names, else (its view
        knows none, or naming went round) the owner in this client's view."""
        self.redirects += 1
        if error.address and attempt == 0:
            return error.address
        return self.owner_address(obj) if error.address == "" else error.address

    def error(self, exc: grpc.RpcError, what: str, endpoint: Endpoint | None = None) -> StateError:
        """The typed exception for the failure ``exc`` of a ``what`` call at ``endpoint``:
        StateUnavailable when the replica left or could not be reached at all."""
        error = exception_from_rpc_error(exc, what)
        endpoint = endpoint or self._endpoints.get(self.address)
        if endpoint is not None and endpoint.closed and not isinstance(error, NotOwner):
            return StateUnavailable(f"state replica at {endpoint.address} left: {error}")
        if isinstance(error, TimeoutError) and endpoint is not None and not endpoint.is_ready():
            # The deadline passed while waiting for the service, not for its answer.
            why = "" if endpoint.connect_error is None else f" ({endpoint.connect_error})"
            return StateUnavailable(
                f"state service at {endpoint.address} unreachable{why}: {error}"
            )
        return error

    def write(self, write: pb.Write) -> asyncio.Future[pb.WriteResult]:
        """Queue ``write`` for the next Write call to its object's replica; the future
        resolves with its result."""
        return self.writes_to(self.owner_address(write_object(write))).submit(write)


def _object_of(request: Message) -> pb.ObjectId | None:
    """The object ``request`` is about, or None for a request about none (LookupTurn,
    LeaveAll) or one that leaves it unset."""
    try:
        if not request.HasField("object"):
            return None
    except ValueError:  # the message has no such field
        return None
    obj: pb.ObjectId = getattr(request, "object")  # noqa: B009 - any request type
    return obj
