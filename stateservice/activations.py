"""``wsgate.v1.Activations``: the leases that make one worker the host of an object's
activation (:mod:`wsgate.stateservice.leases`), and the fenced, exactly-once commits of its turns
(:mod:`wsgate.stateservice.turns`).

A commit names its epoch; its effects are checked here (every storage and membership
limit, as for the calls of the other services) and applied by one storage operation per
object, so the turns of many objects and workers share one group commit.

Quotas: a grant tells the worker what the object holds and the quotas, so that the
activation refuses a handler's write or join over one as it is made; the commit checks them
again (the service is the authority), refusing the object's turns with the quota's
ErrorInfo. An object's turns that put or join are refused (STORAGE_FULL) while the disk is
low; the worker retries them until space returns (or its commit timeout).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from wsgate import ids
from wsgate.errors import InvalidConnectionId, InvalidObjectId, InvalidRequest
from wsgate.limits import check_tags
from wsgate.placement import task_key
from wsgate.state_errors import EXHAUSTED_TYPES, REFUSAL_TYPES, Exhausted, error_info
from wsgate.stateservice import rpc
from wsgate.stateservice.alarms import PutAlarm, RemoveAlarm, new_firing_id
from wsgate.stateservice.component import StateContext
from wsgate.stateservice.idempotency import PRUNE_INTERVAL_S
from wsgate.stateservice.kv_service import first_put, object_write_ops
from wsgate.stateservice.leases import Claim, GrantLease, ReleaseLease
from wsgate.stateservice.membership import (
    JoinMember,
    LeaveMember,
    SetMemberAttachment,
    SetMemberTags,
    checked_attachment,
)
from wsgate.stateservice.quotas import Quotas
from wsgate.stateservice.storage import ObjectId, Operation
from wsgate.stateservice.turns import (
    CommitObjectTurns,
    LookupTurnRecord,
    PruneTurns,
    Refused,
    TurnEffects,
    now_ms,
)
from wsgate.stateservice.usage import ReadUsage
from wsgate.supervision import stop_task
from wsgate.v1 import state_pb2 as pb
from wsgate.v1 import state_pb2_grpc
from wsgate.values import INT64_MAX

log = logging.getLogger(__name__)


class _Checked:
    """One object's turns, checked: the operation to store, and the alarm times it sets
    (the scheduler is woken for them once the operation is durable)."""

    __slots__ = ("alarms", "op")

    def __init__(self, op: CommitObjectTurns, alarms: list[int]) -> None:
        self.op = op
        self.alarms = alarms


class ActivationsServicer(state_pb2_grpc.ActivationsServicer):
    """The Activations service over the shared storage and lease table.

    ``on_alarm_set(at_ms)`` wakes the alarm scheduler for an alarm a turn set;
    ``on_member_joined(gateway_id)`` tells the gateway leases that a gateway may now hold
    members (before the join is stored, as the Membership service does).
    """

    def __init__(
        self,
        context: StateContext,
        *,
        on_alarm_set: Callable[[int], None],
        on_member_joined: Callable[[str], None],
    ) -> None:
        self._context = context
        self._storage = context.storage
        self._quotas: Quotas = context.quotas
        self._table = context.leases.table
        self._lease_ms = int(self._table.lease_s * 1000)
        self._on_alarm_set = on_alarm_set
        self._on_member_joined = on_member_joined

    async def Activate(self, request: pb.ActivateRequest, context: Any) -> pb.ActivateResponse:
        """Grant the lease on an object to the asker, or say who holds it (and, with a
        grant, what the object holds and its quotas)."""
        obj = await self._named(context, request.object)
        await rpc.require_owner(context, self._context.ownership, obj)
        worker = await _worker(context, request.worker)
        if self._table.live(obj, time.monotonic()) is None:
            # About to grant: first adopt a lease that another replica granted while it
            # owned the object, so that a live holder is not fenced for nothing.
            await rpc.stored(context, self._context.leases.refresh([obj]))
        claim, lease = self._table.claim(obj, worker, time.monotonic())
        if claim is Claim.HELD:
            assert lease is not None
            return pb.ActivateResponse(held=pb.LeaseHeld(worker=lease.holder, epoch=lease.epoch))
        try:
            epoch = await rpc.stored(context, self._storage.submit(GrantLease(obj, worker)))
        except BaseException:
            self._table.grant_failed(obj, worker)
            raise
        self._table.granted(obj, worker, epoch, time.monotonic())
        log.debug("lease on %s/%s: epoch %d to %s", obj.namespace, obj.name, epoch, worker)
        # After the grant: every later write of the object is the new activation's.
        held = await rpc.stored(context, self._storage.submit(ReadUsage(obj)))
        quotas = self._quotas.objects
        granted = pb.LeaseGranted(
            epoch=epoch,
            lease_ms=self._lease_ms,
            usage=pb.ObjectUsage(keys=held.keys, bytes=held.bytes, members=held.members),
            quotas=pb.ObjectQuotas(
                max_keys=quotas.max_keys,
                max_bytes=quotas.max_bytes,
                max_members=quotas.max_members,
            ),
        )
        return pb.ActivateResponse(granted=granted)

    async def _named(self, context: Any, message: pb.ObjectId) -> ObjectId:
        """The object a request names, its name's length checked (a refusal ends the call)."""
        try:
            return self._quotas.object_id(message)
        except InvalidObjectId as exc:
            await rpc.refuse(context, exc)

    async def Renew(self, request: pb.RenewRequest, context: Any) -> pb.RenewResponse:
        """Extend a worker's leases (in memory: no disk write); report the ones it lost."""
        worker = await _worker(context, request.worker)
        leases = [(await _object(context, lease.object), lease.epoch) for lease in request.leases]
        lost = self._table.renew(worker, leases, time.monotonic())
        if lost:
            # Leases granted by another replica (the objects moved here) are in the
            # database: adopt those that are still this worker's, then look again.
            await rpc.stored(
                context, self._context.leases.refresh([leases[index][0] for index in lost])
            )
            again = self._table.renew(worker, [leases[index] for index in lost], time.monotonic())
            lost = [lost[index] for index in again]
        return pb.RenewResponse(lost=lost, lease_ms=self._lease_ms)

    async def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:
        """Give leases up; the next asker gets the object at once."""
        worker = await _worker(context, request.worker)
        released = []
        for lease in request.leases:
            obj = await _object(context, lease.object)
            if lease.epoch > INT64_MAX:
                # Never granted (epochs are stored as 64-bit signed integers): nothing to
                # release, and the database could not even compare it.
                continue
            self._table.release(obj, worker, lease.epoch)
            # Stored even when the table does not show it: a lease granted by another
            # replica (the object moved here) is released too. The row only changes if
            # it still shows this worker and epoch.
            released.append(self._storage.submit(ReleaseLease(obj, worker, lease.epoch)))
        if released:
            await rpc.stored(context, asyncio.gather(*released))
        return pb.ReleaseResponse()

    async def CommitTurns(
        self, request: pb.CommitTurnsRequest, context: Any
    ) -> pb.CommitTurnsResponse:
        """Apply each object's turns, fenced and deduplicated, all or none per object."""
        worker = await _worker(context, request.worker)
        response = pb.CommitTurnsResponse()
        pending: list[tuple[int, _Checked, asyncio.Future[Refused | None]]] = []
        for index, turns in enumerate(request.objects):
            try:
                checked = self._check(turns, worker)
            except REFUSAL_TYPES as exc:
                refused = pb.TurnsRefused(details=str(exc), info=error_info(exc))
                response.results.add(index=index, refused=refused)
                continue
            except InvalidConnectionId as exc:
                response.results.add(index=index, refused=pb.TurnsRefused(details=str(exc)))
                continue
            pending.append((index, checked, self._storage.submit(checked.op)))
        # Together: if the storage fails, every future's error is collected (one aborts
        # the call), none is left unretrieved. A quota's refusal is one object's outcome.
        outcomes = await rpc.stored(
            context, asyncio.gather(*(_quota_refusal(f) for _, _, f in pending))
        )
        for (index, checked, _), outcome in zip(pending, outcomes, strict=True):
            if isinstance(outcome, EXHAUSTED_TYPES):
                self._quotas.counted(outcome)
                log.info(
                    "turns of %s/%s refused: %s",
                    checked.op.obj.namespace,
                    checked.op.obj.name,
                    outcome,
                )
                refused = pb.TurnsRefused(details=str(outcome), info=error_info(outcome))
                response.results.add(index=index, refused=refused)
            elif outcome is None:
                for at_ms in checked.alarms:
                    self._on_alarm_set(at_ms)
                response.results.add(index=index, committed=pb.TurnsCommitted())
            else:
                log.info(
                    "turns of %s/%s refused: %s",
                    checked.op.obj.namespace,
                    checked.op.obj.name,
                    outcome.details,
                )
                refused = pb.TurnsRefused(
                    fenced=outcome.fenced, duplicate=outcome.duplicate, details=outcome.details
                )
                response.results.add(index=index, refused=refused)
        return response

    async def LookupTurn(
        self, request: pb.LookupTurnRequest, context: Any
    ) -> pb.LookupTurnResponse:
        """The outcome recorded under a key, for a redelivered event."""
        if not request.key:
            await rpc.refuse(context, InvalidRequest("a turn lookup needs a key"))
        found = await rpc.stored(context, self._storage.run(LookupTurnRecord(request.key)))
        if found is None:
            return pb.LookupTurnResponse(found=False)
        sequence, outcome = found
        return pb.LookupTurnResponse(
            found=True, sequence=sequence, outcome=pb.TurnOutcome.FromString(outcome)
        )

    def _check(self, turns: pb.ObjectTurns, worker: str) -> _Checked:
        """The storage operation of one object's turns, every limit checked (raises the
        refusal), and the alarm times they set."""
        obj = self._quotas.object_id(turns.object)
        effects: list[TurnEffects] = []
        alarms: list[int] = []
        grows = False
        for turn in turns.turns:
            if turn.sequence > INT64_MAX:
                # The records keep sequences as 64-bit signed integers; a gateway counts
                # from 1 and never gets there.
                raise InvalidRequest(
                    f"turn {turn.key[:80]!r}: sequence {turn.sequence} over 2**63-1"
                )
            ops: list[Operation[Any]] = list(object_write_ops(obj, turn.writes)[0])
            putting = first_put(turn.writes)
            grows = grows or putting is not None
            for change in turn.members:
                ops.append(self._member_op(obj, change))
            if turn.HasField("alarm"):
                if turn.alarm.WhichOneof("change") == "set_ms":
                    ops.append(PutAlarm(obj, turn.alarm.set_ms, new_firing_id()))
                    alarms.append(turn.alarm.set_ms)
                else:
                    ops.append(RemoveAlarm(obj))
            effects.append(
                TurnEffects(
                    key=turn.key,
                    sequence=turn.sequence,
                    ops=tuple(ops),
                    outcome=turn.outcome.SerializeToString(),
                    record=turn.record,
                    first_put=putting,
                )
            )
            grows = grows or any(
                change.WhichOneof("change") in ("join", "attachment", "tags")
                for change in turn.members
            )
        if grows:
            # Turns that add data wait for space (the worker retries them); the others
            # (sends, deletes, leaves) go on, so objects keep running and can free space.
            self._quotas.check_disk()
        op = CommitObjectTurns(obj, turns.epoch, worker, tuple(effects), self._quotas.objects)
        return _Checked(op, alarms)

    def _member_op(self, obj: ObjectId, change: pb.MemberChange) -> Operation[Any]:
        connection_id = change.connection_id
        gateway_id = ids.gateway_of(connection_id)
        kind = change.WhichOneof("change")
        if kind == "join":
            tags = list(change.join.tags)
            check_tags(tags)
            # Before the write: a sweep of the gateway running meanwhile must leave it due.
            self._on_member_joined(gateway_id)
            return JoinMember(
                obj,
                connection_id,
                gateway_id,
                tuple(dict.fromkeys(tags)),
                checked_attachment(change.join.attachment),
                self._quotas.objects,
            )
        if kind == "attachment":
            return SetMemberAttachment(obj, connection_id, checked_attachment(change.attachment))
        if kind == "tags":
            tags = list(change.tags.tags)
            check_tags(tags)
            return SetMemberTags(obj, connection_id, tuple(dict.fromkeys(tags)))
        if kind == "leave":
            return LeaveMember(obj, connection_id)
        raise InvalidRequest("a member change names no change")


async def _object(context: Any, message: pb.ObjectId) -> ObjectId:
    """The object a lease names (not checked against the name limit: a lease granted
    before the limit was lowered must still renew and release)."""
    try:
        return rpc.object_id(message)
    except InvalidObjectId as exc:
        await rpc.refuse(context, exc)


async def _quota_refusal(future: asyncio.Future[Refused | None]) -> Refused | Exhausted | None:
    """The commit's outcome, or the quota's refusal it raised (nothing of it applied)."""
    try:
        return await future
    except EXHAUSTED_TYPES as exc:
        return exc


async def _worker(context: Any, worker: str) -> str:
    if not worker:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call must name its worker")
    return worker


class ActivationsComponent:
    """The Activations service, and the pruning of turn records past the idempotency
    retention."""

    def __init__(
        self,
        context: StateContext,
        *,
        on_alarm_set: Callable[[int], None],
        on_member_joined: Callable[[str], None],
    ) -> None:
        self.context = context
        self.servicer = ActivationsServicer(
            context, on_alarm_set=on_alarm_set, on_member_joined=on_member_joined
        )
        self._pruner: asyncio.Task[None] | None = None

    def register(self, server: Any) -> None:
        """Add ``wsgate.v1.Activations`` to the server."""
        state_pb2_grpc.add_ActivationsServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        """Start pruning (the server loads the stored leases before it listens)."""
        self._pruner = self.context.spawn("turn_pruner", self._prune_loop())

    async def close(self) -> None:
        """Stop pruning. Idempotent."""
        pruner, self._pruner = self._pruner, None
        await stop_task(pruner)

    async def prune_once(self) -> int:
        """Forget turn records past the retention; returns how many."""
        retention_ms = int(self.context.config.idempotency_retention_s * 1000)
        return await self.context.storage.run(PruneTurns(now_ms() - retention_ms))

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL_S)
            if not self.context.ownership.owns_key(task_key("prune-turns")):
                continue  # another replica prunes for the tier
            try:
                pruned = await self.prune_once()
            except Exception:
                log.exception("pruning turn records failed")
                continue
            if pruned:
                log.debug("forgot %d turn record(s)", pruned)
