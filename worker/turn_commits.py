"""Commits of a worker's activations, coalesced into few ``CommitTurns`` calls.

A gRPC call costs about as much as a whole SQLite commit here, so the commits that the
activations of one worker ask for in one turn of the event loop (and while up to
:data:`MAX_CALLS_IN_FLIGHT` calls are out) travel in one call; the state service applies
each object's turns with one storage operation, all of them in one group commit.

A call that fails because the service is away (UNAVAILABLE, or its deadline passed while
waiting for it) or its database found the disk full (RESOURCE_EXHAUSTED, STORAGE_FULL) is
made again for as long as ``retry_for_s`` allows: committing the same
turns twice is safe (the service recognises a commit it already applied by the record of
its first turn, and answers that it is committed).
"""

from __future__ import annotations

import asyncio
import functools
import logging

from wsgate.errors import StateError, StateTimeout, StateUnavailable, StorageFull
from wsgate.v1 import state_pb2 as pb
from wsgate.worker.metrics import WorkerMetrics
from wsgate.worker.state_client import StateClient
from wsgate.worker.state_writes import copy_into

log = logging.getLogger(__name__)

#: CommitTurns calls in flight at once; more commits wait and travel in the next call.
MAX_CALLS_IN_FLIGHT = 4
#: One call carries at most this many objects' turns ...
MAX_OBJECTS_PER_CALL = 512
#: ... and about this many bytes (the state service takes requests of up to 32 MiB).
MAX_CALL_BYTES = 8 * 1024 * 1024
#: After a failed call, wait this long before the next try, doubling up to ...
RETRY_FIRST_BACKOFF_S = 0.05
#: ... this.
RETRY_MAX_BACKOFF_S = 1.0

_Pending = tuple[pb.ObjectTurns, "asyncio.Future[pb.ObjectTurnsResult]"]


class TurnCommitter:
    """Commits for the activations of worker ``worker_id``, over ``client``: each object's
    turns go to the replica that owns it, coalesced per replica.

    Any replica accepts a commit (the epoch check in its transaction is the authority, not
    placement), so a commit sent while the views of the replicas differ is never refused
    for it; sending it to the owner keeps one object's commits in one group commit.
    """

    def __init__(
        self, client: StateClient, worker_id: str, *, retry_for_s: float, metrics: WorkerMetrics
    ) -> None:
        self._client = client
        self._worker_id = worker_id
        self._retry_for_s = retry_for_s
        self._metrics = metrics
        self._replicas: dict[str, _ReplicaCommits] = {}

    def commit(self, turns: pb.ObjectTurns) -> asyncio.Future[pb.ObjectTurnsResult]:
        """Queue one activation's turns; the future resolves with the service's verdict
        (committed, or refused with why), or fails with a StateError once the service
        could not be reached for ``retry_for_s``."""
        address = self._client.owner_address(turns.object)
        replica = self._replicas.get(address)
        if replica is None:
            replica = self._replicas[address] = _ReplicaCommits(
                self._client,
                address,
                self._worker_id,
                retry_for_s=self._retry_for_s,
                metrics=self._metrics,
            )
            replica._committer = self
        return replica.commit(turns)

    async def close(self) -> None:
        """Wait for the calls in flight."""
        for replica in list(self._replicas.values()):
            await replica.close()


class _ReplicaCommits:
    """The commits sent to one replica."""

    def _reroute_moved(self, batch: list[_Pending]) -> list[_Pending]:
        """Hand the commits of objects that another replica owns now (this one died and
        left the view) to that replica; returns those that stay."""
        committer = self._committer
        if committer is None:
            return batch
        staying: list[_Pending] = []
        for turns, future in batch:
            if self._client.owner_address(turns.object) == self._address:
                staying.append((turns, future))
                continue
            again = committer.commit(turns)
            again.add_done_callback(functools.partial(copy_into, future))
        return staying

    def __init__(
        self,
        client: StateClient,
        address: str,
        worker_id: str,
        *,
        retry_for_s: float,
        metrics: WorkerMetrics,
    ) -> None:
        self._client = client
        self._address = address
        self._committer: TurnCommitter | None = None
        self._metrics = metrics
        self._worker_id = worker_id
        self._retry_for_s = retry_for_s
        self._queue: list[_Pending] = []
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def commit(self, turns: pb.ObjectTurns) -> asyncio.Future[pb.ObjectTurnsResult]:
        """Queue one activation's turns; the future resolves with the service's verdict
        (committed, or refused with why), or fails with a StateError once the service
        could not be reached for ``retry_for_s``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[pb.ObjectTurnsResult] = loop.create_future()
        self._queue.append((turns, future))
        if not self._scheduled and self._in_flight < MAX_CALLS_IN_FLIGHT:
            self._scheduled = True
            loop.call_soon(self._send_queued)
        return future

    async def close(self) -> None:
        """Wait for the calls in flight."""
        if self._tasks:
            await asyncio.wait(self._tasks)

    def _send_queued(self) -> None:
        self._scheduled = False
        loop = asyncio.get_running_loop()
        while self._queue and self._in_flight < MAX_CALLS_IN_FLIGHT:
            size = count = 0
            for turns, _ in self._queue:
                size += turns.ByteSize()
                if count and (count >= MAX_OBJECTS_PER_CALL or size > MAX_CALL_BYTES):
                    break
                count += 1
            batch, self._queue = self._queue[:count], self._queue[count:]
            self._in_flight += 1
            task = loop.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._retry_for_s
        backoff_s = RETRY_FIRST_BACKOFF_S
        request = pb.CommitTurnsRequest(worker=self._worker_id, objects=[t for t, _ in batch])
        try:
            while True:
                try:
                    response = await self._client.activations.commit_turns_at(
                        self._address, request, timeout_s=max(deadline - loop.time(), 0.001)
                    )
                    break
                except StateError as error:
                    retryable = isinstance(error, (StateUnavailable, StateTimeout, StorageFull))
                    if retryable and loop.time() + backoff_s < deadline:
                        log.debug("CommitTurns failed (%s); trying again", error)
                        await asyncio.sleep(backoff_s)
                        backoff_s = min(backoff_s * 2, RETRY_MAX_BACKOFF_S)
                        batch = self._reroute_moved(batch)
                        if not batch:
                            return
                        request = pb.CommitTurnsRequest(
                            worker=self._worker_id, objects=[t for t, _ in batch]
                        )
                        continue
                    raise
            self._metrics.commit_calls.inc()
            for result in response.results:
                _, future = batch[result.index]
                if result.WhichOneof("outcome") == "committed":
                    self._metrics.turns_committed.inc(len(batch[result.index][0].turns))
                if not future.done():
                    future.set_result(result)
            missing = [f for _, f in batch if not f.done()]
            if missing:
                raise StateError(f"the state service left {len(missing)} commit(s) unanswered")
        except Exception as exc:
            failure = exc if isinstance(exc, StateError) else StateError(str(exc))
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure)
        finally:
            self._in_flight -= 1
            if self._queue and not self._scheduled:
                self._scheduled = True
                loop.call_soon(self._send_queued)
