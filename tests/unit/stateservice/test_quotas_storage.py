"""Quotas on durable objects in the storage operations, on both databases (the ``backend``
fixture): each object's usage (keys, bytes, members) kept exact by the writes themselves,
each quota at its limit and one over, refusals that apply nothing, deletes that always
pass, and the migration that counts the objects already stored."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from tests.backends import Backend
from wsgate.errors import ObjectTooLarge, TooManyMembers, TooManyObjectKeys
from wsgate.stateservice import schema
from wsgate.stateservice.leases import GrantLease
from wsgate.stateservice.membership import (
    JoinMember,
    LeaveEverything,
    LeaveMember,
    RemoveGatewayMembers,
)
from wsgate.stateservice.storage import (
    DeleteAll,
    DeleteKeys,
    ObjectId,
    PgConnection,
    PutKeys,
    Storage,
)
from wsgate.stateservice.turns import CommitObjectTurns, LookupTurnRecord, TurnEffects
from wsgate.stateservice.usage import CheckedGrowth, ObjectQuotas, ReadUsage, Usage

OBJ = ObjectId("quota", "room")
OTHER = ObjectId("quota", "other")
#: Three keys, 40 bytes (keys' and values' lengths), two members.
QUOTAS = ObjectQuotas(max_keys=3, max_bytes=40, max_members=2)


@pytest.fixture
async def storage(backend: Backend) -> AsyncIterator[Storage]:
    async with backend.storage() as storage:
        yield storage


def put(obj: ObjectId, *entries: tuple[str, str], quotas: ObjectQuotas | None = QUOTAS) -> PutKeys:
    return PutKeys(obj, tuple((k.encode(), v.encode()) for k, v in entries), quotas)


def delete(obj: ObjectId, *keys: str) -> DeleteKeys:
    return DeleteKeys(obj, tuple(k.encode() for k in keys))


async def usage_of(storage: Storage, obj: ObjectId = OBJ) -> Usage:
    return await storage.run(ReadUsage(obj))


class _Counted:
    """What the object really holds, counted from its rows (the truth usage must match)."""

    writes = False

    def __init__(self, obj: ObjectId) -> None:
        self.obj = obj

    def __call__(self, conn: Any) -> tuple[Usage, bool]:
        where = "WHERE namespace = ? AND name = ?"
        args = (self.obj.namespace, self.obj.name)
        keys, size = conn.execute(
            f"SELECT COUNT(*), COALESCE(SUM(length(key) + length(value)), 0) FROM kv {where}", args
        ).fetchone()
        (members,) = conn.execute(f"SELECT COUNT(*) FROM members {where}", args).fetchone()
        has_row = conn.execute(f"SELECT 1 FROM object_usage {where}", args).fetchone()
        return Usage(int(keys), int(size), int(members)), has_row is not None


async def assert_exact(storage: Storage, obj: ObjectId = OBJ) -> Usage:
    """The object's usage is what its rows hold; an object holding nothing has no row."""
    truth, has_row = await storage.run(_Counted(obj))
    assert await usage_of(storage, obj) == truth
    assert has_row == (truth != Usage())
    return truth


# -- usage follows every write --------------------------------------------------------------


async def test_usage_follows_puts_overwrites_and_deletes(storage: Storage) -> None:
    assert await storage.run(put(OBJ, quotas=None)) == 0  # a put of nothing writes nothing
    await storage.run(put(OBJ, ("a", "1"), ("bb", "22"), quotas=None))
    assert await assert_exact(storage) == Usage(keys=2, bytes=6)
    await storage.run(put(OBJ, ("bb", "2"), ("a", "111"), ("a", "1111"), quotas=None))
    assert await assert_exact(storage) == Usage(keys=2, bytes=8)  # the last value counts
    assert await storage.run(delete(OBJ, "a", "a", "missing")) == 1
    assert await assert_exact(storage) == Usage(keys=1, bytes=3)
    await storage.run(put(OTHER, ("x", "y"), quotas=None))
    assert await storage.run(DeleteAll(OBJ)) == 1
    # Emptied: no row left behind (objects named once cost nothing once empty).
    assert await assert_exact(storage) == Usage()
    assert await assert_exact(storage, OTHER) == Usage(keys=1, bytes=2)


# -- keys -----------------------------------------------------------------------------------


async def test_the_key_quota_takes_the_limit_and_refuses_one_more(storage: Storage) -> None:
    await storage.run(put(OBJ, ("a", "1"), ("b", "1"), ("c", "1")))  # exactly 3 keys
    with pytest.raises(TooManyObjectKeys) as refused:
        await storage.run(put(OBJ, ("a", "2"), ("d", "1")))  # a 4th key, with an overwrite
    assert (refused.value.size, refused.value.limit) == (4, 3)
    # Refused whole: the overwrite that came with it is not applied either.
    assert await storage.get(OBJ, "a") == b"1"
    assert await assert_exact(storage) == Usage(keys=3, bytes=6)
    # At the limit, overwriting is fine; a delete frees a key for a new one.
    await storage.run(put(OBJ, ("a", "9")))
    await storage.run(delete(OBJ, "b"))
    await storage.run(put(OBJ, ("d", "1")))
    assert await assert_exact(storage) == Usage(keys=3, bytes=6)


# -- bytes ----------------------------------------------------------------------------------


async def test_the_byte_quota_takes_the_limit_and_refuses_one_byte_more(storage: Storage) -> None:
    await storage.run(put(OBJ, ("k", "v" * 29)))  # 1 + 29 = 30 bytes
    await storage.run(put(OBJ, ("j", "v" * 9)))  # 40: exactly the limit
    with pytest.raises(ObjectTooLarge) as refused:
        await storage.run(put(OBJ, ("j", "v" * 10)))  # 41
    assert (refused.value.size, refused.value.limit) == (41, 40)
    assert await assert_exact(storage) == Usage(keys=2, bytes=40)
    # Writes that do not make the object bigger always pass, even over a lowered quota.
    lowered = ObjectQuotas(max_keys=3, max_bytes=20, max_members=2)
    await storage.run(put(OBJ, ("k", "w" * 29), quotas=lowered))
    await storage.run(put(OBJ, ("k", "w" * 20), quotas=lowered))
    with pytest.raises(ObjectTooLarge):
        await storage.run(put(OBJ, ("k", "w" * 21), quotas=lowered))
    assert await assert_exact(storage) == Usage(keys=2, bytes=31)


async def test_writes_checked_together_pass_if_they_fit_together(storage: Storage) -> None:
    """A transaction's (or a turn's) writes count together: a put that its delete makes
    room for fits; over, nothing of them is applied."""
    await storage.run(put(OBJ, ("old", "v" * 27)))  # 30 bytes
    fits = CheckedGrowth(
        OBJ, (put(OBJ, ("new", "v" * 27), quotas=None), delete(OBJ, "old")), QUOTAS
    )
    assert await storage.run(fits) == 2
    over = CheckedGrowth(
        OBJ, (delete(OBJ, "new"), put(OBJ, ("a", "1"), ("b", "v" * 40), quotas=None)), QUOTAS
    )
    with pytest.raises(ObjectTooLarge):
        await storage.run(over)
    assert [k for k, _ in await storage.list(OBJ)] == ["new"]
    assert await assert_exact(storage) == Usage(keys=1, bytes=30)


async def test_a_turn_over_a_quota_refuses_the_objects_whole_commit(storage: Storage) -> None:
    epoch = await storage.run(GrantLease(OBJ, "w1"))

    def turn(sequence: int, *ops: Any, first_put: str | None = "k") -> TurnEffects:
        return TurnEffects("c_1:1", sequence, tuple(ops), b"", True, first_put)

    first = turn(1, put(OBJ, ("k", "v" * 30), quotas=None))  # 31 bytes
    over = turn(2, put(OBJ, ("j", "v" * 9), quotas=None))  # 41
    with pytest.raises(ObjectTooLarge):
        await storage.run(CommitObjectTurns(OBJ, epoch, "w1", (first, over), QUOTAS))
    # All or nothing: not even the first turn, nor its record.
    assert await storage.run(LookupTurnRecord("c_1:1")) is None
    assert await assert_exact(storage) == Usage()
    fits = turn(2, put(OBJ, ("j", "v" * 9), quotas=None), delete(OBJ, "k"))
    assert await storage.run(CommitObjectTurns(OBJ, epoch, "w1", (first, fits), QUOTAS)) is None
    assert await assert_exact(storage) == Usage(keys=1, bytes=10)


# -- members --------------------------------------------------------------------------------


def join(connection_id: str, obj: ObjectId = OBJ) -> JoinMember:
    return JoinMember(obj, connection_id, connection_id.split("_")[0], ("t",), b"", QUOTAS)


async def test_the_member_quota_takes_the_limit_and_refuses_one_more(storage: Storage) -> None:
    assert await storage.run(join("gwa_1")) is True
    assert await storage.run(join("gwb_2")) is True  # two: the limit
    with pytest.raises(TooManyMembers) as refused:
        await storage.run(join("gwa_3"))
    assert (refused.value.size, refused.value.limit, refused.value.key) == (3, 2, "gwa_3")
    # At the limit a member may still change its tags (a join again); a leave frees a place.
    assert await storage.run(join("gwa_1")) is True
    assert await assert_exact(storage) == Usage(members=2)
    assert await storage.run(LeaveMember(OBJ, "gwa_1")) is True
    assert await storage.run(join("gwa_3")) is True
    await storage.run(join("gwa_3", OTHER))
    # Closes and dead gateways count down every object they leave.
    assert await storage.run(LeaveEverything("gwa_3", at_ms=1)) == 2
    assert await storage.run(RemoveGatewayMembers("gwb")) == 1
    assert await assert_exact(storage) == Usage()
    assert await assert_exact(storage, OTHER) == Usage()


# -- the migration --------------------------------------------------------------------------


def _v1_database(backend: Backend) -> Any:
    """A connection to a fresh database at schema version 1 (before usage was kept)."""
    if backend.postgres:
        conn: Any = PgConnection(psycopg.connect(backend.dsn, autocommit=True))
    else:
        conn = sqlite3.connect(backend.db_path, isolation_level=None)
    conn.execute(schema._VERSION_TABLE)
    for statement in schema.MIGRATIONS[0].statements(backend.name):
        conn.execute(statement)
    conn.execute(
        "INSERT INTO schema_version (version, description, applied_ms) VALUES (1, 'v1', 0)"
    )
    return conn


async def test_migrating_counts_the_objects_already_stored(backend: Backend) -> None:
    conn = _v1_database(backend)
    try:
        rows = [
            ("quota", "room", b"a", b"1"),
            ("quota", "room", b"bb", b"22"),
            ("quota", "other", b"x", b""),
        ]
        for row in rows:
            conn.execute("INSERT INTO kv (namespace, name, key, value) VALUES (?, ?, ?, ?)", row)
        for cid in ("gwa_1", "gwa_2"):
            conn.execute(
                "INSERT INTO members (namespace, name, connection_id, gateway_id, tags, "
                "attachment) VALUES (?, ?, ?, ?, ?, ?)",
                ("quota", "other", cid, "gwa", "[]", b""),
            )
    finally:
        (conn.raw if backend.postgres else conn).close()
    async with backend.storage(migrate=True) as storage:
        assert await assert_exact(storage) == Usage(keys=2, bytes=6)
        assert await assert_exact(storage, OTHER) == Usage(keys=1, bytes=1, members=2)
        # And it goes on from there.
        await storage.run(put(OBJ, ("c", "3")))
        with pytest.raises(TooManyObjectKeys):
            await storage.run(put(OBJ, ("d", "4")))
