"""Leases and turn commits on both databases (the ``backend`` fixture): epochs that only
grow (also across a reopen), commits fenced by (epoch, worker), turns refused when they ran
before, the same commit sent twice applied once, the record of each key's last turn, and
its pruning. On PostgreSQL, also two replicas (two storages on one database) racing: a
commit against a new grant, and one commit sent to both."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from tests.backends import Backend
from tests.harness import eventually
from wsgate.pgserver import PostgresServer
from wsgate.stateservice import turns as turns_module
from wsgate.stateservice.leases import (
    GrantLease,
    HeldLeases,
    ReleaseLease,
    RevokeLease,
)
from wsgate.stateservice.storage import GetKeys, ObjectId, Operation, PutKeys, Sql, Storage
from wsgate.stateservice.turns import (
    CommitObjectTurns,
    LookupTurnRecord,
    PruneTurns,
    Refused,
    TurnEffects,
)
from wsgate.values import decode_value, encode_value

T = TypeVar("T")

OBJ = ObjectId("counter", "room-1")
OTHER_OBJ = ObjectId("counter", "room-2")
W1 = "worker-1"
W2 = "worker-2"


@pytest.fixture
async def storage(backend: Backend) -> AsyncIterator[Storage]:
    async with backend.storage() as storage:
        yield storage


@dataclass(frozen=True)
class Increment:
    """Add one to an integer key (0 when missing): applied twice, it shows."""

    obj: ObjectId
    key: bytes
    writes = True

    def __call__(self, conn: Sql) -> None:
        row = conn.execute(
            "SELECT value FROM kv WHERE namespace = ? AND name = ? AND key = ?",
            (self.obj.namespace, self.obj.name, self.key),
        ).fetchone()
        current = 0 if row is None else int(decode_value(bytes(row[0])))
        PutKeys(self.obj, ((self.key, encode_value(current + 1)),))(conn)


@dataclass(frozen=True)
class Explode:
    """A write that fails after the turns before it were applied."""

    writes = True

    def __call__(self, conn: Sql) -> None:
        raise RuntimeError("boom")


@dataclass(frozen=True)
class TurnRow:
    """The raw row of the turns table under ``key``: (sequence, epoch, outcome, at_ms)."""

    key: str
    writes = False

    def __call__(self, conn: Sql) -> tuple[int, int, bytes, int] | None:
        row = conn.execute(
            "SELECT sequence, epoch, outcome, at_ms FROM turns WHERE key = ?", (self.key,)
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]), bytes(row[2]), int(row[3]))


def put(key: str, value: object, obj: ObjectId = OBJ) -> PutKeys:
    return PutKeys(obj, ((key.encode(), encode_value(value)),))


def turn(
    key: str,
    sequence: int,
    *ops: Operation[object],
    outcome: bytes | None = None,
    record: bool = True,
) -> TurnEffects:
    return TurnEffects(
        key=key,
        sequence=sequence,
        ops=ops,
        outcome=f"outcome {key}#{sequence}".encode() if outcome is None else outcome,
        record=record,
    )


async def value_of(storage: Storage, key: str, obj: ObjectId = OBJ) -> object:
    found = await storage.run(GetKeys(obj, (key.encode(),)))
    return decode_value(found[0][1]) if found else None


async def grant(storage: Storage, holder: str = W1, obj: ObjectId = OBJ) -> int:
    return await storage.run(GrantLease(obj, holder))


async def commit_turns(
    storage: Storage, epoch: int, worker: str, *turns: TurnEffects
) -> Refused | None:
    """Commit ``turns`` of OBJ as (``epoch``, ``worker``)."""
    return await storage.run(CommitObjectTurns(OBJ, epoch, worker, turns))


# -- leases ------------------------------------------------------------------------------


async def test_epochs_grow_and_survive_a_reopen(backend: Backend) -> None:
    async with backend.storage() as storage:
        assert [await grant(storage, holder) for holder in (W1, W2, W1)] == [1, 2, 3]
        assert await grant(storage, W2, OTHER_OBJ) == 1  # epochs are per object
        assert set(await storage.run(HeldLeases())) == {(OBJ, 3, W1), (OTHER_OBJ, 1, W2)}
    async with backend.storage() as storage:
        assert set(await storage.run(HeldLeases())) == {(OBJ, 3, W1), (OTHER_OBJ, 1, W2)}
        assert await grant(storage, W2) == 4
        assert set(await storage.run(HeldLeases())) == {(OBJ, 4, W2), (OTHER_OBJ, 1, W2)}


async def test_release_needs_the_holder_and_its_epoch(storage: Storage) -> None:
    epoch = await grant(storage)
    assert await storage.run(ReleaseLease(OBJ, W2, epoch)) is False
    assert await storage.run(ReleaseLease(OBJ, W1, epoch + 1)) is False
    assert await storage.run(ReleaseLease(OTHER_OBJ, W1, epoch)) is False
    assert await storage.run(HeldLeases()) == [(OBJ, epoch, W1)]
    assert await storage.run(ReleaseLease(OBJ, W1, epoch)) is True
    assert await storage.run(HeldLeases()) == []
    assert await storage.run(ReleaseLease(OBJ, W1, epoch)) is False  # not held any more
    assert await grant(storage, W2) == epoch + 1  # a release does not reuse the epoch


async def test_revoke_bumps_the_epoch_and_clears_the_holder(storage: Storage) -> None:
    assert await grant(storage) == 1
    await storage.run(RevokeLease(OBJ))
    assert await storage.run(HeldLeases()) == []
    assert await grant(storage, W2) == 3  # epoch 2 went to the revocation
    await storage.run(RevokeLease(OTHER_OBJ))  # no row: nothing to revoke
    assert await grant(storage, W2, OTHER_OBJ) == 1


# -- fencing -----------------------------------------------------------------------------


async def test_a_commit_of_the_current_lease_applies_and_records(storage: Storage) -> None:
    epoch = await grant(storage)
    commit = CommitObjectTurns(
        OBJ,
        epoch,
        W1,
        (
            turn("conn-a", 1, put("x", 1), put("y", "one"), outcome=b"o-a1"),
            turn("alarm:f1", 0, put("x", 2), outcome=b"o-alarm"),
        ),
    )
    assert commit.write_count == 2
    assert await storage.run(commit) is None
    assert await value_of(storage, "x") == 2  # turns apply in order
    assert await value_of(storage, "y") == "one"
    assert await storage.run(LookupTurnRecord("conn-a")) == (1, b"o-a1")
    assert await storage.run(LookupTurnRecord("alarm:f1")) == (0, b"o-alarm")
    assert await storage.run(LookupTurnRecord("conn-b")) is None


@pytest.mark.parametrize(
    ("epoch_delta", "worker"),
    [(-1, W1), (1, W1), (0, W2)],
    ids=["older-epoch", "newer-epoch", "other-worker"],
)
async def test_a_commit_not_of_the_current_lease_is_fenced(
    storage: Storage, epoch_delta: int, worker: str
) -> None:
    await grant(storage, W2)
    epoch = await grant(storage, W1)
    commit = CommitObjectTurns(OBJ, epoch + epoch_delta, worker, (turn("c", 1, put("x", 1)),))
    refused = await storage.run(commit)
    assert isinstance(refused, Refused)
    assert (refused.fenced, refused.duplicate) == (True, False)
    assert refused.details
    assert await value_of(storage, "x") is None
    assert await storage.run(LookupTurnRecord("c")) is None


async def test_a_commit_to_an_object_never_leased_is_fenced(storage: Storage) -> None:
    await grant(storage, W1, OTHER_OBJ)  # another object's lease does not count
    refused = await commit_turns(storage, 1, W1, turn("c", 1, put("x", 1)))
    assert isinstance(refused, Refused)
    assert refused.fenced
    assert "no lease" in refused.details
    assert await value_of(storage, "x") is None
    assert await storage.run(LookupTurnRecord("c")) is None


async def test_after_a_revocation_the_old_epoch_is_fenced(storage: Storage) -> None:
    epoch = await grant(storage)
    assert await commit_turns(storage, epoch, W1, turn("c", 1, put("x", 1))) is None
    await storage.run(RevokeLease(OBJ))
    refused = await commit_turns(storage, epoch, W1, turn("c", 2, put("x", 2)))
    assert isinstance(refused, Refused)
    assert refused.fenced
    assert await value_of(storage, "x") == 1
    assert await storage.run(LookupTurnRecord("c")) == (1, b"outcome c#1")


async def test_after_a_release_the_epoch_is_fenced(storage: Storage) -> None:
    epoch = await grant(storage)
    await storage.run(ReleaseLease(OBJ, W1, epoch))
    refused = await commit_turns(storage, epoch, W1, turn("c", 1, put("x", 1)))
    assert isinstance(refused, Refused)
    assert refused.fenced
    assert await value_of(storage, "x") is None


async def test_commits_are_fenced_per_object(storage: Storage) -> None:
    epoch = await grant(storage, W1, OBJ)
    await grant(storage, W2, OTHER_OBJ)
    ok = CommitObjectTurns(OBJ, epoch, W1, (turn("c", 1, put("x", 1)),))
    stale = CommitObjectTurns(OTHER_OBJ, epoch, W1, (turn("d", 1, put("x", 9, OTHER_OBJ)),))
    results = [storage.submit(ok), storage.submit(stale)]  # one batch
    assert await results[0] is None
    refused = await results[1]
    assert isinstance(refused, Refused)
    assert refused.fenced
    assert await value_of(storage, "x") == 1
    assert await value_of(storage, "x", OTHER_OBJ) is None


# -- duplicates --------------------------------------------------------------------------


@pytest.mark.parametrize("sequence", [1, 2], ids=["below-recorded", "equal-to-recorded"])
async def test_a_turn_recorded_by_another_epoch_refuses_the_whole_commit(
    storage: Storage, sequence: int
) -> None:
    first = await grant(storage, W1)
    assert await commit_turns(storage, first, W1, turn("c", 2, put("x", 1))) is None
    second = await grant(storage, W2)
    commit = CommitObjectTurns(
        OBJ,
        second,
        W2,
        (
            turn("fresh", 1, put("y", 1), outcome=b"fresh"),  # before the duplicate
            turn("c", sequence, put("x", 2), outcome=b"again"),
            turn("later", 1, put("z", 1)),  # after it
        ),
    )
    refused = await storage.run(commit)
    assert isinstance(refused, Refused)
    assert (refused.duplicate, refused.fenced) == (True, False)
    assert "c#" in refused.details
    # Nothing of the commit was applied: neither the duplicate nor the turns around it.
    assert await value_of(storage, "x") == 1
    assert await value_of(storage, "y") is None
    assert await value_of(storage, "z") is None
    assert await storage.run(LookupTurnRecord("c")) == (2, b"outcome c#2")
    assert await storage.run(LookupTurnRecord("fresh")) is None
    assert await storage.run(LookupTurnRecord("later")) is None


async def test_a_later_sequence_after_another_epoch_is_fresh(storage: Storage) -> None:
    first = await grant(storage, W1)
    assert await commit_turns(storage, first, W1, turn("c", 2, put("x", 1))) is None
    second = await grant(storage, W2)
    commit = CommitObjectTurns(OBJ, second, W2, (turn("c", 3, put("x", 2), outcome=b"3"),))
    assert await storage.run(commit) is None
    assert await value_of(storage, "x") == 2
    assert await storage.run(LookupTurnRecord("c")) == (3, b"3")


async def test_the_same_commit_sent_twice_applies_once(storage: Storage) -> None:
    epoch = await grant(storage)
    commit = CommitObjectTurns(
        OBJ,
        epoch,
        W1,
        (
            turn("conn-a", 1, Increment(OBJ, b"counter"), outcome=b"a"),
            turn("conn-b", 4, Increment(OBJ, b"counter"), outcome=b"b"),
            turn("alarm:f", 0, Increment(OBJ, b"other"), record=False),
        ),
    )
    assert await storage.run(commit) is None
    rows = {key: await storage.run(TurnRow(key)) for key in ("conn-a", "conn-b")}
    assert await value_of(storage, "counter") == 2
    assert await storage.run(commit) is None  # its answer was lost: told it committed
    assert await value_of(storage, "counter") == 2  # applied once
    assert await value_of(storage, "other") == 1
    assert {key: await storage.run(TurnRow(key)) for key in rows} == rows  # records unchanged
    assert await storage.run(LookupTurnRecord("alarm:f")) is None


async def test_the_same_commit_with_two_turns_of_one_key_sent_twice_is_committed(
    storage: Storage,
) -> None:
    epoch = await grant(storage)
    commit = CommitObjectTurns(
        OBJ,
        epoch,
        W1,
        (turn("c", 1, Increment(OBJ, b"n")), turn("c", 2, Increment(OBJ, b"n"))),
    )
    assert await storage.run(commit) is None
    assert await storage.run(commit) is None
    assert await value_of(storage, "n") == 2


async def test_an_applied_turn_mixed_with_a_fresh_one_is_refused(storage: Storage) -> None:
    epoch = await grant(storage)
    applied = turn("conn-a", 1, Increment(OBJ, b"counter"), outcome=b"a")
    assert await storage.run(CommitObjectTurns(OBJ, epoch, W1, (applied,))) is None
    mixed = CommitObjectTurns(
        OBJ, epoch, W1, (applied, turn("conn-b", 1, Increment(OBJ, b"counter")))
    )
    refused = await storage.run(mixed)
    assert isinstance(refused, Refused)
    assert (refused.duplicate, refused.fenced) == (True, False)
    assert await value_of(storage, "counter") == 1
    assert await storage.run(LookupTurnRecord("conn-b")) is None


async def test_a_lower_sequence_of_the_same_epoch_is_refused(storage: Storage) -> None:
    epoch = await grant(storage)
    assert await commit_turns(storage, epoch, W1, turn("c", 5, put("x", 1))) is None
    refused = await commit_turns(storage, epoch, W1, turn("c", 4, put("x", 2)))
    assert isinstance(refused, Refused)
    assert refused.duplicate
    assert await value_of(storage, "x") == 1


async def test_unrecorded_turns_are_neither_checked_nor_recorded(storage: Storage) -> None:
    first = await grant(storage, W1)
    assert await commit_turns(storage, first, W1, turn("c", 5, put("x", 1))) is None
    second = await grant(storage, W2)
    commit = CommitObjectTurns(
        OBJ,
        second,
        W2,
        (
            turn("c", 3, put("x", 2), record=False),  # below the record: not checked
            turn("new", 1, put("y", 1), record=False),
        ),
    )
    assert await storage.run(commit) is None
    assert await value_of(storage, "x") == 2
    assert await value_of(storage, "y") == 1
    assert await storage.run(LookupTurnRecord("c")) == (5, b"outcome c#5")  # untouched
    assert await storage.run(LookupTurnRecord("new")) is None
    # Nothing recorded, so nothing recognises it when it comes again: it applies again.
    unrecorded = CommitObjectTurns(
        OBJ, second, W2, (turn("n", 1, Increment(OBJ, b"n"), record=False),)
    )
    assert await storage.run(unrecorded) is None
    assert await storage.run(unrecorded) is None
    assert await value_of(storage, "n") == 2


async def test_the_record_keeps_the_last_sequence_per_key(storage: Storage) -> None:
    epoch = await grant(storage)
    two_turns = (turn("c", 1, outcome=b"one"), turn("c", 2, outcome=b"two"))
    assert await commit_turns(storage, epoch, W1, *two_turns) is None
    assert await storage.run(LookupTurnRecord("c")) == (2, b"two")
    assert await commit_turns(storage, epoch, W1, turn("c", 3, outcome=b"3")) is None
    row = await storage.run(TurnRow("c"))
    assert row is not None
    assert row[:3] == (3, epoch, b"3")
    later = await grant(storage)
    assert await commit_turns(storage, later, W1, turn("c", 4, outcome=b"4")) is None
    row = await storage.run(TurnRow("c"))
    assert row is not None
    assert row[:3] == (4, later, b"4")  # the epoch of the last commit


async def test_a_failing_turn_undoes_the_whole_commit(storage: Storage) -> None:
    epoch = await grant(storage)
    commit = CommitObjectTurns(
        OBJ, epoch, W1, (turn("a", 1, put("x", 1)), turn("b", 1, put("y", 1), Explode()))
    )
    with pytest.raises(RuntimeError, match="boom"):
        await storage.run(commit)
    assert await value_of(storage, "x") is None
    assert await value_of(storage, "y") is None
    assert await storage.run(LookupTurnRecord("a")) is None


# -- pruning -----------------------------------------------------------------------------


async def test_prune_forgets_records_older_than_the_time(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    epoch = await grant(storage)
    for at_ms, key in ((1_000, "old"), (2_000, "new")):
        monkeypatch.setattr(turns_module, "now_ms", lambda at_ms=at_ms: at_ms)
        assert await commit_turns(storage, epoch, W1, turn(key, 1)) is None
    assert (await storage.run(TurnRow("old")) or ())[3:] == (1_000,)
    assert await storage.run(PruneTurns(1_000)) == 0  # strictly before
    assert await storage.run(PruneTurns(1_500)) == 1
    assert await storage.run(LookupTurnRecord("old")) is None
    assert await storage.run(LookupTurnRecord("new")) == (1, b"outcome new#1")
    assert await storage.run(PruneTurns(2_000)) == 0
    assert await storage.run(PruneTurns(2_001)) == 1
    assert await storage.run(LookupTurnRecord("new")) is None


async def test_a_pruned_turn_is_no_longer_a_duplicate(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(turns_module, "now_ms", lambda: 1_000)
    first = await grant(storage)
    assert await commit_turns(storage, first, W1, turn("c", 1, put("x", 1))) is None
    assert await storage.run(PruneTurns(1_001)) == 1
    second = await grant(storage)
    assert await commit_turns(storage, second, W1, turn("c", 1, put("x", 2))) is None
    assert await value_of(storage, "x") == 2


def test_now_ms_is_wall_clock_milliseconds() -> None:
    before = time.time() * 1000
    now = turns_module.now_ms()
    after = time.time() * 1000
    assert isinstance(now, int)
    assert before - 1 <= now <= after + 1


# -- two PostgreSQL replicas on one database ----------------------------------------------
#
# Replicas of the state service share one PostgreSQL database, each with its own storage
# (its own connection and group commit). A batch is held open on one replica (Hold) while
# the other's operation runs into the rows it locked; the test goes on once PostgreSQL
# reports that operation waiting for a lock.


@dataclass(frozen=True)
class Hold:
    """Keeps its batch's transaction open, with the locks it took, until ``release``."""

    holding: threading.Event
    release: threading.Event
    writes = False

    def __call__(self, conn: Sql) -> None:
        self.holding.set()
        if not self.release.wait(30):
            raise TimeoutError("never released")


@dataclass(frozen=True)
class BackendPid:
    """The PostgreSQL backend (process id) serving this storage's connection."""

    writes = False

    def __call__(self, conn: Sql) -> int:
        return int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])


async def backend_pid(storage: Storage) -> int:
    """The backend of ``storage``'s connection (asked before anything holds its thread)."""
    return await storage.run(BackendPid())


@dataclass(frozen=True)
class AddRun:
    """Writes a key of its own at each run: a turn applied twice leaves two."""

    runs: itertools.count[int]
    writes = True

    def __call__(self, conn: Sql) -> None:
        PutKeys(OBJ, ((f"run-{next(self.runs)}".encode(), encode_value(True)),))(conn)


@pytest.fixture
def pg_backend(tmp_path: Path, postgres_server: PostgresServer) -> Backend:
    return Backend("postgres", tmp_path, postgres_server)


async def held_open(
    storage: Storage, op: Operation[T]
) -> tuple[asyncio.Future[T], Callable[[], Awaitable[None]]]:
    """Submit ``op`` with a Hold behind it in the same batch; returns its future and a
    function that releases the batch (after which it commits)."""
    holding, release = threading.Event(), threading.Event()
    future = storage.submit(op)
    held = storage.submit(Hold(holding, release))

    async def is_holding() -> bool:
        return holding.is_set()

    try:
        await eventually(is_holding, "the batch to be held open")
    except BaseException:
        release.set()
        raise

    async def release_it() -> None:
        release.set()
        await held

    return future, release_it


async def until_waiting_for_a_lock(
    pg: PostgresServer, pid: int, future: asyncio.Future[Any]
) -> None:
    """Until the backend ``pid`` waits for a lock (or ``future`` is done: it did not)."""
    async with await psycopg.AsyncConnection.connect(pg.dsn, autocommit=True) as conn:

        async def waiting() -> bool:
            if future.done():
                return True
            cursor = await conn.execute(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
            )
            row = await cursor.fetchone()
            return row is not None and row[0] == "Lock"

        await eventually(waiting, f"backend {pid} to wait for a lock")


async def test_a_commit_racing_a_grant_on_another_replica_is_fenced(
    pg_backend: Backend,
) -> None:
    """Replica two grants the object's next epoch while replica one commits turns under
    the old one: the commit waits for the grant's row and is refused, never applied."""
    async with pg_backend.storage() as one, pg_backend.storage() as two:
        old = await grant(one, W1)
        pid = await backend_pid(one)
        granting, release = await held_open(two, GrantLease(OBJ, W2))
        try:
            commit = one.submit(CommitObjectTurns(OBJ, old, W1, (turn("c", 1, put("x", 1)),)))
            assert pg_backend.pg is not None
            await until_waiting_for_a_lock(pg_backend.pg, pid, commit)
            assert not commit.done(), "the commit did not wait for the grant in flight"
        finally:
            await release()
        assert await granting == old + 1
        refused = await commit
        assert isinstance(refused, Refused), "a commit of a stale epoch was applied"
        assert refused.fenced
        for storage in (one, two):
            assert await value_of(storage, "x") is None
            assert await storage.run(LookupTurnRecord("c")) is None


async def test_a_grant_on_another_replica_waits_for_a_commit_in_flight(
    pg_backend: Backend,
) -> None:
    """The other order: the commit of the current epoch holds the lease's row, so the
    grant on replica two waits for it; the commit applies, and its epoch is fenced after."""
    async with pg_backend.storage() as one, pg_backend.storage() as two:
        old = await grant(one, W1)
        pid = await backend_pid(two)
        commit, release = await held_open(
            one, CommitObjectTurns(OBJ, old, W1, (turn("c", 1, put("x", 1)),))
        )
        try:
            granting = two.submit(GrantLease(OBJ, W2))
            assert pg_backend.pg is not None
            await until_waiting_for_a_lock(pg_backend.pg, pid, granting)
            assert not granting.done(), "the grant did not wait for the commit in flight"
        finally:
            await release()
        assert await commit is None
        assert await granting == old + 1
        assert await value_of(two, "x") == 1
        late = await commit_turns(one, old, W1, turn("c", 2, put("x", 2)))
        assert isinstance(late, Refused)
        assert late.fenced
        assert await value_of(two, "x") == 1


async def test_one_commit_sent_to_two_replicas_at_once_applies_once(
    pg_backend: Backend,
) -> None:
    """A worker that sends its commit again to another replica while the first is still
    committing it: the second waits for the first, then finds it applied."""
    async with pg_backend.storage() as one, pg_backend.storage() as two:
        epoch = await grant(one, W1)
        commit = CommitObjectTurns(
            OBJ, epoch, W1, (turn("conn-a", 1, AddRun(itertools.count()), outcome=b"a"),)
        )
        pid = await backend_pid(two)
        first, release = await held_open(one, commit)
        try:
            second = two.submit(commit)
            assert pg_backend.pg is not None
            await until_waiting_for_a_lock(pg_backend.pg, pid, second)
            assert not second.done(), "the second copy did not wait for the first"
        finally:
            await release()
        assert await first is None
        assert await second is None  # told it committed: it was, once
        entries = await two.list(OBJ)
        assert [key for key, _ in entries] == ["run-0"]
        assert await two.run(LookupTurnRecord("conn-a")) == (1, b"a")
