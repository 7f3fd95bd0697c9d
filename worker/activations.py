"""Where a worker's durable objects run: their activations, leases and routing.

Every request for an object (a connect, an event, an alarm, a call) that reaches this worker,
from the queue or on the worker's own subjects, goes through :meth:`Activations.submit`:

- an activation of the object lives here: the request joins its queue;
- none does: the worker asks the state service for the object's lease (``Activate``).
  Granted: a new activation starts here with the lease's epoch. Held by another worker:
  the request is forwarded to that worker's subject, with the reply subject it came with,
  so the holder answers its sender directly (and its acks name the holder, so a gateway
  sends the connection's next events there straight away).

Leases are renewed together, in one call every quarter of their duration; one that is lost
stops its activation at once. An activation also checks that its lease is still surely its
own before it releases a committed turn's output (a worker paused past its lease must not
speak for the object: the epoch fences its writes, this fences its frames).

Hibernation: an activation without requests for ``activation_idle_s`` is evicted, and so
are the least recently used idle ones beyond ``max_activations``; their leases are
released, their connections stay open at the gateways, and the next request activates the
object again (here or on another worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from wsgate import calls, ids, subjects
from wsgate.errors import (
    CallUnavailable,
    InvalidCall,
    ObjectNameTooLong,
    StateError,
    StateTimeout,
    StateUnavailable,
)
from wsgate.fanout import payload_budget
from wsgate.supervision import Spawn, stop_task, unsupervised
from wsgate.v1 import envelope_pb2 as envelope
from wsgate.v1 import state_pb2 as pb
from wsgate.worker.activation import Activation, Phase
from wsgate.worker.decisions import reject_decision
from wsgate.worker.failpoints import Failpoints
from wsgate.worker.http import plain_response
from wsgate.worker.membership import leave_all
from wsgate.worker.metrics import WorkerMetrics
from wsgate.worker.state_client import StateClient
from wsgate.worker.turn_commits import TurnCommitter
from wsgate.worker.work import HOPS_HEADER, MAX_HOPS, Work, WorkKind

if TYPE_CHECKING:
    from wsgate.worker.app import ObjectClass
    from wsgate.worker.env import Env

log = logging.getLogger(__name__)

#: Until a grant says otherwise, leases are taken to last this long (the service's default).
DEFAULT_LEASE_S = 10.0
#: A lease is taken as surely still ours for this share of its duration after a renewal
#: was sent (the service counts from when it received it, later).
LEASE_SAFETY = 0.9
#: Idle activations are looked for this often at most.
EVICTION_SWEEP_S = 1.0

ObjectKey = tuple[str, str]


class _Starting:
    """An object whose lease was asked for: the requests that wait for the answer."""

    __slots__ = ("cls", "works")

    def __init__(self, cls: type[ObjectClass], work: Work) -> None:
        self.cls = cls
        self.works = [work]


class Activations:
    """The activations of one worker (the :class:`~wsgate.worker.activation.ActivationHost`).

    ``publish_command(command)`` publishes a gateway command (counted by the worker);
    ``queue_ack(gateway_id, ack)`` sends a final ack in the worker's batches.
    """

    def __init__(
        self,
        *,
        worker_id: str,
        prefix: str,
        nc: NatsClient,
        state: StateClient,
        env: Env,
        metrics: WorkerMetrics,
        turn_timeout_s: float,
        max_activations: int,
        idle_s: float,
        commit_timeout_s: float,
        drain_timeout_s: float,
        publish_command: Callable[[envelope.GatewayCommand], Awaitable[None]],
        queue_ack: Callable[[str, envelope.EventAck], None],
        failpoints: Failpoints | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.failpoints = failpoints or Failpoints()
        self.state = state
        self.env = env
        self.metrics = metrics
        self.turn_timeout_s = turn_timeout_s
        self.payload_budget = payload_budget(nc)
        self._prefix = prefix
        self._nc = nc
        self._max = max_activations
        self._idle_s = idle_s
        self._commit_timeout_s = commit_timeout_s
        self.commit_timeout_s = commit_timeout_s
        self._drain_timeout_s = drain_timeout_s
        self._publish_command = publish_command
        self.queue_ack = queue_ack
        self._committer = TurnCommitter(
            state, worker_id, retry_for_s=commit_timeout_s, metrics=metrics
        )
        self._active: OrderedDict[ObjectKey, Activation] = OrderedDict()
        self._starting: dict[ObjectKey, _Starting] = {}
        self._lease_s = DEFAULT_LEASE_S
        self._renewing: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._closing = False
        metrics.activations.set_function(lambda: len(self._active))

    def __len__(self) -> int:
        return len(self._active)

    async def start(self, spawn: Spawn = unsupervised) -> None:
        """Start renewing leases and evicting idle activations (loops started with
        ``spawn``: the worker supervises them)."""
        self._loops = [
            spawn("activation_renew", self._renew_loop()),
            spawn("activation_evict", self._evict_loop()),
        ]

    async def close(self) -> None:
        """Drain: new requests are handed back (to other workers); the activations finish
        what they hold (up to the drain timeout), then stop and release their leases, so
        their objects move at once. Idempotent."""
        if self._closing:
            return
        self._closing = True
        for task in self._loops:
            await stop_task(task)
        active = list(self._active.values())
        if active:
            waits = [asyncio.ensure_future(a.wait_idle()) for a in active]
            _, pending = await asyncio.wait(waits, timeout=self._drain_timeout_s)
            for wait in pending:
                wait.cancel()
        leases = []
        for activation in list(self._active.values()):
            if activation.phase is Phase.RUNNING:
                leases.append(pb.Lease(object=activation.object_pb, epoch=activation.epoch))
            self._forget(activation)
            activation.stop("the worker is shutting down")
        if leases:
            with contextlib.suppress(StateError):
                await self._release(leases)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self._drain_timeout_s)
        await self._committer.close()

    # -- routing -------------------------------------------------------------------------

    def submit(self, cls: type[ObjectClass], name: str, work: Work) -> None:
        """Route ``work`` to the activation of the object (``cls``'s namespace, ``name``):
        here, once activated, or to the worker holding it. ``work.done`` resolves when this
        worker is done with it."""
        if self._closing:
            self._spawn(self._give_up(work, "the worker is shutting down"))
            return
        key = (cls.namespace, name)
        activation = self._active.get(key)
        if activation is not None:
            self._active.move_to_end(key)
            activation.enqueue(work)
            return
        starting = self._starting.get(key)
        if starting is not None:
            starting.works.append(work)
            return
        self._starting[key] = _Starting(cls, work)
        self._spawn(self._activate(key))

    async def _activate(self, key: ObjectKey) -> None:
        namespace, name = key
        request = pb.ActivateRequest(
            object=pb.ObjectId(namespace=namespace, name=name), worker=self.worker_id
        )
        try:
            response = await self._activate_until_deadline(request)
        except ObjectNameTooLong as exc:
            # No retry can help: its connects are refused for good (414, the name came
            # from the URL), anything else given up.
            starting = self._starting.pop(key)
            log.info("object %s/%s refused: %s", namespace[:64], name[:64], exc)
            for work in starting.works:
                await self._refuse(work, exc)
            return
        except Exception as exc:
            starting = self._starting.pop(key)
            log.warning("activating %s/%s failed: %r", namespace, name, exc)
            for work in starting.works:
                await self._give_up(work, "the object could not be activated")
            return
        starting = self._starting.pop(key)
        if response.WhichOneof("outcome") == "held":
            self.metrics.activations_started.labels("held").inc()
            for work in starting.works:
                await self._forward(work, response.held.worker)
            return
        granted = response.granted
        self._lease_s = granted.lease_ms / 1000 or self._lease_s
        if self._closing:
            await self._release([pb.Lease(object=request.object, epoch=granted.epoch)])
            for work in starting.works:
                await self._give_up(work, "the worker is shutting down")
            return
        self.metrics.activations_started.labels("granted").inc()
        try:
            activation = Activation(
                self,
                starting.cls,
                name,
                granted.epoch,
                self._lease_s,
                usage=granted.usage,
                quotas=granted.quotas,
            )
        except Exception:
            log.exception("%s.__init__ failed for %r", starting.cls.__qualname__, name)
            await self._release([pb.Lease(object=request.object, epoch=granted.epoch)])
            for work in starting.works:
                await self._give_up(work, "the object's constructor failed")
            return
        self._active[key] = activation
        for work in starting.works:
            activation.enqueue(work)
        self._evict_beyond_capacity()

    async def _forward(self, work: Work, holder: str) -> None:
        """Send ``work`` to the worker holding its object (it answers the sender)."""
        if holder == self.worker_id or work.hops >= MAX_HOPS:
            await self._give_up(work, f"forwarded {work.hops} times")
            return
        # A connect or an event keeps naming the gateway it came from (the holder checks it).
        from_gateway = work.kind is WorkKind.CONNECT or work.kind is WorkKind.EVENT
        sender = ids.gateway_of(work.key) if from_gateway else None
        subject = subjects.worker_subject(self._prefix, holder, work.kind.value, sender)
        try:
            await self._nc.publish(
                subject,
                work.msg.data,
                reply=work.msg.reply,
                headers={HOPS_HEADER: str(work.hops + 1)},
            )
        except nats.errors.Error as exc:
            log.warning("forwarding %s#%d to %s failed: %r", work.key, work.sequence, holder, exc)
        self.metrics.forwarded.inc()
        work.finish()

    async def _give_up(self, work: Work, why: str) -> None:
        """Answer ``work`` so that its sender tries again elsewhere: an event is resent by
        its gateway at once, a connect refused with 503, an alarm retried later."""
        log.info("giving %s#%d back: %s", work.key, work.sequence, why)
        self.metrics.given_back.inc()
        try:
            if work.kind is WorkKind.EVENT:
                retry = envelope.EventAck(sequence=work.sequence, retry=True)
                if work.msg.reply:
                    await self._nc.publish(work.msg.reply, retry.SerializeToString())
            elif work.kind is WorkKind.CONNECT:
                refusal = reject_decision(503, "Object unavailable", {"Retry-After": "1"})
                await self.respond(work.msg, refusal.SerializeToString())
            elif work.kind is WorkKind.CALL:
                # Not run here: the caller may try again (the same call id) until its deadline.
                result = calls.error_result(CallUnavailable(f"not run: {why}"))
                await self.respond(work.msg, result.SerializeToString())
            elif work.kind is WorkKind.REQUEST:
                unavailable = plain_response(503, "Object unavailable", {"Retry-After": "1"})
                await self.respond(work.msg, unavailable.SerializeToString())
            else:
                failed = envelope.AlarmResult(ok=False, error=f"not run: {why}")
                await self.respond(work.msg, failed.SerializeToString())
        except nats.errors.Error as exc:
            log.warning("answering %s#%d failed: %r", work.key, work.sequence, exc)
        work.finish()

    async def _refuse(self, work: Work, exc: ObjectNameTooLong) -> None:
        """Answer ``work`` for an object that can never exist: a connect with 414 URI Too
        Long and the reason; anything else (which no accepted connection can send) is
        given up."""
        if work.kind is WorkKind.CALL:
            result = calls.error_result(InvalidCall(str(exc)))
            await self.respond(work.msg, result.SerializeToString())
            work.finish()
            return
        if work.kind is WorkKind.REQUEST:
            await self.respond(work.msg, plain_response(414, f"{exc}\n").SerializeToString())
            work.finish()
            return
        if work.kind is not WorkKind.CONNECT:
            await self._give_up(work, str(exc))
            return
        self.metrics.quota_refusals.labels("object_name").inc()
        refusal = reject_decision(414, f"{exc}\n")
        await self.respond(work.msg, refusal.SerializeToString())
        work.finish()

    # -- what activations ask of the worker (ActivationHost) ------------------------------

    async def commit(self, turns: pb.ObjectTurns) -> pb.ObjectTurnsResult:
        """Commit one activation's turns (coalesced with other activations')."""
        return await self._committer.commit(turns)

    async def publish_command(self, command: envelope.GatewayCommand) -> None:
        """Publish ``command`` to the gateway of its connections."""
        await self._publish_command(command)

    async def respond(self, msg: Msg, payload: bytes) -> None:
        """Answer a request; a lost answer is retried by its sender (it times out)."""
        if not msg.reply:
            return
        try:
            await self._nc.publish(msg.reply, payload)
        except nats.errors.Error as exc:
            log.warning("an answer to %s was lost: %r", msg.subject, exc)

    async def connection_closed(self, connection_id: str) -> None:
        """The connection's close was committed: it leaves every object (those it joined
        outside its own object too). Best effort: its own object's leave is committed."""
        try:
            await leave_all(self.state, connection_id)
        except StateError as exc:
            log.warning("leaving every object for %s failed: %s", connection_id, exc)

    def handed_back(self, activation: Activation, works: list[Work]) -> None:
        """``activation`` stopped: forget it, and route its unanswered requests again."""
        self._forget(activation)
        for work in works:
            work.hops += 1
            if work.hops > MAX_HOPS:
                self._spawn(self._give_up(work, "handed back too many times"))
                continue
            key = (activation.namespace, activation.name)
            if not self._closing and key not in self._active:
                self.submit(activation.cls, activation.name, work)
            else:
                self._spawn(self._give_up(work, "the activation stopped"))

    async def lease_confirmed(self, activation: Activation) -> bool:
        """Whether ``activation``'s lease is surely still its own; renews it if that is
        not known any more (a worker paused longer than its lease finds it lost here)."""
        deadline = time.monotonic() + self._commit_timeout_s
        while activation.phase is Phase.RUNNING:
            if time.monotonic() < activation.valid_until:
                return True
            if time.monotonic() >= deadline:
                return False
            renewing = self._renew()
            await renewing
            if activation.phase is Phase.RUNNING and time.monotonic() >= activation.valid_until:
                await asyncio.sleep(0.1)  # the service is away: try again, within the deadline
        return False

    # -- leases --------------------------------------------------------------------------

    def _renew(self) -> asyncio.Future[None]:
        """The renewal in progress, or a new one."""
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.get_running_loop().create_task(self._renew_once())
        return asyncio.shield(self._renewing)

    async def _renew_once(self) -> None:
        running = [a for a in self._active.values() if a.phase is Phase.RUNNING]
        if not running:
            return
        # One call per replica, each to the replica that owns the objects (their leases
        # live there).
        by_replica: dict[str, list[Activation]] = {}
        for activation in running:
            address = self.state.owner_address(activation.object_pb)
            by_replica.setdefault(address, []).append(activation)
        await asyncio.gather(
            *(self._renew_at(address, group) for address, group in by_replica.items())
        )

    async def _renew_at(self, address: str, activations: list[Activation]) -> None:
        request = pb.RenewRequest(
            worker=self.worker_id,
            leases=[pb.Lease(object=a.object_pb, epoch=a.epoch) for a in activations],
        )
        sent = time.monotonic()
        try:
            response = await self.state.activations.renew_at(
                address, request, timeout_s=max(self._lease_s / 2, 0.5)
            )
        except StateError as exc:
            log.warning("renewing %d lease(s) failed: %s", len(activations), exc)
            return
        self._lease_s = response.lease_ms / 1000 or self._lease_s
        lost = set(response.lost)
        for index, activation in enumerate(activations):
            if index in lost:
                self.metrics.activations_fenced.inc()
                activation.stop("its lease was lost")
            else:
                activation.valid_until = sent + self._lease_s * LEASE_SAFETY

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 4)
            await self._renew()

    async def _release(self, leases: list[pb.Lease]) -> None:
        by_replica: dict[str, list[pb.Lease]] = {}
        for lease in leases:
            by_replica.setdefault(self.state.owner_address(lease.object), []).append(lease)
        await asyncio.gather(
            *(
                self.state.activations.release_at(
                    address, pb.ReleaseRequest(worker=self.worker_id, leases=group)
                )
                for address, group in by_replica.items()
            )
        )

    # -- eviction ------------------------------------------------------------------------

    async def _evict_loop(self) -> None:
        while True:
            await asyncio.sleep(min(EVICTION_SWEEP_S, self._idle_s / 4))
            now = time.monotonic()
            idle = [
                a for a in self._active.values() if a.idle and now - a.last_used >= self._idle_s
            ]
            if idle:
                self._evict(idle, "idle")

    def _evict_beyond_capacity(self) -> None:
        excess = len(self._active) - self._max
        if excess <= 0:
            return
        # Oldest use first; busy ones stay (the cap is reached again once they are idle).
        victims = [a for a in self._active.values() if a.idle][:excess]
        if victims:
            self._evict(victims, "capacity")

    def _evict(self, activations: list[Activation], reason: str) -> None:
        leases = []
        for activation in activations:
            self._forget(activation)
            activation.stop(f"evicted ({reason})", quiet=True)
            leases.append(pb.Lease(object=activation.object_pb, epoch=activation.epoch))
            self.metrics.evictions.labels(reason).inc()
        self._spawn(self._release_quietly(leases))

    async def _release_quietly(self, leases: list[pb.Lease]) -> None:
        try:
            await self._release(leases)
        except StateError as exc:
            # They run out on their own; the objects move only that much later.
            log.warning("releasing %d lease(s) failed: %s", len(leases), exc)

    # -- helpers -------------------------------------------------------------------------

    def _forget(self, activation: Activation) -> None:
        key = (activation.namespace, activation.name)
        if self._active.get(key) is activation:
            del self._active[key]

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _activate_until_deadline(self, request: pb.ActivateRequest) -> pb.ActivateResponse:
        """``Activations.Activate``, tried again while the service is away, up to the
        commit timeout (a restarting state service is waited for)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._commit_timeout_s
        backoff_s = 0.05
        while True:
            try:
                return await self.state.activations.activate(
                    request, timeout_s=max(deadline - loop.time(), 0.001)
                )
            except (StateUnavailable, StateTimeout):
                if loop.time() + backoff_s >= deadline:
                    raise
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 1.0)
