"""Writes to durable objects, coalesced into few ``State.Write`` calls per replica."""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING, TypeVar

import grpc

from wsgate.errors import StateError, StateUnavailable
from wsgate.state_errors import exception_from_error_info
from wsgate.v1 import state_pb2 as pb
from wsgate.worker.state_endpoint import Endpoint, ReplicaGone

if TYPE_CHECKING:
    from wsgate.worker.state_client import StateClient

T = TypeVar("T")

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

#: A write refused with NotOwner is sent again at most this many times.
MAX_REDIRECTS = 3

_Queued = tuple[pb.Write, "asyncio.Future[pb.WriteResult]"]
_ObjectKey = tuple[str, str]


class WritePipeline:
    """Coalesces concurrent writes to one replica into few Write calls.

    A write called while fewer than MAX_WRITE_CALLS_IN_FLIGHT calls are out goes at the end
    of this turn of the event loop, with every write called in the same turn; otherwise it
    waits for a call to finish, and goes with everything that queued meanwhile. So a lone
    write pays one round trip, and under load one call (and one commit) serves many.

    Writes to one object apply in the order they were called. Within a call the service
    keeps that order; across calls in flight at once it could not (each call is handled
    on its own), so a write waits while an earlier call still has an unanswered write to
    the same object, and goes in a later call. Writes to other objects pass it.
    """

    def __init__(self, client: StateClient, endpoint: Endpoint) -> None:
        self._client = client
        self._endpoint = endpoint
        self._queue: list[_Queued] = []
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: Unanswered writes in calls in flight, by object: later writes to it wait.
        self._in_flight_by_object: dict[_ObjectKey, int] = {}

    def submit(self, write: pb.Write) -> asyncio.Future[pb.WriteResult]:
        """Queue ``write``; the future resolves with its result (a failure included)."""
        self._client.check_open()  # RuntimeError now, not later
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
            if not batch:
                return  # every queued write waits behind a call in flight to its object
            self._in_flight += 1
            task = loop.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take_batch(self) -> list[_Queued]:
        """The next call's writes, in queue order: at most MAX_WRITES_PER_CALL and about
        MAX_WRITE_CALL_BYTES, none to an object a call in flight still writes (those, and
        every later write to the same object, stay queued in order)."""
        in_flight = self._in_flight_by_object
        size = 0
        batch: list[_Queued] = []
        waiting: list[_Queued] = []
        waiting_objects: set[_ObjectKey] = set()
        queue = self._queue
        position = 0
        for position, queued in enumerate(queue):  # noqa: B007 (used after the loop)
            key = _object_key(queued[0])
            if key is not None and (key in in_flight or key in waiting_objects):
                waiting.append(queued)
                waiting_objects.add(key)
                continue
            size += queued[0].ByteSize()
            if batch and (len(batch) >= MAX_WRITES_PER_CALL or size > MAX_WRITE_CALL_BYTES):
                break
            batch.append(queued)
        else:
            position = len(queue)
        self._queue = waiting + queue[position:]
        for write, _ in batch:
            key = _object_key(write)
            if key is not None:
                in_flight[key] = in_flight.get(key, 0) + 1
        return batch

    def _answered(self, write: pb.Write) -> None:
        """``write`` left its call (answered, failed or sent elsewhere): the writes queued
        behind it to its object may go."""
        key = _object_key(write)
        if key is None:
            return
        left = self._in_flight_by_object[key] - 1
        if left:
            self._in_flight_by_object[key] = left
            return
        del self._in_flight_by_object[key]
        if self._queue and not self._scheduled and self._in_flight < MAX_WRITE_CALLS_IN_FLIGHT:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send_queued)

    async def _send(self, batch: list[_Queued]) -> None:
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
                    call = self._endpoint.write_call(
                        request,
                        timeout_s=max(deadline - loop.time(), 0.001),
                        wait_for_ready=self._client.waits_for_ready,
                    )
                    if self._client.on_write_call is not None:
                        self._client.on_write_call(request)
                    async for response in self._endpoint.tracked(call):
                        for result in response.results:
                            write, future = unanswered.pop(positions[result.index])
                            self._answered(write)
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
                        else self._client.error(exc, "Write", self._endpoint)
                    )
                    if isinstance(error, StateUnavailable) and loop.time() + backoff_s < deadline:
                        await asyncio.sleep(backoff_s)
                        backoff_s = min(backoff_s * 2, RETRY_MAX_BACKOFF_S)
                        self._reroute_moved(unanswered)
                        continue
                    raise error from exc
        except Exception as exc:
            for write, future in unanswered.values():
                self._answered(write)
                if not future.done():
                    future.set_exception(exc)
        finally:
            if holding_slot:
                self._release_slot()

    def _reroute_moved(self, unanswered: dict[int, _Queued]) -> None:
        """Hand the writes whose object another replica owns now (this one died and left
        the view) to that replica's pipeline."""
        for position, (write, future) in list(unanswered.items()):
            address = self._client.owner_address(write_object(write))
            if address != self._endpoint.address:
                del unanswered[position]
                self._answered(write)
                again = self._client.writes_to(address).submit(write)
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
        again = self._client.writes_to(address).submit(write)
        again._wsgate_hops = hops + 1  # type: ignore[attr-defined]
        again.add_done_callback(functools.partial(copy_into, future))

    def _release_slot(self) -> None:
        self._in_flight -= 1
        if self._queue and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send_queued)


def write_object(write: pb.Write) -> pb.ObjectId | None:
    """The object ``write`` is about (None for a write with no operation set)."""
    kind = write.WhichOneof("op")
    if kind == "put":
        return write.put.object
    if kind == "delete":
        return write.delete.object
    if kind == "delete_all":
        return write.delete_all.object
    return None


def _object_key(write: pb.Write) -> _ObjectKey | None:
    obj = write_object(write)
    return None if obj is None else (obj.namespace, obj.name)


def _not_owner(result: pb.WriteResult) -> bool:
    return result.WhichOneof("outcome") == "failure" and result.failure.info.reason == "NOT_OWNER"


def copy_into(target: asyncio.Future[T], source: asyncio.Future[T]) -> None:
    """Give ``target`` the outcome of ``source`` (a done callback, used with partial)."""
    if target.done():
        return
    if source.cancelled():
        target.cancel()
        return
    error = source.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())


def result_count(result: pb.WriteResult) -> int:
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
