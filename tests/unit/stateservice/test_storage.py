"""Storage on both databases (SQLite, PostgreSQL; the ``backend`` fixture): operations,
list ranges and order, lifecycle, reopening, group commit. What is SQLite's alone (WAL
mode, the file and its directory) is tested on SQLite; two PostgreSQL storages on one
database (two replicas) race for a deadlock at the end."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.backends import Backend
from wsgate.errors import InvalidObjectId
from wsgate.pgserver import PostgresServer
from wsgate.stateservice.storage import (
    DATABASE_ERRORS,
    GetKeys,
    ObjectId,
    PostgresStorage,
    PutKeys,
    Sql,
    SqliteStorage,
    Storage,
    StoragePhase,
    prefix_successor,
)

OBJ = ObjectId("counter", "room-1")


@pytest.fixture
async def storage(backend: Backend) -> AsyncIterator[Storage]:
    async with backend.storage() as storage:
        yield storage


async def put_keys(storage: Storage, *keys: str, obj: ObjectId = OBJ) -> None:
    for key in keys:
        await storage.put(obj, key, key.encode())


def keys_of(entries: list[tuple[str, bytes]]) -> list[str]:
    return [key for key, _ in entries]


# -- single keys -------------------------------------------------------------------------


async def test_get_of_a_missing_key_is_none(storage: Storage) -> None:
    assert await storage.get(OBJ, "nope") is None


async def test_put_then_get(storage: Storage) -> None:
    await storage.put(OBJ, "k", b"v1")
    assert await storage.get(OBJ, "k") == b"v1"


async def test_put_overwrites(storage: Storage) -> None:
    await storage.put(OBJ, "k", b"v1")
    await storage.put(OBJ, "k", b"v2")
    assert await storage.get(OBJ, "k") == b"v2"
    assert await storage.list(OBJ) == [("k", b"v2")]


async def test_empty_key_and_empty_value_are_kept(storage: Storage) -> None:
    await storage.put(OBJ, "", b"")
    assert await storage.get(OBJ, "") == b""


async def test_delete_says_whether_the_key_existed(storage: Storage) -> None:
    await storage.put(OBJ, "k", b"v")
    assert await storage.delete(OBJ, "k") is True
    assert await storage.get(OBJ, "k") is None
    assert await storage.delete(OBJ, "k") is False


async def test_objects_are_independent(storage: Storage) -> None:
    same_name_other_namespace = ObjectId("other", OBJ.name)
    other_name = ObjectId(OBJ.namespace, "room-2")
    await storage.put(OBJ, "k", b"mine")
    await storage.put(same_name_other_namespace, "k", b"theirs")
    await storage.put(other_name, "k", b"another")
    assert await storage.get(OBJ, "k") == b"mine"
    assert await storage.get(same_name_other_namespace, "k") == b"theirs"
    assert await storage.delete(other_name, "k") is True
    assert await storage.get(OBJ, "k") == b"mine"
    assert await storage.list(OBJ) == [("k", b"mine")]


def test_an_empty_namespace_is_not_an_object_id() -> None:
    with pytest.raises(InvalidObjectId):
        ObjectId("", "name")
    assert ObjectId("ns", "").name == ""


async def test_operations_apply_in_call_order(storage: Storage) -> None:
    # All started at once: the single SQLite thread applies them in the order called.
    await asyncio.gather(*(storage.put(OBJ, "k", str(i).encode()) for i in range(50)))
    assert await storage.get(OBJ, "k") == b"49"
    _, got = await asyncio.gather(storage.put(OBJ, "j", b"new"), storage.get(OBJ, "j"))
    assert got == b"new"


# -- list --------------------------------------------------------------------------------


async def test_list_of_an_empty_object(storage: Storage) -> None:
    assert await storage.list(OBJ) == []


async def test_list_returns_keys_and_values_in_order(storage: Storage) -> None:
    await put_keys(storage, "b", "a", "c")
    assert await storage.list(OBJ) == [("a", b"a"), ("b", b"b"), ("c", b"c")]


async def test_list_orders_by_utf8_bytes_not_code_units(storage: Storage) -> None:
    # UTF-16 (JavaScript) order would put U+1F600 (surrogates D83D..) before U+FF5E;
    # UTF-8 order puts it after (F0.. > EF..). Uppercase sorts before lowercase.
    keys = ["\U0001f600", "\uff5e", "é", "z", "Z", "a", "\x00", "\U0010ffff"]
    await put_keys(storage, *keys)
    expected = sorted(keys, key=lambda k: k.encode("utf-8"))
    assert expected == ["\x00", "Z", "a", "z", "é", "\uff5e", "\U0001f600", "\U0010ffff"]
    assert keys_of(await storage.list(OBJ)) == expected
    assert keys_of(await storage.list(OBJ, reverse=True)) == expected[::-1]


async def test_list_with_a_prefix(storage: Storage) -> None:
    await put_keys(storage, "user", "user:1", "user:2", "user;", "users", "use", "u")
    assert keys_of(await storage.list(OBJ, prefix="user:")) == ["user:1", "user:2"]
    assert keys_of(await storage.list(OBJ, prefix="user")) == [
        "user",
        "user:1",
        "user:2",
        "user;",
        "users",
    ]
    assert keys_of(await storage.list(OBJ, prefix="nothing")) == []


async def test_an_empty_prefix_lists_everything(storage: Storage) -> None:
    await put_keys(storage, "", "a", "\U0010ffff")
    assert keys_of(await storage.list(OBJ, prefix="")) == ["", "a", "\U0010ffff"]


async def test_prefix_of_the_greatest_code_point(storage: Storage) -> None:
    # "\U0010ffff" is F4 8F BF BF: its successor carries into the last byte, F4 8F BF C0.
    top = "\U0010ffff"
    await put_keys(storage, "\U0010fffe", top, top + "a", top + top, "\U0010fffe" + top)
    assert keys_of(await storage.list(OBJ, prefix=top)) == [top, top + "a", top + top]
    assert keys_of(await storage.list(OBJ, prefix=top + top)) == [top + top]


async def test_prefix_with_non_ascii(storage: Storage) -> None:
    await put_keys(storage, "é", "éa", "éé", "ê", "e")
    assert keys_of(await storage.list(OBJ, prefix="é")) == ["é", "éa", "éé"]


async def test_start_is_inclusive_and_end_exclusive(storage: Storage) -> None:
    await put_keys(storage, "a", "b", "c", "d")
    assert keys_of(await storage.list(OBJ, start="b", end="d")) == ["b", "c"]
    assert keys_of(await storage.list(OBJ, start="bb")) == ["c", "d"]
    assert keys_of(await storage.list(OBJ, end="b")) == ["a"]
    assert keys_of(await storage.list(OBJ, start="b", end="d", reverse=True)) == ["c", "b"]


async def test_start_equal_to_or_past_end_lists_nothing(storage: Storage) -> None:
    await put_keys(storage, "a", "b", "c")
    assert await storage.list(OBJ, start="b", end="b") == []
    assert await storage.list(OBJ, start="c", end="a") == []


async def test_prefix_and_range_intersect(storage: Storage) -> None:
    await put_keys(storage, "a", "p1", "p2", "p3", "p4", "q")
    assert keys_of(await storage.list(OBJ, prefix="p", start="p2", end="p4")) == ["p2", "p3"]
    assert keys_of(await storage.list(OBJ, prefix="p", start="a", end="z")) == [
        "p1",
        "p2",
        "p3",
        "p4",
    ]
    assert await storage.list(OBJ, prefix="p", start="q") == []


async def test_limit(storage: Storage) -> None:
    await put_keys(storage, "a", "b", "c")
    assert await storage.list(OBJ, limit=0) == []
    assert keys_of(await storage.list(OBJ, limit=1)) == ["a"]
    assert keys_of(await storage.list(OBJ, limit=2)) == ["a", "b"]
    assert keys_of(await storage.list(OBJ, limit=10)) == ["a", "b", "c"]


async def test_limit_with_reverse_keeps_the_greatest_keys(storage: Storage) -> None:
    await put_keys(storage, "a", "b", "c")
    assert keys_of(await storage.list(OBJ, limit=1, reverse=True)) == ["c"]
    assert keys_of(await storage.list(OBJ, limit=2, reverse=True)) == ["c", "b"]


async def test_a_negative_limit_is_refused(storage: Storage) -> None:
    with pytest.raises(ValueError, match="limit"):
        await storage.list(OBJ, limit=-1)


@pytest.mark.parametrize(
    ("prefix", "successor"),
    [
        (b"", None),
        (b"\xff", None),
        (b"\xff\xff", None),
        (b"a", b"b"),
        (b"a\xff", b"b"),
        (b"\xf4\x8f\xbf\xbf", b"\xf4\x8f\xbf\xc0"),
        (b"ab\x00", b"ab\x01"),
    ],
)
def test_prefix_successor(prefix: bytes, successor: bytes | None) -> None:
    assert prefix_successor(prefix) == successor


# -- lifecycle and durability -------------------------------------------------------------


async def test_data_survives_close_and_reopen(backend: Backend) -> None:
    async with backend.storage() as first:
        await put_keys(first, "a", "b")
        await first.delete(OBJ, "b")
    async with backend.storage() as second:
        assert await second.list(OBJ) == [("a", b"a")]


# SQLite only: the journal mode of the file.
async def test_the_file_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    async with SqliteStorage(path) as storage:
        await storage.put(OBJ, "k", b"v")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


# SQLite only: the file's directory.
async def test_missing_directories_are_created(tmp_path: Path) -> None:
    async with SqliteStorage(tmp_path / "a" / "b" / "state.sqlite3") as storage:
        await storage.put(OBJ, "k", b"v")
    assert (tmp_path / "a" / "b" / "state.sqlite3").is_file()


async def test_start_and_close_are_idempotent(backend: Backend) -> None:
    storage = backend.storage()
    await storage.start()
    await storage.start()
    assert storage.phase is StoragePhase.OPEN
    await storage.close()
    await storage.close()
    assert storage.phase is StoragePhase.CLOSED


async def test_operations_after_close_raise(backend: Backend) -> None:
    storage = backend.storage()
    await storage.start()
    await storage.close()
    with pytest.raises(RuntimeError, match="closed"):
        await storage.get(OBJ, "k")
    with pytest.raises(RuntimeError, match="closed"):
        await storage.start()


async def test_operations_before_start_raise(backend: Backend) -> None:
    storage = backend.storage()
    with pytest.raises(RuntimeError, match="new"):
        await storage.put(OBJ, "k", b"v")
    await storage.close()


async def test_close_finishes_operations_already_called(backend: Backend) -> None:
    storage = backend.storage()
    await storage.start()
    # gather starts its tasks in order: the writes reach the storage thread before close.
    await asyncio.gather(*(storage.put(OBJ, f"k{i}", b"v") for i in range(20)), storage.close())
    async with backend.storage() as reopened:
        assert len(await reopened.list(OBJ)) == 20


# SQLite only: a path that cannot be a database file.
async def test_an_unopenable_file_fails_start_and_closes(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    storage = SqliteStorage(tmp_path / "dir")  # a directory, not a file
    with pytest.raises(sqlite3.Error):
        await storage.start()
    assert storage.phase is StoragePhase.CLOSED


# PostgreSQL only: a server that is not there.
async def test_an_unreachable_server_fails_start_and_closes() -> None:
    with socket.socket() as sock:  # a port nobody listens on (bound, never listening)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        storage = PostgresStorage(f"postgresql://postgres@127.0.0.1:{port}/postgres")
        with pytest.raises(psycopg.OperationalError):
            await storage.start()
    assert storage.phase is StoragePhase.CLOSED


# -- group commit ------------------------------------------------------------------------


class Boom(Exception):
    """Raised by a test's operation after it wrote."""


@dataclass(frozen=True)
class _Failing:
    """Writes a key of OBJ, then raises: its write must be undone, and it fails alone."""

    writes = True

    def __call__(self, conn: Sql) -> int:
        PutKeys(OBJ, ((b"undone", b"x"),))(conn)
        raise Boom("this write fails after writing")


@dataclass(frozen=True)
class _RefusedWrite:
    """Writes a key of OBJ, then a row the database refuses (NULL in a NOT NULL column):
    on PostgreSQL a failed statement aborts the whole transaction, not the statement alone."""

    writes = True

    def __call__(self, conn: Sql) -> int:
        PutKeys(OBJ, ((b"undone", b"x"),))(conn)
        conn.execute(
            "INSERT INTO kv (namespace, name, key, value) VALUES (?, ?, ?, NULL)",
            (OBJ.namespace, OBJ.name, b"null"),
        )
        raise AssertionError("the database stored a NULL value")


@dataclass(frozen=True)
class _RefusedRead:
    """A read whose statement the database refuses (no such column)."""

    writes = False

    def __call__(self, conn: Sql) -> int:
        conn.execute("SELECT no_such_column FROM kv")
        raise AssertionError("the database read a column that does not exist")


#: Writes that fail, each with what it raises.
FAILING_WRITES = [
    pytest.param(_Failing(), (Boom,), id="raises"),
    pytest.param(_RefusedWrite(), DATABASE_ERRORS, id="refused-write"),
]
FAILING_OPS = [
    *FAILING_WRITES,
    pytest.param(_RefusedRead(), DATABASE_ERRORS, id="refused-read"),
]


@pytest.mark.parametrize(("failing", "raises"), FAILING_OPS)
async def test_a_failing_operation_is_undone_alone_in_its_batch(
    storage: Storage, failing: Any, raises: tuple[type[Exception], ...]
) -> None:
    # Submitted in one turn of the loop: one batch, one transaction.
    commits = storage.stats.commits
    before = storage.submit(PutKeys(OBJ, ((b"a", b"1"),)))
    failed = storage.submit(failing)
    read = storage.submit(GetKeys(OBJ, (b"a", b"undone")))
    after = storage.submit(PutKeys(OBJ, ((b"b", b"2"),)))
    assert await before == 1
    with pytest.raises(raises):
        await failed
    assert await read == [("a", b"1")]  # what came before it, nothing of it
    assert await after == 1
    assert storage.stats.commits == commits + 1
    assert await storage.list(OBJ) == [("a", b"1"), ("b", b"2")]


async def test_concurrent_writes_share_one_commit(storage: Storage) -> None:
    commits = storage.stats.commits
    await asyncio.gather(*(storage.put(OBJ, f"k{i}", b"v") for i in range(100)))
    # All were submitted in one turn of the loop: the thread takes them in one batch.
    assert storage.stats.commits - commits == 1
    assert len(await storage.list(OBJ)) == 100


async def test_without_group_commit_every_write_commits_alone(backend: Backend) -> None:
    async with backend.storage(group_commit=False) as naive:
        commits = naive.stats.commits
        await asyncio.gather(*(naive.put(OBJ, f"k{i}", b"v") for i in range(20)))
        assert naive.stats.commits - commits == 20
        assert len(await naive.list(OBJ)) == 20


@pytest.mark.parametrize(("failing", "raises"), FAILING_WRITES)
async def test_a_failing_write_in_a_write_call_group_fails_alone(
    storage: Storage, failing: Any, raises: tuple[type[Exception], ...]
) -> None:
    from wsgate.stateservice.idempotency import Applied
    from wsgate.stateservice.kv_service import _Unkeyed, _WriteGroup

    group = _WriteGroup(
        [
            _Unkeyed(PutKeys(OBJ, ((b"a", b"1"),))),
            _Unkeyed(failing),
            _Unkeyed(PutKeys(OBJ, ((b"b", b"2"),))),
        ]
    )
    before = storage.stats.writes
    first, failed, last = await storage.submit(group)
    assert first == Applied(1)
    assert isinstance(failed, raises)
    assert last == Applied(1)
    assert await storage.list(OBJ) == [("a", b"1"), ("b", b"2")]
    assert storage.stats.writes == before + 3


# -- two PostgreSQL replicas on one database -----------------------------------------------


#: Where each replica's batch counts its runs: an object of its own, since a write locks
#: its object's usage row on PostgreSQL (stateservice/usage.py), which would order the two
#: batches before their crossed updates could meet.
COUNTS = ObjectId("counter", "runs")


@dataclass(frozen=True)
class _Increment:
    """Adds one to an integer key of an object of its own (a run applied twice shows)."""

    key: bytes
    writes = True

    def __call__(self, conn: Sql) -> None:
        obj = ObjectId(COUNTS.namespace, self.key.decode())
        row = conn.execute(
            "SELECT value FROM kv WHERE namespace = ? AND name = ? AND key = ?",
            (obj.namespace, obj.name, self.key),
        ).fetchone()
        count = 0 if row is None else int(bytes(row[0]))
        PutKeys(obj, ((self.key, str(count + 1).encode()),))(conn)


@dataclass(frozen=True)
class _CrossedUpdates:
    """Sets keys ``first`` then ``second`` of OBJ to ``value``, and meets the other
    replica's operation in between (on the storage threads, so threading events): the two
    lock the two rows in opposite orders, a deadlock that PostgreSQL breaks by aborting
    one of the transactions."""

    value: bytes
    first: bytes
    second: bytes
    mine: threading.Event
    theirs: threading.Event
    runs: list[str]
    writes = True

    def __call__(self, conn: Sql) -> None:
        self.runs.append(self.value.decode())
        # Detect the deadlock after 10 ms instead of the default second.
        conn.execute("SET LOCAL deadlock_timeout = '10ms'")
        update = "UPDATE kv SET value = ? WHERE namespace = ? AND name = ? AND key = ?"
        conn.execute(update, (self.value, OBJ.namespace, OBJ.name, self.first))
        self.mine.set()
        if not self.theirs.wait(10):
            raise TimeoutError("the other replica's operation never took its first row")
        conn.execute(update, (self.value, OBJ.namespace, OBJ.name, self.second))


@pytest.fixture
def pg_backend(tmp_path: Path, postgres_server: PostgresServer) -> Backend:
    return Backend("postgres", tmp_path, postgres_server)


async def test_a_batch_that_meets_a_deadlock_is_run_again_whole(pg_backend: Backend) -> None:
    async with pg_backend.storage() as one, pg_backend.storage() as two:
        await one.run(PutKeys(OBJ, ((b"x", b"-"), (b"y", b"-"))))
        one_took, two_took = threading.Event(), threading.Event()
        runs: list[str] = []
        # Each batch: a write, then the crossed updates; both batches in flight at once.
        batches = [
            [
                storage.submit(_Increment(name.encode())),
                storage.submit(_CrossedUpdates(name.encode(), a, b, mine, theirs, runs)),
            ]
            for storage, name, a, b, mine, theirs in (
                (one, "one", b"x", b"y", one_took, two_took),
                (two, "two", b"y", b"x", two_took, one_took),
            )
        ]
        async with asyncio.timeout(30):
            results = await asyncio.gather(*(f for batch in batches for f in batch))
        assert results == [None] * 4  # no caller saw the deadlock
        # One of them was aborted and ran again, after the other committed.
        assert sorted(runs) in (["one", "one", "two"], ["one", "two", "two"])
        again = "one" if runs.count("one") == 2 else "two"
        entries = dict(await one.list(OBJ))
        # Each batch's increment applied once, although one batch ran twice.
        counts = [await one.get(ObjectId(COUNTS.namespace, k), k) for k in ("one", "two")]
        assert counts == [b"1", b"1"]
        # The batch run again committed last, whole: both rows carry its value.
        assert (entries["x"], entries["y"]) == (again.encode(), again.encode())
        # ... by the batch's own retry (not as one operation's failure, in a savepoint).
        assert one.stats.retries + two.stats.retries == 1
