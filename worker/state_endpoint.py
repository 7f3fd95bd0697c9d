"""A gRPC channel to one state replica: typed calls on it, tracked so that they can be
abandoned when the replica leaves, and a watch that says why the channel cannot connect."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Literal, Protocol, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from wsgate.errors import StateUnavailable
from wsgate.grpc_tls import ClientTls, explain_connect_failure, open_channel
from wsgate.v1 import state_pb2 as pb
from wsgate.worker import state_methods as methods
from wsgate.worker.state_methods import Req, Resp, Stream, Unary

log = logging.getLogger(__name__)

RespT = TypeVar("RespT", covariant=True)

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


class ReplicaGone(StateUnavailable):
    """A call was abandoned because its replica left the view (it died, paused, or shut
    down): make it again at the object's owner now."""


class Call(Protocol):
    """A gRPC call in flight, as far as tracking it goes."""

    def cancel(self) -> bool: ...


class ResponseStream(Call, Protocol[RespT]):
    """A call whose responses stream (``State.Write``)."""

    def __aiter__(self) -> AsyncIterator[RespT]: ...


class DuplexCall(Call, Protocol):
    """The bidirectional ``State.Transaction`` call (grpc.aio's StreamStreamCall)."""

    async def write(self, request: pb.TransactionRequest) -> None: ...
    async def read(self) -> pb.TransactionResponse | object: ...
    async def done_writing(self) -> None: ...
    async def code(self) -> grpc.StatusCode: ...
    async def initial_metadata(self) -> object: ...
    async def trailing_metadata(self) -> object: ...
    async def details(self) -> str: ...


class Endpoint:
    """A gRPC channel to the state replica at ``address``.

    ``on_connect_failure`` is called (after the failure is logged) each time the channel
    fails to connect; an outage counts once, not once per reconnection attempt.
    """

    def __init__(
        self, address: str, tls: ClientTls | None, on_connect_failure: Callable[[], None]
    ) -> None:
        self.address = address
        self.tls = tls
        self._on_connect_failure = on_connect_failure
        self.channel = open_channel(address, tls, _CHANNEL_OPTIONS)
        # One multicallable per method path, made on first use.
        self._callables: dict[str, object] = {}
        #: The replica left the view: its calls in flight were cancelled and failed with
        #: ReplicaGone ("unavailable, try the new owner"); none is made here any more.
        self.closed = False
        # The calls in flight, so that they can be abandoned when the replica leaves: a
        # paused replica keeps its connections open and would hold them to their deadline.
        self.calls: set[Call] = set()
        #: Why the channel last failed to connect; None once it is connected.
        self.connect_error: str | None = None
        self._watcher = asyncio.get_running_loop().create_task(self._watch_connectivity())

    # -- typed calls ---------------------------------------------------------------------

    async def unary(
        self, method: Unary[Req, Resp], request: Req, *, timeout_s: float, wait_for_ready: bool
    ) -> Resp:
        """Make one ``method`` call, tracked: ReplicaGone if the replica leaves the view
        before it answers. gRPC failures propagate as grpc.RpcError."""
        if self.closed:
            raise ReplicaGone(f"state replica at {self.address} left")
        multicallable = self._multicallable(method, "unary_unary")
        call = cast("Callable[..., asyncio.Future[Resp]]", multicallable)(
            request, timeout=timeout_s, wait_for_ready=wait_for_ready
        )
        tracked = cast(Call, call)
        self.calls.add(tracked)
        try:
            return await call
        except asyncio.CancelledError:
            raise self.gone_or_cancelled() from None
        finally:
            self.calls.discard(tracked)

    def write_call(
        self, request: pb.WriteRequest, *, timeout_s: float, wait_for_ready: bool
    ) -> ResponseStream[pb.WriteResponse]:
        """Start a ``State.Write`` call (not tracked: iterate it with :meth:`tracked`)."""
        if self.closed:
            raise ReplicaGone(f"state replica at {self.address} left")
        multicallable = self._multicallable(methods.WRITE, "unary_stream")
        return cast("Callable[..., ResponseStream[pb.WriteResponse]]", multicallable)(
            request, timeout=timeout_s, wait_for_ready=wait_for_ready
        )

    def transaction_call(self, *, timeout_s: float, wait_for_ready: bool) -> DuplexCall:
        """Open a ``State.Transaction`` stream, tracked until :meth:`untrack`."""
        multicallable = self._multicallable(methods.TRANSACTION, "stream_stream")
        opened: Callable[..., DuplexCall] = cast("Callable[..., DuplexCall]", multicallable)
        call = opened(timeout=timeout_s, wait_for_ready=wait_for_ready)
        self.calls.add(call)
        return call

    def _multicallable(
        self,
        method: Unary[Req, Resp] | Stream[Req, Resp],
        kind: Literal["unary_unary", "unary_stream", "stream_stream"],
    ) -> Callable[..., object]:
        """The channel's multicallable of ``kind`` (``unary_unary``, ``unary_stream``,
        ``stream_stream``) for ``method``, with its messages' serializers; made once."""
        made = self._callables.get(method.path)
        if made is None:
            made = self._callables[method.path] = getattr(self.channel, kind)(
                method.path,
                request_serializer=method.request.SerializeToString,
                response_deserializer=method.response.FromString,
            )
        return cast("Callable[..., object]", made)

    def untrack(self, call: Call) -> None:
        """Stop tracking ``call`` (it ended)."""
        self.calls.discard(call)

    async def tracked(self, call: ResponseStream[Resp]) -> AsyncIterator[Resp]:
        """The responses of a streaming ``call``, tracked as :meth:`unary` tracks a unary
        one."""
        self.calls.add(call)
        try:
            async for response in call:
                yield response
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

    def is_ready(self) -> bool:
        """Whether the channel is connected now."""
        state: grpc.ChannelConnectivity = self.channel.get_state()
        return state is grpc.ChannelConnectivity.READY

    async def close(self) -> None:
        """Stop watching and close the channel (calls in flight are cancelled)."""
        self._watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watcher
        await self.channel.close()

    # -- connectivity --------------------------------------------------------------------

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
            reason = explain_connect_failure(exc.details() or "", self.tls)
        self.connect_error = reason
        self._on_connect_failure()
        log.warning(
            "cannot connect to the state service at %s (%s): %s",
            self.address,
            "plaintext" if self.tls is None else self.tls.describe(),
            reason,
        )
