"""One durable object's activation: its single point of coordination, on one worker.

While this worker holds the object's lease (:mod:`wsgate.worker.activations` asks for it), every
event of the object comes here, from whichever gateway and connection, and runs as a
*turn*: one at a time, in arrival order (so each connection's order too), each handler in
a Task of its own, cancelled past the turn limit. Code written for Cloudflare, such as a
``get`` then a ``put``, is therefore exact without a transaction.

The life of a turn::

    arrive ─► queue ─► (a copy of a turn released here? its answer again, done)
                 │      (redelivered? look up its record: release the outcome, done)
                 │
                 ▼
            run the handler (storage from memory; writes, sends collected in the Turn)
                 │
                 ▼
            queue its commit ─► next turn starts at once
                 │
    CommitTurns (with the turns that ended meanwhile; fenced by the epoch) ─► durable
                 │
                 ▼
            release: frames, commands, the ack or the answer (the output gate)

At most one commit of the activation is in flight; turns that end meanwhile go together in
the next one, so one commit serves more turns the busier the object is. A commit refused
(another activation holds the lease now, or a turn ran twice) stops the activation: its
memory is not the object's any more. Its turns that were not released are handed back to
the worker, which sends them where the object now lives; they carry a mark that makes the
new host look their records up first (a turn that did commit is then answered from its
record, never run twice).

Quotas: the activation counts what its object holds (:mod:`wsgate.worker.activation_quota`), so a
handler's write over a quota raises as it is made, and a connection that would take the
object over its member quota is refused at its upgrade (503, nothing joined). The state
service checks again at the commit; a commit it refuses for a quota stops the activation
like any refused commit (its turns run again on a fresh count, where the handler then sees
the refusal). A commit refused because the service's disk is low (STORAGE_FULL) is tried
again, its output held, until space returns or the commit timeout passes.

A turn's output leaves at most once from the activation that committed it: a copy of its
event that comes later (its gateway gave up waiting for the ack and resent it) gets the
answer again (the ack and the frames riding on it, the decision, the alarm's result), never
its commands (a broadcast, sends to other connections) nor its frames to the event's
connection sent as commands. A release, once begun, is finished even if the activation
stops meanwhile, and copies of released turns are answered at the stop, not handed back.
Only a new host that finds the record of a turn releases its output again: its first
release may have been lost with its worker (at least once, then).
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import inspect
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from nats.aio.msg import Msg

from wsgate import calls, ids
from wsgate.closecodes import CloseCode
from wsgate.eager import start_task
from wsgate.errors import CallError, CallFailed, ObjectQuotaExceeded, StateError, TooManyMembers
from wsgate.limits import MAX_BATCH_KEYS
from wsgate.state_errors import Reason
from wsgate.v1 import envelope_pb2 as envelope
from wsgate.v1 import state_pb2 as pb
from wsgate.worker import state_methods as methods
from wsgate.worker.activation_alarm import ActivationAlarm
from wsgate.worker.activation_members import ActivationMembers
from wsgate.worker.activation_quota import QUOTA_LABELS, ObjectQuota
from wsgate.worker.activation_storage import ActivationStorage
from wsgate.worker.app import ConnectRequest, ObjectClass, Reject
from wsgate.worker.auth import Verified, with_auth_subprotocol
from wsgate.worker.decisions import (
    accept_decision,
    check_accept,
    connect_handler_result,
    connect_outcome,
    reject_decision,
)
from wsgate.worker.durable import instantiate, public_method
from wsgate.worker.errors import InvalidResponse
from wsgate.worker.http import HttpRequest, Response, plain_response
from wsgate.worker.object_cache import (
    UNKNOWN,
    KeyRange,
    Layer,
    StorageCache,
    merged_listing,
    needs_remote,
    remote_limit,
)
from wsgate.worker.object_connection import ObjectConnection
from wsgate.worker.state_methods import Req, Resp, Unary
from wsgate.worker.turn import Turn, TurnKind, current_turn
from wsgate.worker.work import Work, WorkKind

if TYPE_CHECKING:
    from wsgate.worker.durable import DurableObject
    from wsgate.worker.env import Env
    from wsgate.worker.failpoints import Failpoints
    from wsgate.worker.metrics import WorkerMetrics
    from wsgate.worker.state_client import StateClient

log = logging.getLogger(__name__)

#: A handler cancelled at the turn limit gets this long to unwind before it is abandoned.
CANCEL_GRACE_S = 1.0

#: A commit refused for want of disk space is tried again after this long, doubling ...
STORAGE_FULL_FIRST_BACKOFF_S = 0.05
#: ... up to this.
STORAGE_FULL_MAX_BACKOFF_S = 1.0

#: Replies to the event's own connection ride on its ack up to this many bytes in all;
#: beyond, they leave as commands (NATS' payload limit, and a big ack would stall others).
MAX_ACK_MESSAGE_BYTES = 64 * 1024


class ActivationHost(Protocol):
    """What an activation needs from its worker
    (:class:`~wsgate.worker.activations.Activations`)."""

    worker_id: str
    state: StateClient
    env: Env
    metrics: WorkerMetrics
    turn_timeout_s: float
    payload_budget: int
    failpoints: Failpoints
    #: How long a commit is tried again while the state service cannot take it.
    commit_timeout_s: float

    async def commit(self, turns: pb.ObjectTurns) -> pb.ObjectTurnsResult:
        """Commit one activation's turns (retried while the state service is away)."""
        ...

    async def lease_confirmed(self, activation: Activation) -> bool:
        """Whether the activation's lease is still its own (renewing it if need be)."""
        ...

    async def publish_command(self, command: envelope.GatewayCommand) -> None:
        """Publish a command to the gateway its connections belong to."""
        ...

    def queue_ack(self, gateway_id: str, ack: envelope.EventAck) -> None:
        """Send a final ack (batched per gateway)."""
        ...

    async def respond(self, msg: Msg, payload: bytes) -> None:
        """Answer a request (a connect, an alarm)."""
        ...

    async def connection_closed(self, connection_id: str) -> None:
        """The connection's close was committed: it leaves every object."""
        ...

    def handed_back(self, activation: Activation, works: list[Work]) -> None:
        """The activation stopped: send these requests where the object lives now."""
        ...


class Phase(enum.Enum):
    """An activation's life; it only moves forward."""

    RUNNING = "running"
    STOPPED = "stopped"


@dataclass(eq=False)
class _Committing:
    """A turn that ran, waiting for its commit and then its release."""

    work: Work
    turn: pb.Turn
    number: int
    #: Copies of the same event that arrived meanwhile: answered with it.
    copies: list[Work] = field(default_factory=list)


@dataclass(eq=False)
class _Known:
    """The last turn of a key run by this activation."""

    sequence: int
    pending: _Committing | None
    outcome: pb.TurnOutcome | None = None


class Activation:
    """The activation of one object on this worker, with lease epoch ``epoch``."""

    def __init__(
        self,
        host: ActivationHost,
        cls: type[ObjectClass],
        name: str,
        epoch: int,
        lease_s: float,
        *,
        usage: pb.ObjectUsage | None = None,
        quotas: pb.ObjectQuotas | None = None,
    ) -> None:
        self.host = host
        self.cls = cls
        namespace = self.namespace = cls.namespace
        self.name = name
        self.object_pb = pb.ObjectId(namespace=namespace, name=name)
        self.epoch = epoch
        self.lease_s = lease_s
        #: Until when (monotonic) the lease is surely still ours without asking again.
        self.valid_until = time.monotonic() + lease_s * 0.9
        self.phase = Phase.RUNNING
        self.state: StateClient = host.state
        self.env: Env = host.env
        self.payload_budget = host.payload_budget
        self.cache = StorageCache()
        #: What the object holds, counted against the quotas of its lease's grant.
        self.quota = ObjectQuota(usage or pb.ObjectUsage(), quotas or pb.ObjectQuotas())
        #: The number of the last turn committed (turns commit in order).
        self._committed_through = 0
        self._commit_waiters: list[asyncio.Future[None]] = []
        #: Resolved at once: what a write returns (durable with its turn, not before).
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done.set_result(None)
        self.memory_reads = host.metrics.storage_reads.labels("memory")
        self._state_reads = host.metrics.storage_reads.labels("state")
        self.storage = ActivationStorage(self)
        self.members = ActivationMembers(self)
        self.alarm = ActivationAlarm(self)
        #: When the last request arrived (monotonic), for idle eviction.
        self.last_used = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self._queue: deque[Work] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._current: Work | None = None
        self._handler: asyncio.Task[Any] | None = None
        self._turns = 0
        self._known: dict[str, _Known] = {}
        self._unsent: list[_Committing] = []
        self._in_flight: list[_Committing] = []
        self._committer: asyncio.Task[None] | None = None
        #: The batch being released, its lease confirmed: finished whatever happens.
        self._releasing: list[_Committing] = []
        self._idle_waiters: list[asyncio.Future[None]] = []
        self.instance: DurableObject = instantiate(cls, self)
        self._runner = self._loop.create_task(self._run())

    def __repr__(self) -> str:
        return f"<Activation {self.namespace!r}/{self.name!r} epoch {self.epoch}>"

    # -- the queue -------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Nothing queued, running, committing or waiting to commit."""
        return not (
            self._queue or self._current or self._unsent or self._in_flight or self._committer
        )

    def enqueue(self, work: Work) -> None:
        """Run ``work`` as a turn after those queued before it."""
        if self.phase is Phase.STOPPED:
            self.host.handed_back(self, [work])
            return
        self.last_used = time.monotonic()
        self._queue.append(work)
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _run(self) -> None:
        while True:
            while not self._queue:
                self._wakeup = self._loop.create_future()
                await self._wakeup
            work = self._queue.popleft()
            self._current = work
            try:
                await self._take(work)
            except asyncio.CancelledError:
                raise
            except StateError as exc:
                # A record or a read could not be had within the turn limit.
                self.stop(f"the state service failed {work.key}#{work.sequence}: {exc}")
                return
            except Exception:
                # A bug here, not in a handler: the object's memory cannot be trusted.
                log.exception("%r failed on %s#%d", self, work.key, work.sequence)
                self.stop("internal error")
                return
            finally:
                self._current = None
                self._notify_if_idle()

    async def _take(self, work: Work) -> None:
        known = self._known.get(work.key)
        if known is not None and work.sequence <= known.sequence:
            if work.sequence < known.sequence:
                work.finish()  # a copy of an event answered long ago: its ack is stale
            elif known.pending is not None:
                known.pending.copies.append(work)  # answered with the turn in flight
            elif known.outcome is not None:
                # Released by this activation already: only the answer again. The gateway
                # resent the event because the ack was late or lost; the commands left
                # with it, and sending them again would duplicate a broadcast.
                await self._answer_again(work, known.outcome)
                work.finish()
            return
        if known is None and work.retried:
            # It may have run before, elsewhere: its record says so, if it committed.
            response = await self._lookup(work.key)
            if response.found and response.sequence >= work.sequence:
                self.host.metrics.turn_replays.inc()
                if response.sequence == work.sequence:
                    await self._release_outcome(work, response.outcome)
                work.finish()
                return
        committing = await self._run_turn(work)
        if committing is None:
            return
        self._known[work.key] = _Known(work.sequence, committing)
        self._unsent.append(committing)
        if self._committer is None:
            self._committer = self._loop.create_task(self._commit_loop())

    # -- running one turn ------------------------------------------------------------------

    async def _run_turn(self, work: Work) -> _Committing | None:
        self._turns += 1
        kind = _turn_kind(work)
        turn = Turn(self, self._turns, kind, work.key, work.sequence)
        if work.call is not None:
            turn.call_chain = work.call.chain
        context = contextvars.copy_context()
        context.run(current_turn.set, turn)
        started = time.perf_counter()
        outcome: _Outcome = _Outcome()
        handler = start_task(self._loop, self._call(work, turn, outcome), context=context)
        self._handler = handler
        # Resolved when the handler is done, or given up on past the limit and a grace.
        # (A future and a timer: half the cost of asyncio.wait, paid on every turn.)
        finished: asyncio.Future[None] = self._loop.create_future()
        handler.add_done_callback(lambda _: _resolve(finished))
        limit = self._loop.call_later(
            self.host.turn_timeout_s, self._turn_expired, turn, handler, finished
        )
        try:
            await finished
            if not handler.done() or handler.cancelled() or handler.exception() is not None:
                turn.failed = True
        finally:
            limit.cancel()
            self._handler = None
            if kind is TurnKind.CLOSE:
                # Whatever the handler did: a closed connection leaves the object.
                self.members.leave(turn, work.key)
            turn.end()
            self.host.metrics.handler_seconds.observe(time.perf_counter() - started)
        if turn.failed:
            self.host.metrics.handler_errors.inc()
        self.host.metrics.turns.labels(kind.value, "failed" if turn.failed else "ok").inc()
        self.alarm.turn_ended(turn)
        if kind is TurnKind.CONNECT:
            decision = outcome.decision if not turn.failed and outcome.decision else None
            if decision is None:
                decision = reject_decision(500, "Internal Server Error")
            return _Committing(work, turn.to_proto(decision=decision), turn.number)
        if kind is TurnKind.CALL or kind is TurnKind.REQUEST:
            answer = outcome.answer
            if answer is None:  # cancelled at the turn limit
                answer = self._overdue_answer(kind)
            return _Committing(work, turn.to_proto(decision=None, answer=answer), turn.number)
        if kind is not TurnKind.ALARM and turn.failed and not _closes(turn):
            # As an exception in a Worker does: the connection ends with 1011.
            turn.outputs.append(
                pb.TurnOutput(
                    close=envelope.CloseConnection(
                        code=CloseCode.INTERNAL_ERROR, reason="internal error"
                    )
                )
            )
        return _Committing(work, turn.to_proto(decision=None), turn.number)

    def _turn_expired(
        self, turn: Turn, handler: asyncio.Task[Any], finished: asyncio.Future[None]
    ) -> None:
        """The turn limit: cancel the handler; move on after a grace even if it goes on."""
        if handler.done():
            return
        self.host.metrics.turn_timeouts.inc()
        log.warning(
            "%r: the turn of %s#%d ran past %g s: cancelled",
            self, turn.key, turn.sequence, self.host.turn_timeout_s,
        )  # fmt: skip
        turn.failed = True  # before the cancel: the handler's Task is not to log it
        handler.cancel()
        self._loop.call_later(CANCEL_GRACE_S, _resolve, finished)

    async def _call(self, work: Work, turn: Turn, outcome: _Outcome) -> None:
        """The handler's Task: runs the object's handler for ``work``, then waits for what
        it started and did not await (its transactions)."""
        try:
            if turn.kind is TurnKind.CONNECT:
                assert work.connect is not None
                outcome.decision = await self._connect(
                    work.connect, work.params, turn, work.verified
                )
            elif turn.kind is TurnKind.ALARM:
                await self.instance.on_alarm()
            elif turn.kind is TurnKind.CALL:
                assert work.call is not None
                outcome.answer = (await self._invoke(work.call, turn)).SerializeToString()
            elif turn.kind is TurnKind.REQUEST:
                assert work.http_request is not None
                claims = work.verified.claims if work.verified is not None else None
                response = await self._serve(work.http_request, work.params, claims, turn)
                outcome.answer = response.SerializeToString()
            else:
                assert work.event is not None
                await self._event(work.event, work.params, turn)
            if turn.pending:
                await asyncio.gather(*turn.pending)
        except asyncio.CancelledError:
            if not turn.failed:  # not the turn limit: the handler cancelled its own Task
                log.warning("%r: handler cancelled for %s#%d", self, work.key, work.sequence)
            raise
        except Exception:
            log.exception("%r: handler failed for %s#%d", self, work.key, work.sequence)
            raise

    async def _invoke(self, call: envelope.ObjectCall, turn: Turn) -> envelope.CallResult:
        """Run the method ``call`` names on the instance: its value, or why there is none.
        A method that raises fails the turn (counted) but its writes stay, as a handler's
        do; the caller gets CallFailed."""
        try:
            method = public_method(self.instance, call.method)
            args, kwargs = calls.decode_arguments(call.arguments)
        except CallError as exc:
            return calls.error_result(exc)
        try:
            result = method(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            turn.failed = True
            log.info("%r: method %s raised %r", self, call.method, exc, exc_info=True)
            return calls.failed_result(exc)
        return calls.value_result(result)

    async def _serve(
        self,
        request: envelope.HttpRequest,
        params: Mapping[str, str],
        claims: Mapping[str, object] | None,
        turn: Turn,
    ) -> envelope.HttpResponse:
        """Answer a plain HTTP request with the object's ``on_request``; raising (or a
        response that is not a Response, or one too large for NATS) fails the turn (its
        writes stay) and answers 500."""
        try:
            response = await self.instance.on_request(
                HttpRequest.from_envelope(request, params, claims)
            )
            if not isinstance(response, Response):
                raise InvalidResponse(
                    f"on_request returned {type(response).__name__}, not a Response"
                )
        except Exception:
            turn.failed = True
            log.exception(
                "%r: on_request failed for %s %s", self, request.method, request.path[:200]
            )
            return plain_response(500, "Internal Server Error")
        answer = response.to_envelope()
        if answer.ByteSize() > self.payload_budget:
            turn.failed = True
            log.error("%r: a response of %d bytes is over NATS' payload", self, answer.ByteSize())
            return plain_response(500, "Response too large")
        return answer

    def _overdue_answer(self, kind: TurnKind) -> bytes:
        """The answer of a call's or a request's turn cut at the turn limit."""
        limit = self.host.turn_timeout_s
        if kind is TurnKind.REQUEST:
            return plain_response(504, "The object did not answer in time").SerializeToString()
        overdue = CallFailed(
            f"the method ran past the turn limit of {limit:g} s", remote_type="TimeoutError"
        )
        return calls.error_result(overdue).SerializeToString()

    async def _connect(
        self,
        request_pb: envelope.ConnectRequest,
        params: Mapping[str, str],
        turn: Turn,
        verified: Verified | None,
    ) -> envelope.ConnectDecision:
        conn = ObjectConnection(
            self, turn, request_pb.connection_id, request_pb.path, params, connecting=True
        )
        claims = verified.claims if verified is not None else None
        request = ConnectRequest.from_envelope(request_pb, params, claims)
        decided = connect_outcome(
            await connect_handler_result(self.instance.on_connect(conn, request), self.host.metrics)
        )
        if isinstance(decided, Reject):
            return reject_decision(decided.status, decided.body, decided.headers)
        decided = with_auth_subprotocol(decided, verified)
        check_accept(decided, request)
        full = await self._join_refusal(turn, request_pb.connection_id)
        if full is not None:
            # Refused before the upgrade: the client never sees an open socket close.
            self.refused(full)
            log.info("%r: connection %s refused: %s", self, request_pb.connection_id, full)
            return reject_decision(503, f"{full}\n", {"Retry-After": "5"})
        self.members.join(turn, request_pb.connection_id, decided.tags, decided.state)
        return accept_decision(decided, turn.replies, worker=self.host.worker_id)

    async def _event(
        self, event: envelope.ConnectionEvent, params: Mapping[str, str], turn: Turn
    ) -> None:
        closing = turn.kind is TurnKind.CLOSE
        conn = ObjectConnection(
            self,
            turn,
            event.connection_id,
            event.path,
            params,
            closed=closing,
            sequence=event.sequence,
            redelivered=event.redelivered,
        )
        await self.members.load_attachment(event.connection_id)
        if closing:
            await self.instance.on_close(conn, event.closed.code, event.closed.reason)
        else:
            data = event.message
            payload = data.text if data.WhichOneof("data") == "text" else data.binary
            await self.instance.on_message(conn, payload)

    # -- quotas ------------------------------------------------------------------------------

    def refused(self, exc: ObjectQuotaExceeded) -> ObjectQuotaExceeded:
        """Count a refusal for a quota; returns it (to raise)."""
        self.host.metrics.quota_refusals.labels(QUOTA_LABELS.get(type(exc), "other")).inc()
        return exc

    async def _join_refusal(self, turn: Turn, connection_id: str) -> TooManyMembers | None:
        """TooManyMembers if the object is at its member quota (exactly: settled with the
        state service when the count says so)."""
        refused = self.quota.join_refusal(connection_id)
        if refused is not None:
            await self.settle_quota(turn, [])
            refused = self.quota.join_refusal(connection_id)
        return refused

    async def settle_quota(self, turn: Turn, unknown: list[str]) -> None:
        """Make the quota count exact for ``turn``, the one running (see
        :mod:`wsgate.worker.activation_quota`), and teach the cache the ``unknown`` keys a write
        of it is about to change. Waits for the turns before it to commit."""
        await self._committed_before(turn.number)
        response = await self.call(methods.USAGE, pb.UsageRequest(object=self.object_pb))
        held: dict[str, bytes] = {}
        replaced = self.quota.unknown_before(turn.number)
        for start in range(0, len(replaced), MAX_BATCH_KEYS):
            held.update(await self.read_remote(replaced[start : start + MAX_BATCH_KEYS]))
        for start in range(0, len(unknown), MAX_BATCH_KEYS):
            await self.read_keys(unknown[start : start + MAX_BATCH_KEYS], [self.cache])
        self.quota.settle(turn.number, self.cache, response.usage, held)

    async def _committed_before(self, number: int) -> None:
        """Until every turn numbered below ``number`` is committed; raises StateError if
        the activation stops first."""
        while self._committed_through < number - 1:
            if self.phase is Phase.STOPPED:
                raise StateError(f"{self!r} stopped before its turns committed")
            waiter = self._loop.create_future()
            self._commit_waiters.append(waiter)
            await waiter

    def _wake_commit_waiters(self) -> None:
        waiters, self._commit_waiters = self._commit_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _commit_when_space(
        self, request: pb.ObjectTurns, result: pb.ObjectTurnsResult
    ) -> pb.ObjectTurnsResult:
        """``result``, or while it is a refusal for want of disk space, the result of
        committing ``request`` again, up to the commit timeout (the turns' output waits)."""
        if not _storage_full(result):
            return result
        deadline = self._loop.time() + self.host.commit_timeout_s
        backoff_s = STORAGE_FULL_FIRST_BACKOFF_S
        self.host.metrics.quota_refusals.labels("disk").inc()
        while (
            _storage_full(result)
            and self.phase is Phase.RUNNING
            and self._loop.time() + backoff_s < deadline
        ):
            log.warning("%r: the state service's disk is low; committing again", self)
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, STORAGE_FULL_MAX_BACKOFF_S)
            result = await self.host.commit(request)
        return result

    # -- commits and releases ----------------------------------------------------------------

    async def _commit_loop(self) -> None:
        try:
            while self._unsent and self.phase is Phase.RUNNING:
                batch, self._unsent = self._unsent, []
                self._in_flight = batch
                request = pb.ObjectTurns(
                    object=self.object_pb, epoch=self.epoch, turns=[c.turn for c in batch]
                )
                try:
                    result = await self._commit_when_space(request, await self.host.commit(request))
                except StateError as exc:
                    log.warning("%r: committing %d turn(s) failed: %s", self, len(batch), exc)
                    self.stop("commit failed")
                    return
                if result.WhichOneof("outcome") != "committed":
                    refused = result.refused
                    if refused.fenced:
                        self.host.metrics.activations_fenced.inc()
                    log.warning("%r: commit refused: %s", self, refused.details)
                    self.stop("commit refused")
                    return
                self.members.committed(batch[-1].number)
                self._committed_through = batch[-1].number
                self._wake_commit_waiters()
                self.host.failpoints.after_commit(c.work.event for c in batch)
                if not await self.host.lease_confirmed(self):
                    # Committed, but the lease may be another's by now: release nothing.
                    # The new host answers these events from their records.
                    self.stop("lease lost")
                    return
                # Released in full even if the activation stops meanwhile (stop() neither
                # cancels this nor hands the batch back): a release cut short and handed
                # back would be released again from the records, its first part twice.
                self._in_flight, self._releasing = [], batch
                try:
                    for committing in batch:
                        await self._release(committing)
                finally:
                    self._releasing = []
        finally:
            self._committer = None
            self._notify_if_idle()

    async def _release(self, committing: _Committing) -> None:
        outcome = committing.turn.outcome
        known = self._known.get(committing.work.key)
        if known is not None and known.pending is committing:
            known.pending = None
            known.outcome = outcome
        work = committing.work
        if work.kind in _ANSWERED_ONCE or _is_close(work):
            self._known.pop(work.key, None)  # nothing of it can come again but a late copy
        await self._release_outcome(committing.work, outcome)
        for work in (committing.work, *committing.copies):
            work.finish()

    async def _release_outcome(self, work: Work, outcome: pb.TurnOutcome) -> None:
        """Send what a committed turn produced: its output in order, then the answer (the
        event's ack, the connect decision, the alarm's result)."""
        host = self.host
        if work.kind is WorkKind.EVENT:
            assert work.event is not None
            event = work.event
            ack = self._event_ack(event, outcome)
            if not ack.messages:
                for output in outcome.outputs:
                    await host.publish_command(_as_command(output, event))
            if event.WhichOneof("kind") == "closed":
                await host.connection_closed(event.connection_id)
            host.queue_ack(ids.gateway_of(event.connection_id), ack)
        elif work.kind is WorkKind.CONNECT:
            for output in outcome.outputs:
                await host.publish_command(output.command)
            await host.respond(work.msg, outcome.decision.SerializeToString())
        else:
            for output in outcome.outputs:
                await host.publish_command(output.command)
            await host.respond(work.msg, _answer(work, outcome))

    async def _answer_again(self, work: Work, outcome: pb.TurnOutcome) -> None:
        """Answer a copy of a request whose turn this activation released: the answer
        only, without the output that left with the first release."""
        if work.kind is WorkKind.EVENT:
            assert work.event is not None
            # The frames riding on the ack are part of it: the gateway takes them only if
            # the first ack never came (they were lost with it), as a stale ack otherwise.
            self._ack_again(work.event, outcome)
        elif work.kind is WorkKind.CONNECT:
            await self.host.respond(work.msg, outcome.decision.SerializeToString())
        else:
            await self.host.respond(work.msg, _answer(work, outcome))

    def _event_ack(
        self, event: envelope.ConnectionEvent, outcome: pb.TurnOutcome
    ) -> envelope.EventAck:
        """The final ack of ``event``, with the turn's frames when they all ride on it."""
        ack = envelope.EventAck(
            sequence=event.sequence, connection_id=event.connection_id, worker=self.host.worker_id
        )
        if _rides_on_ack(outcome.outputs):
            ack.messages.extend(output.reply for output in outcome.outputs)
        return ack

    def _ack_again(self, event: envelope.ConnectionEvent, outcome: pb.TurnOutcome) -> None:
        self.host.queue_ack(ids.gateway_of(event.connection_id), self._event_ack(event, outcome))

    def _answered_at_stop(self, work: Work) -> bool:
        """At a stop: answer ``work`` here if it is a copy of an event whose turn this
        activation released (handed back, its new host would release the output again from
        the record). Whether it was."""
        known = self._known.get(work.key)
        if work.event is None or known is None or work.sequence > known.sequence:
            return False
        if work.sequence == known.sequence:
            if known.pending is not None:
                if known.pending not in self._releasing:
                    return False  # not committed yet: handed back with its turn
                known.pending.copies.append(work)  # answered by the release under way
                return True
            assert known.outcome is not None
            self._ack_again(work.event, known.outcome)
        work.finish()  # older ones: a copy of an event answered long ago, as in _take
        return True

    async def _lookup(self, key: str) -> pb.LookupTurnResponse:
        return await self.call(methods.LOOKUP_TURN, pb.LookupTurnRequest(key=key))

    # -- reads for the storage, members and alarm ------------------------------------------------

    async def call(self, method: Unary[Req, Resp], request: Req) -> Resp:
        """A read from the state service, waiting for it within the turn limit (a
        restarting service is waited for, not failed)."""
        return await self.state.call(method, request, timeout_s=self.host.turn_timeout_s)

    async def read_remote(self, keys: list[str]) -> dict[str, bytes]:
        """What the state service holds for ``keys`` (committed values)."""
        self._state_reads.inc(len(keys))
        response = await self.call(methods.GET, pb.GetRequest(object=self.object_pb, keys=keys))
        return {entry.key: entry.value for entry in response.entries}

    async def read_keys(self, keys: list[str], layers: list[Layer]) -> dict[str, bytes]:
        """The encoded values of the keys that exist, as the top of ``layers`` sees them;
        keys no layer knows are read from the state service once and kept in the cache."""
        found: dict[str, bytes] = {}
        missing: list[str] = []
        for key in keys:
            value = _lookup(layers, key)
            if value is UNKNOWN:
                missing.append(key)
            elif isinstance(value, bytes):
                found[key] = value
        self.memory_reads.inc(len(keys) - len(missing))
        if missing:
            remote = await self.read_remote(missing)
            for key in missing:
                self.cache.fill(key, remote.get(key))
            for key in missing:
                value = _lookup(layers, key)
                if isinstance(value, bytes):
                    found[key] = value
            found = {key: found[key] for key in keys if key in found}
        return found

    async def list_keys(
        self, bounds: KeyRange, limit: int | None, reverse: bool, layers: list[Layer]
    ) -> list[tuple[str, bytes]]:
        """A listing as the top of ``layers`` sees it (the state service is asked unless a
        layer knows every key; a listing of every key teaches the cache every key)."""
        remote: dict[str, bytes] | None = None
        if needs_remote(layers):
            wire_limit = remote_limit(layers, bounds, limit)
            request = pb.ListRequest(
                object=self.object_pb,
                prefix=bounds.prefix,
                limit=min(wire_limit or 0, 2**32 - 1),
                reverse=reverse,
            )
            if bounds.start is not None:
                request.start = bounds.start
            if bounds.end is not None:
                request.end = bounds.end
            self._state_reads.inc()
            response = await self.call(methods.LIST, request)
            remote = {entry.key: entry.value for entry in response.entries}
            for key, value in remote.items():
                self.cache.fill(key, value)
            if bounds.is_everything and limit is None and layers and layers[0] is self.cache:
                self.cache.whole = True
        else:
            self.memory_reads.inc()
        return merged_listing(remote, layers, bounds, limit=limit, reverse=reverse)

    # -- the end ---------------------------------------------------------------------------------

    def stop(self, reason: str, *, quiet: bool = False) -> None:
        """Stop at once: the handler running is cancelled, nothing more is released (but
        the rest of a batch whose release began), and every request not answered is handed
        back to the worker (copies of released turns are answered with their ack instead).
        Idempotent. ``quiet``: an ordinary end (an eviction), logged at debug level only."""
        if self.phase is Phase.STOPPED:
            return
        self.phase = Phase.STOPPED
        log.log(logging.DEBUG if quiet else logging.INFO, "%r stopped: %s", self, reason)
        self._runner.cancel()
        if self._handler is not None:
            self._handler.cancel()
        committer = self._committer
        if (
            committer is not None
            and committer is not asyncio.current_task()
            and not self._releasing  # a release once begun is finished (see _commit_loop)
        ):
            committer.cancel()
        works: list[Work] = []
        for committing in (*self._in_flight, *self._unsent):
            works.extend((committing.work, *committing.copies))
        if self._current is not None and self._current not in works:
            works.append(self._current)
        works.extend(w for w in self._queue if not self._answered_at_stop(w))
        self._in_flight, self._unsent, self._current = [], [], None
        self._queue.clear()
        for work in works:
            work.retried = True  # it may have committed: the next host looks it up
        self.host.handed_back(self, [w for w in works if not w.done.done()])
        self._wake_commit_waiters()
        self._notify_if_idle()

    async def wait_idle(self) -> None:
        """Until nothing is queued, running or committing (or the activation stopped)."""
        while not self.idle and self.phase is Phase.RUNNING:
            waiter = self._loop.create_future()
            self._idle_waiters.append(waiter)
            await waiter

    def _notify_if_idle(self) -> None:
        if self._idle_waiters and (self.idle or self.phase is Phase.STOPPED):
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)


@dataclass
class _Outcome:
    decision: envelope.ConnectDecision | None = None
    #: A call's or a request's answer, serialized.
    answer: bytes | None = None


#: Kinds of request no copy of which can come again once answered, but a late one: their
#: keys are not kept after the release.
_ANSWERED_ONCE = frozenset({WorkKind.ALARM, WorkKind.CALL, WorkKind.REQUEST})


def _storage_full(result: pb.ObjectTurnsResult) -> bool:
    return (
        result.WhichOneof("outcome") == "refused"
        and result.refused.info.reason == Reason.STORAGE_FULL
    )


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _turn_kind(work: Work) -> TurnKind:
    if work.kind is WorkKind.CONNECT:
        return TurnKind.CONNECT
    if work.kind is WorkKind.ALARM:
        return TurnKind.ALARM
    if work.kind is WorkKind.CALL:
        return TurnKind.CALL
    if work.kind is WorkKind.REQUEST:
        return TurnKind.REQUEST
    assert work.event is not None
    return TurnKind.CLOSE if work.event.WhichOneof("kind") == "closed" else TurnKind.MESSAGE


def _is_close(work: Work) -> bool:
    return work.event is not None and work.event.WhichOneof("kind") == "closed"


def _closes(turn: Turn) -> bool:
    return turn.kind is TurnKind.CLOSE or any(o.HasField("close") for o in turn.outputs)


def _lookup(layers: list[Layer], key: str) -> bytes | object | None:
    for layer in reversed(layers):
        value = layer.lookup(key)
        if value is not UNKNOWN:
            return value
    return UNKNOWN


def _rides_on_ack(outputs: Iterable[pb.TurnOutput]) -> bool:
    size = 0
    for output in outputs:
        if not output.HasField("reply"):
            return False
        size += output.reply.ByteSize()
    return size <= MAX_ACK_MESSAGE_BYTES


def _as_command(output: pb.TurnOutput, event: envelope.ConnectionEvent) -> envelope.GatewayCommand:
    kind = output.WhichOneof("output")
    if kind == "command":
        return output.command
    command = envelope.GatewayCommand(
        connection_ids=[event.connection_id], in_reply_to=event.sequence
    )
    if kind == "reply":
        command.send.CopyFrom(output.reply)
    else:
        command.close.CopyFrom(output.close)
    return command


def _answer(work: Work, outcome: pb.TurnOutcome) -> bytes:
    """The answer to an alarm, a call or an HTTP request: the alarm's result, or the
    recorded CallResult or HttpResponse."""
    return _alarm_result(outcome) if work.kind is WorkKind.ALARM else outcome.answer


def _alarm_result(outcome: pb.TurnOutcome) -> bytes:
    """The answer to an alarm's request: whether its turn's handler succeeded."""
    result = envelope.AlarmResult(ok=not outcome.failed)
    if outcome.failed:
        result.error = "the alarm handler failed (see the worker's log)"
    return result.SerializeToString()
