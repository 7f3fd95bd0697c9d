"""Membership's storage operations on both databases (the ``backend`` fixture): joins,
tags, pages, departures, gateway sweeps, broadcast recipients; and on SQLite, the query
plans behind them."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.backends import Backend
from wsgate import ids
from wsgate.stateservice.membership import (
    PAGE_SIZE,
    SWEEP_BATCH,
    BroadcastRecipients,
    GatewaysWithMembers,
    GetMember,
    JoinMember,
    LeaveEverything,
    LeaveMember,
    MembersPage,
    PruneDeparted,
    RemoveGatewayMembers,
    SetMemberAttachment,
    SetMemberTags,
    StoredMember,
)
from wsgate.stateservice.storage import ObjectId, PostgresStorage, Sql, SqliteStorage, Storage
from wsgate.values import encode_value

ROOM = ObjectId("room", "lobby")
OTHER = ObjectId("room", "kitchen")


@pytest.fixture
async def storage(backend: Backend) -> AsyncIterator[Storage]:
    async with backend.storage() as storage:
        yield storage


def connection_ids(count: int, node: str = "gw") -> list[str]:
    """``count`` connection ids of one new gateway, in connection id (string) order."""
    source = ids.ConnectionIds(ids.new_gateway_id(node))
    return sorted(source.next() for _ in range(count))


async def join(
    storage: Storage,
    connection_id: str,
    obj: ObjectId = ROOM,
    tags: tuple[str, ...] = (),
    attachment: bytes = b"",
) -> bool:
    return await storage.run(
        JoinMember(obj, connection_id, ids.gateway_of(connection_id), tags, attachment)
    )


async def page_ids(storage: Storage, **kwargs: object) -> tuple[list[str], bool]:
    members, more = await storage.run(MembersPage(obj=ROOM, **kwargs))  # type: ignore[arg-type]
    return [m.connection_id for m in members], more


# -- join, list, leave --------------------------------------------------------------------


async def test_members_are_listed_in_connection_id_order(storage: Storage) -> None:
    cids = connection_ids(5)
    for cid in reversed(cids):
        assert await join(storage, cid) is True
    assert await page_ids(storage) == (cids, False)
    assert await storage.run(MembersPage(obj=OTHER)) == ([], False)


async def test_join_is_an_upsert_replacing_tags_and_attachment(storage: Storage) -> None:
    (cid,) = connection_ids(1)
    await join(storage, cid, tags=("red", "blue"), attachment=encode_value({"n": 1}))
    await join(storage, cid, tags=("green",), attachment=encode_value("two"))
    members, _ = await storage.run(MembersPage(obj=ROOM, details=True))
    assert members == [StoredMember(cid, ("green",), encode_value("two"))]
    assert await page_ids(storage, tag="red") == ([], False)
    assert await page_ids(storage, tag="blue") == ([], False)
    assert await page_ids(storage, tag="green") == ([cid], False)


async def test_listing_by_tag_keeps_only_members_with_it(storage: Storage) -> None:
    a, b, c = connection_ids(3)
    await join(storage, a, tags=("admin", "x"))
    await join(storage, b, tags=("x",))
    await join(storage, c, tags=("admin",))
    await join(storage, b, obj=OTHER, tags=("admin",))  # the same tag in another object
    assert await page_ids(storage, tag="admin") == ([a, c], False)
    assert await page_ids(storage, tag="x") == ([a, b], False)
    assert await page_ids(storage, tag="none") == ([], False)


async def test_tags_with_routing_characters_are_plain_strings(storage: Storage) -> None:
    (cid,) = connection_ids(1)
    tag = "a.b *>\"' é\U0001f600"
    await join(storage, cid, tags=(tag,))
    members, _ = await storage.run(MembersPage(obj=ROOM, tag=tag, details=True))
    assert members == [StoredMember(cid, (tag,), b"")]


async def test_pages_follow_the_cursor(storage: Storage) -> None:
    cids = connection_ids(7)
    for cid in cids:
        await join(storage, cid, tags=("t",))
    for tag in (None, "t"):
        seen: list[str] = []
        after = ""
        while True:
            page, more = await page_ids(storage, tag=tag, after=after, limit=3)
            seen += page
            if not more:
                break
            after = page[-1]
        assert seen == cids


async def test_a_page_of_exactly_the_limit_says_no_more(storage: Storage) -> None:
    cids = connection_ids(PAGE_SIZE + 1)
    await asyncio.gather(*(join(storage, cid) for cid in cids[:PAGE_SIZE]))  # one commit
    page, more = await page_ids(storage)
    assert (len(page), more) == (PAGE_SIZE, False)
    await join(storage, cids[PAGE_SIZE])  # one over
    page, more = await page_ids(storage)
    assert (page, more) == (cids[:PAGE_SIZE], True)
    assert await page_ids(storage, after=page[-1]) == ([cids[PAGE_SIZE]], False)


async def test_a_details_page_ends_early_past_its_byte_budget(storage: Storage) -> None:
    cids = connection_ids(3)
    attachment = encode_value(b"x" * 1000)
    for cid in cids:
        await join(storage, cid, tags=("t",), attachment=attachment)
    per_member = len('["t"]') + len(attachment)
    # At the budget: all three fit; one byte under it, the third starts the next page.
    members, more = await storage.run(MembersPage(obj=ROOM, details=True, max_bytes=3 * per_member))
    assert ([m.connection_id for m in members], more) == (cids, False)
    members, more = await storage.run(
        MembersPage(obj=ROOM, details=True, max_bytes=3 * per_member - 1)
    )
    assert ([m.connection_id for m in members], more) == (cids[:2], True)
    # A member larger than the budget still comes, alone: a page always makes progress.
    members, more = await storage.run(MembersPage(obj=ROOM, details=True, max_bytes=1))
    assert ([m.connection_id for m in members], more) == (cids[:1], True)


async def test_leave_removes_one_membership(storage: Storage) -> None:
    a, b = connection_ids(2)
    await join(storage, a, tags=("t",))
    await join(storage, a, obj=OTHER, tags=("t",))
    await join(storage, b, tags=("t",))
    assert await storage.run(LeaveMember(ROOM, a)) is True
    assert await storage.run(LeaveMember(ROOM, a)) is False
    assert await page_ids(storage) == ([b], False)
    assert await page_ids(storage, tag="t") == ([b], False)
    members, _ = await storage.run(MembersPage(obj=OTHER, tag="t"))
    assert [m.connection_id for m in members] == [a]


async def test_leave_everything_removes_a_connection_from_every_object(
    storage: Storage,
) -> None:
    a, b = connection_ids(2)
    for obj in (ROOM, OTHER, ObjectId("game", "1")):
        await join(storage, a, obj=obj, tags=("t", "u"))
    await join(storage, b, tags=("t",))
    assert await storage.run(LeaveEverything(a, at_ms=1)) == 3
    assert await storage.run(LeaveEverything(a, at_ms=2)) == 0  # idempotent
    assert await page_ids(storage) == ([b], False)
    assert await page_ids(storage, tag="t") == ([b], False)
    for obj in (OTHER, ObjectId("game", "1")):
        assert await storage.run(MembersPage(obj=obj)) == ([], False)
        assert await storage.run(MembersPage(obj=obj, tag="u")) == ([], False)


async def test_a_departed_connection_cannot_join_until_pruned(storage: Storage) -> None:
    (cid,) = connection_ids(1)
    await storage.run(LeaveEverything(cid, at_ms=1000))
    assert await join(storage, cid) is False  # the late copy of an event, after the close
    assert await page_ids(storage) == ([], False)
    assert await storage.run(PruneDeparted(before_ms=1000)) == 0  # at the boundary: kept
    assert await storage.run(PruneDeparted(before_ms=1001)) == 1
    assert await join(storage, cid) is True


async def stored(storage: Storage, connection_id: str) -> StoredMember | None:
    return await storage.run(GetMember(ROOM, connection_id))


async def test_attachments_read_and_replace(storage: Storage) -> None:
    a, b = connection_ids(2)
    await join(storage, a, tags=("t",), attachment=encode_value({"name": "ada"}))
    assert await stored(storage, a) == StoredMember(a, ("t",), encode_value({"name": "ada"}))
    assert await stored(storage, b) is None
    assert await storage.run(SetMemberAttachment(ROOM, a, encode_value(2))) is True
    assert await stored(storage, a) == StoredMember(a, ("t",), encode_value(2))
    assert await storage.run(SetMemberAttachment(ROOM, b, encode_value(2))) is False
    assert await stored(storage, b) is None
    assert await storage.run(SetMemberAttachment(ROOM, a, b"")) is True
    assert await stored(storage, a) == StoredMember(a, ("t",), b"")


async def test_tags_replaced_live_keep_the_attachment_and_move_the_tag_index(
    storage: Storage,
) -> None:
    a, b = connection_ids(2)
    await join(storage, a, tags=("red", "blue"), attachment=encode_value("ada"))
    await join(storage, b, tags=("red",))
    assert await storage.run(SetMemberTags(ROOM, a, ("blue", "green"))) is True
    assert await stored(storage, a) == StoredMember(a, ("blue", "green"), encode_value("ada"))
    assert await page_ids(storage, tag="red") == ([b], False)
    assert await page_ids(storage, tag="green") == ([a], False)
    assert await storage.run(BroadcastRecipients(ROOM, tag="blue")) == {ids.gateway_of(a): [a]}
    assert await storage.run(SetMemberTags(ROOM, a, ())) is True
    assert await page_ids(storage, tag="blue") == ([], False)
    assert await page_ids(storage) == (sorted([a, b]), False)  # still a member
    assert await storage.run(SetMemberTags(ROOM, connection_ids(3)[2], ("red",))) is False
    assert await page_ids(storage, tag="red") == ([b], False)


# -- gateways and broadcast ---------------------------------------------------------------


async def test_a_gateway_members_are_removed_in_batches(storage: Storage) -> None:
    dead = connection_ids(SWEEP_BATCH + 1, node="dead")
    alive = connection_ids(2, node="alive")
    await asyncio.gather(
        *(join(storage, cid, tags=("t",)) for cid in dead[:SWEEP_BATCH]),
        join(storage, dead[-1], obj=OTHER, tags=("t",)),
        *(join(storage, cid, tags=("t",)) for cid in alive),
    )
    dead_gateway = ids.gateway_of(dead[0])
    assert sorted(await storage.run(GatewaysWithMembers())) == sorted(
        [dead_gateway, ids.gateway_of(alive[0])]
    )
    assert await storage.run(RemoveGatewayMembers(dead_gateway)) == SWEEP_BATCH  # a full one
    assert await storage.run(RemoveGatewayMembers(dead_gateway)) == 1
    assert await storage.run(RemoveGatewayMembers(dead_gateway)) == 0
    assert await page_ids(storage) == (alive, False)
    assert await page_ids(storage, tag="t") == (alive, False)
    assert await storage.run(MembersPage(obj=OTHER, tag="t")) == ([], False)
    assert await storage.run(GatewaysWithMembers()) == [ids.gateway_of(alive[0])]


async def test_broadcast_recipients_by_gateway_tag_and_exclusion(storage: Storage) -> None:
    one = connection_ids(3, node="one")
    two = connection_ids(2, node="two")
    for i, cid in enumerate(one + two):
        await join(storage, cid, tags=("even",) if i % 2 == 0 else ("odd",))
    g1, g2 = ids.gateway_of(one[0]), ids.gateway_of(two[0])
    everyone = await storage.run(BroadcastRecipients(ROOM))
    assert everyone == {g1: one, g2: two}
    assert await storage.run(BroadcastRecipients(ROOM, tag="even")) == {
        g1: [one[0], one[2]],
        g2: [two[1]],
    }
    excluded = await storage.run(BroadcastRecipients(ROOM, exclude=frozenset(two)))
    assert excluded == {g1: one}
    assert await storage.run(BroadcastRecipients(OTHER)) == {}


@dataclass(frozen=True)
class StoreMembers:
    """Members of ROOM without tags or attachment, as JoinMember stores them, in one
    statement run for every row (psycopg pipelines it): 100,000 JoinMembers take a minute
    on PostgreSQL, three round trips each, and the joins are not what is tested here."""

    connection_ids: tuple[str, ...]
    gateway_id: str
    writes = True

    def __call__(self, conn: Sql) -> None:
        conn.executemany(
            "INSERT INTO members (namespace, name, connection_id, gateway_id, tags, attachment) "
            "VALUES (?, ?, ?, ?, '[]', ?)",
            [(ROOM.namespace, ROOM.name, cid, self.gateway_id, b"") for cid in self.connection_ids],
        )


async def test_an_object_holds_100_000_members(backend: Backend, storage: Storage) -> None:
    """No cap below 100,000: every member is listed (in pages) and addressed."""
    count = 100_000
    cids = connection_ids(count)
    gateway_id = ids.gateway_of(cids[0])
    if backend.postgres:
        await storage.run(StoreMembers(tuple(cids), gateway_id))
    else:
        await asyncio.gather(
            *(storage.submit(JoinMember(ROOM, cid, gateway_id, (), b"")) for cid in cids)
        )
    listed: list[str] = []
    after = ""
    while True:
        page, more = await page_ids(storage, after=after)
        listed += page
        if not more:
            break
        after = page[-1]
    assert listed == cids
    recipients = await storage.run(BroadcastRecipients(ROOM))
    assert recipients == {gateway_id: cids}


async def test_members_survive_reopening(backend: Backend) -> None:
    (cid,) = connection_ids(1)
    async with backend.storage() as storage:
        await join(storage, cid, tags=("t",), attachment=encode_value(1))
    async with backend.storage() as storage:
        members, _ = await storage.run(MembersPage(obj=ROOM, tag="t", details=True))
        assert members == [StoredMember(cid, ("t",), encode_value(1))]


# -- query plans (SQLite's: EXPLAIN QUERY PLAN) ----------------------------------------------


def plan_of(db: Path, sql: str, params: tuple[object, ...]) -> str:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
    finally:
        conn.close()
    return "\n".join(str(row[-1]) for row in rows)


class RecordingConnection:
    """Wraps a sqlite3 connection and records the SQL each operation runs."""

    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.statements: list[tuple[str, tuple[object, ...]]] = []

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
        self.statements.append((sql, tuple(params)))
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: list[tuple[object, ...]]) -> sqlite3.Cursor:
        for params in rows:
            self.statements.append((sql, tuple(params)))
        return self.conn.executemany(sql, rows)


@pytest.mark.parametrize(
    ("name", "op"),
    [
        ("list", MembersPage(obj=ROOM)),
        ("list with details", MembersPage(obj=ROOM, details=True)),
        ("list by tag", MembersPage(obj=ROOM, tag="t")),
        ("list by tag with details", MembersPage(obj=ROOM, tag="t", details=True)),
        ("broadcast", BroadcastRecipients(ROOM)),
        ("broadcast by tag", BroadcastRecipients(ROOM, tag="t")),
        ("leave", LeaveMember(ROOM, "gw-abcdefgh_1")),
        ("leave all", LeaveEverything("gw-abcdefgh_1", at_ms=1)),
        ("gateway sweep", RemoveGatewayMembers("gw-abcdefgh")),
        ("join", JoinMember(ROOM, "gw-abcdefgh_1", "gw-abcdefgh", ("t",), b"")),
    ],
)
async def test_every_query_is_an_index_search_with_no_sort(
    tmp_path: Path, name: str, op: object
) -> None:
    """Listing in connection id order (by tag or not), LeaveAll and gateway sweeps walk an
    index range; nothing scans a table or sorts in a temporary b-tree."""
    db = tmp_path / "state.sqlite3"
    async with SqliteStorage(db) as storage:
        await join(storage, "gw-abcdefgh_1", tags=("t",))
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        recorder = RecordingConnection(conn)
        op(recorder)  # type: ignore[operator]
    finally:
        conn.close()
    assert recorder.statements, name
    for sql, params in recorder.statements:
        if not sql.lstrip().upper().startswith(("SELECT", "DELETE", "UPDATE")):
            continue
        plan = plan_of(db, sql, params)
        assert "SCAN" not in plan, f"{name}: {sql}\n{plan}"
        assert "TEMP B-TREE" not in plan, f"{name}: {sql}\n{plan}"
        assert "SEARCH" in plan, f"{name}: {sql}\n{plan}"


# -- PostgreSQL only: a database that collates text by language ---------------------------


async def test_members_are_in_byte_order_on_a_language_collated_database(
    language_collated_dsn: str,
) -> None:
    """Listing, paging from a cursor and broadcasting go in connection id order, bytewise,
    also where the database's own collation is a language's (the schema's COLLATE "C")."""
    cids = ["gw-a_1", "gw_a-2", "gwa3", "gw-b_10", "gw-b_9", "gwZ", "gw-B_1"]
    expected = sorted(cids)  # Python compares code points: byte order for ASCII
    async with PostgresStorage(language_collated_dsn, migrate=True) as storage:
        language_order = await storage.run(Collated(tuple(cids)))
        assert language_order != expected, "the database collates bytewise: nothing tested"
        for cid in cids:
            await storage.run(JoinMember(ROOM, cid, "gw", ("t",), b""))
        for tag in (None, "t"):
            assert await page_ids(storage, tag=tag) == (expected, False)
            seen: list[str] = []
            after = ""
            while True:
                page, more = await page_ids(storage, tag=tag, after=after, limit=2)
                seen += page
                if not more:
                    break
                after = page[-1]
            assert seen == expected, tag
            assert await storage.run(BroadcastRecipients(ROOM, tag=tag)) == {"gw": expected}


@dataclass(frozen=True)
class Collated:
    """``strings`` in the database's default collation."""

    strings: tuple[str, ...]
    writes = False

    def __call__(self, conn: Sql) -> list[str]:
        row = conn.execute(
            "SELECT array_agg(s ORDER BY s) FROM unnest(?::text[]) AS s", (list(self.strings),)
        ).fetchone()
        return list(row[0])
