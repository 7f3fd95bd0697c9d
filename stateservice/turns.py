"""Committing an activation's turns: fenced by the lease's epoch, each turn exactly once.

A worker's activation runs an object's events one at a time (turns) against its memory,
and sends what each turn did (storage writes, membership changes, the alarm) with what
it produced (its outcome) in one :class:`CommitObjectTurns` per object. In the one
database transaction that applies them, this operation:

1. **fences**: the object's lease must still carry the activation's epoch and worker;
   otherwise nothing is applied (a paused worker that lost its lease writes nothing);
2. **refuses duplicates**: a turn whose key (the connection id; ``alarm:<firing id>``) has
   a recorded sequence at or above its own ran before, in another activation, and this
   activation's memory went wrong with it; nothing is applied, and the activation stops;
3. applies every turn's effects in order and records, per key, the last sequence with its
   outcome, so a redelivered event whose turn committed is answered from the record;
4. checks the object's quotas (:mod:`wsgate.stateservice.usage`): a turn whose writes together
   take the object over a storage quota, or a join over the member quota, raises the
   quota's exception, and the caller's rollback leaves nothing of the commit applied.

A commit is all or nothing per object. A worker that sends the same commit twice (its
first call's answer was lost) is told it committed: the records carry the epoch, so the
last turn of each of its keys shows up as its own, already applied.

Records are kept one per key (the next turn of a connection replaces its previous one: a
gateway sends a connection's next event only once the previous one was acknowledged, so an
older outcome can never be asked for again) and pruned after the idempotency retention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from wsgate.clock import now_ms
from wsgate.stateservice import usage
from wsgate.stateservice.storage import ObjectId, Operation, Sql, for_update
from wsgate.stateservice.usage import ObjectQuotas


@dataclass(frozen=True)
class TurnEffects:
    """One turn, checked and turned into storage operations."""

    key: str
    sequence: int
    #: Writes, membership changes and the alarm change, in the order to apply them.
    ops: tuple[Operation[object], ...]
    outcome: bytes
    record: bool
    #: The first key the turn puts (None if it puts none): the turn is checked against the
    #: storage quotas as a whole, and a refusal names this key.
    first_put: str | None = None


@dataclass(frozen=True)
class Refused:
    """Why a commit was refused (nothing of it was applied)."""

    fenced: bool = False
    duplicate: bool = False
    details: str = ""


@dataclass(frozen=True)
class CommitObjectTurns:
    """Apply one activation's turns, fenced and deduplicated (see the module docstring).

    Returns None when they are durable (or were already), or :class:`Refused`. Raises a
    quota's exception (ObjectQuotaExceeded) for a turn over one.
    """

    obj: ObjectId
    epoch: int
    worker: str
    turns: Sequence[TurnEffects]
    quotas: ObjectQuotas | None = None
    writes = True

    @property
    def write_count(self) -> int:
        """Turns count as one write each in the storage's statistics."""
        return len(self.turns)

    def __call__(self, conn: Sql) -> Refused | None:
        row = conn.execute(
            # Locked on PostgreSQL: no other replica's grant can come between this check
            # and the COMMIT, so a fenced activation writes nothing.
            "SELECT epoch, holder FROM leases WHERE namespace = ? AND name = ?" + for_update(conn),
            (self.obj.namespace, self.obj.name),
        ).fetchone()
        if row is None or int(row[0]) != self.epoch or row[1] != self.worker:
            found = "no lease" if row is None else f"epoch {row[0]} held by {row[1] or 'nobody'}"
            return Refused(
                fenced=True, details=f"lease epoch {self.epoch} of {self.worker} is stale: {found}"
            )
        # Per key, the sequences this commit holds (a connection's turns come in order).
        spans: dict[str, tuple[int, int]] = {}
        for turn in self.turns:
            if turn.record:
                first, _ = spans.get(turn.key, (turn.sequence, turn.sequence))
                spans[turn.key] = (first, turn.sequence)
        applied = fresh = 0
        for key, (first, last) in spans.items():
            recorded = conn.execute(
                "SELECT sequence, epoch FROM turns WHERE key = ?", (key,)
            ).fetchone()
            if recorded is None or int(recorded[0]) < first:
                fresh += 1
            elif (int(recorded[0]), int(recorded[1])) == (last, self.epoch):
                applied += 1  # this very commit, sent before: its last turn is recorded
            else:
                return Refused(
                    duplicate=True,
                    details=f"turn {key}#{first} was committed before "
                    f"(as #{recorded[0]} by epoch {recorded[1]})",
                )
        if applied and not fresh:
            return None  # this very commit, sent again: it is applied already
        if applied:
            return Refused(
                duplicate=True, details="some turns of this commit were committed before"
            )
        at_ms = now_ms()
        for turn in self.turns:
            # A turn's writes count together (a put may need the delete after it to fit):
            # laxer than the activation, which checks each call as it is made, so what an
            # activation let through is never refused here (its quotas are these).
            checked = turn.first_put is not None and self.quotas is not None
            before = usage.read(conn, self.obj) if checked else None
            for op in turn.ops:
                op(conn)
            if before is not None:
                usage.check_growth(
                    before, usage.read(conn, self.obj), self.quotas, turn.first_put or ""
                )
            if turn.record:
                conn.execute(
                    "INSERT INTO turns (key, sequence, epoch, outcome, at_ms) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                    "sequence = excluded.sequence, epoch = excluded.epoch, "
                    "outcome = excluded.outcome, at_ms = excluded.at_ms",
                    (turn.key, turn.sequence, self.epoch, turn.outcome, at_ms),
                )
        return None


@dataclass(frozen=True)
class LookupTurnRecord:
    """The last ``(sequence, outcome)`` recorded under ``key``, or None."""

    key: str
    writes = False

    def __call__(self, conn: Sql) -> tuple[int, bytes] | None:
        row = conn.execute(
            "SELECT sequence, outcome FROM turns WHERE key = ?", (self.key,)
        ).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))


@dataclass(frozen=True)
class PruneTurns:
    """Forget turns recorded before ``before_ms``; returns how many."""

    before_ms: int
    writes = True

    def __call__(self, conn: Sql) -> int:
        return conn.execute("DELETE FROM turns WHERE at_ms < ?", (self.before_ms,)).rowcount
