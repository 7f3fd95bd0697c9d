"""SqliteStorage on a real file: operations, list ranges and order, lifecycle, reopening."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stateservice.storage import (
    ObjectId,
    PutKeys,
    SqliteStorage,
    StoragePhase,
    prefix_successor,
)
from wsgate.errors import InvalidObjectId

OBJ = ObjectId("counter", "room-1")


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[SqliteStorage]:
    async with SqliteStorage(tmp_path / "state.sqlite3") as storage:
        yield storage


async def put_keys(storage: SqliteStorage, *keys: str, obj: ObjectId = OBJ) -> None:
    for key in keys:
        await storage.put(obj, key, key.encode())


def keys_of(entries: list[tuple[str, bytes]]) -> list[str]:
    return [key for key, _ in entries]


# -- single keys -------------------------------------------------------------------------


async def test_get_of_a_missing_key_is_none(storage: SqliteStorage) -> None:
    assert await storage.get(OBJ, "nope") is None


async def test_put_then_get(storage: SqliteStorage) -> None:
    await storage.put(OBJ, "k", b"v1")
    assert await storage.get(OBJ, "k") == b"v1"


async def test_put_overwrites(storage: SqliteStorage) -> None:
    await storage.put(OBJ, "k", b"v1")
    await storage.put(OBJ, "k", b"v2")
    assert await storage.get(OBJ, "k") == b"v2"
    assert await storage.list(OBJ) == [("k", b"v2")]


async def test_empty_key_and_empty_value_are_kept(storage: SqliteStorage) -> None:
    await storage.put(OBJ, "", b"")
    assert await storage.get(OBJ, "") == b""


async def test_delete_says_whether_the_key_existed(storage: SqliteStorage) -> None:
    await storage.put(OBJ, "k", b"v")
    assert await storage.delete(OBJ, "k") is True
    assert await storage.get(OBJ, "k") is None
    assert await storage.delete(OBJ, "k") is False


async def test_objects_are_independent(storage: SqliteStorage) -> None:
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


async def test_operations_apply_in_call_order(storage: SqliteStorage) -> None:
    # All started at once: the single SQLite thread applies them in the order called.
    await asyncio.gather(*(storage.put(OBJ, "k", str(i).encode()) for i in range(50)))
    assert await storage.get(OBJ, "k") == b"49"
    _, got = await asyncio.gather(storage.put(OBJ, "j", b"new"), storage.get(OBJ, "j"))
    assert got == b"new"


# -- list --------------------------------------------------------------------------------


async def test_list_of_an_empty_object(storage: SqliteStorage) -> None:
    assert await storage.list(OBJ) == []


async def test_list_returns_keys_and_values_in_order(storage: SqliteStorage) -> None:
    await put_keys(storage, "b", "a", "c")
    assert await storage.list(OBJ) == [("a", b"a"), ("b", b"b"), ("c", b"c")]


async def test_list_orders_by_utf8_bytes_not_code_units(storage: SqliteStorage) -> None:
    # UTF-16 (JavaScript) order would put U+1F600 (surrogates D83D..) before U+FF5E;
    # UTF-8 order puts it after (F0.. > EF..). Uppercase sorts before lowercase.
    keys = ["\U0001f600", "\uff5e", "é", "z", "Z", "a", "\x00", "\U0010ffff"]
    await put_keys(storage, *keys)
    expected = sorted(keys, key=lambda k: k.encode("utf-8"))
    assert expected == ["\x00", "Z", "a", "z", "é", "\uff5e", "\U0001f600", "\U0010ffff"]
    assert keys_of(await storage.list(OBJ)) == expected
    assert keys_of(await storage.list(OBJ, reverse=True)) == expected[::-1]


async def test_list_with_a_prefix(storage: SqliteStorage) -> None:
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


async def test_an_empty_prefix_lists_everything(storage: SqliteStorage) -> None:
    await put_keys(storage, "", "a", "\U0010ffff")
    assert keys_of(await storage.list(OBJ, prefix="")) == ["", "a", "\U0010ffff"]


async def test_prefix_of_the_greatest_code_point(storage: SqliteStorage) -> None:
    # "\U0010ffff" is F4 8F BF BF: its successor carries into the last byte, F4 8F BF C0.
    top = "\U0010ffff"
    await put_keys(storage, "\U0010fffe", top, top + "a", top + top, "\U0010fffe" + top)
    assert keys_of(await storage.list(OBJ, prefix=top)) == [top, top + "a", top + top]
    assert keys_of(await storage.list(OBJ, prefix=top + top)) == [top + top]


async def test_prefix_with_non_ascii(storage: SqliteStorage) -> None:
    await put_keys(storage, "é", "éa", "éé", "ê", "e")
    assert keys_of(await storage.list(OBJ, prefix="é")) == ["é", "éa", "éé"]


async def test_start_is_inclusive_and_end_exclusive(storage: SqliteStorage) -> None:
    await put_keys(storage, "a", "b", "c", "d")
    assert keys_of(await storage.list(OBJ, start="b", end="d")) == ["b", "c"]
    assert keys_of(await storage.list(OBJ, start="bb")) == ["c", "d"]
    assert keys_of(await storage.list(OBJ, end="b")) == ["a"]
    assert keys_of(await storage.list(OBJ, start="b", end="d", reverse=True)) == ["c", "b"]


async def test_start_equal_to_or_past_end_lists_nothing(storage: SqliteStorage) -> None:
    await put_keys(storage, "a", "b", "c")
    assert await storage.list(OBJ, start="b", end="b") == []
    assert await storage.list(OBJ, start="c", end="a") == []


async def test_prefix_and_range_intersect(storage: SqliteStorage) -> None:
    await put_keys(storage, "a", "p1", "p2", "p3", "p4", "q")
    assert keys_of(await storage.list(OBJ, prefix="p", start="p2", end="p4")) == ["p2", "p3"]
    assert keys_of(await storage.list(OBJ, prefix="p", start="a", end="z")) == [
        "p1",
        "p2",
        "p3",
        "p4",
    ]
    assert await storage.list(OBJ, prefix="p", start="q") == []


async def test_limit(storage: SqliteStorage) -> None:
    await put_keys(storage, "a", "b", "c")
    assert await storage.list(OBJ, limit=0) == []
    assert keys_of(await storage.list(OBJ, limit=1)) == ["a"]
    assert keys_of(await storage.list(OBJ, limit=2)) == ["a", "b"]
    assert keys_of(await storage.list(OBJ, limit=10)) == ["a", "b", "c"]


async def test_limit_with_reverse_keeps_the_greatest_keys(storage: SqliteStorage) -> None:
    await put_keys(storage, "a", "b", "c")
    assert keys_of(await storage.list(OBJ, limit=1, reverse=True)) == ["c"]
    assert keys_of(await storage.list(OBJ, limit=2, reverse=True)) == ["c", "b"]


async def test_a_negative_limit_is_refused(storage: SqliteStorage) -> None:
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


async def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    async with SqliteStorage(path) as first:
        await put_keys(first, "a", "b")
        await first.delete(OBJ, "b")
    async with SqliteStorage(path) as second:
        assert await second.list(OBJ) == [("a", b"a")]


async def test_the_file_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    async with SqliteStorage(path) as storage:
        await storage.put(OBJ, "k", b"v")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


async def test_missing_directories_are_created(tmp_path: Path) -> None:
    async with SqliteStorage(tmp_path / "a" / "b" / "state.sqlite3") as storage:
        await storage.put(OBJ, "k", b"v")
    assert (tmp_path / "a" / "b" / "state.sqlite3").is_file()


async def test_start_and_close_are_idempotent(tmp_path: Path) -> None:
    storage = SqliteStorage(tmp_path / "state.sqlite3")
    await storage.start()
    await storage.start()
    assert storage.phase is StoragePhase.OPEN
    await storage.close()
    await storage.close()
    assert storage.phase is StoragePhase.CLOSED


async def test_operations_after_close_raise(tmp_path: Path) -> None:
    storage = SqliteStorage(tmp_path / "state.sqlite3")
    await storage.start()
    await storage.close()
    with pytest.raises(RuntimeError, match="closed"):
        await storage.get(OBJ, "k")
    with pytest.raises(RuntimeError, match="closed"):
        await storage.start()


async def test_operations_before_start_raise(tmp_path: Path) -> None:
    storage = SqliteStorage(tmp_path / "state.sqlite3")
    with pytest.raises(RuntimeError, match="new"):
        await storage.put(OBJ, "k", b"v")
    await storage.close()


async def test_close_finishes_operations_already_called(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    storage = SqliteStorage(path)
    await storage.start()
    # gather starts its tasks in order: the writes reach the SQLite thread before close.
    await asyncio.gather(*(storage.put(OBJ, f"k{i}", b"v") for i in range(20)), storage.close())
    async with SqliteStorage(path) as reopened:
        assert len(await reopened.list(OBJ)) == 20


async def test_an_unopenable_file_fails_start_and_closes(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    storage = SqliteStorage(tmp_path / "dir")  # a directory, not a file
    with pytest.raises(sqlite3.Error):
        await storage.start()
    assert storage.phase is StoragePhase.CLOSED


# -- group commit ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Failing:
    writes = True

    def __call__(self, conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO kv VALUES ('ns', 'o', x'6b', x'00')")
        raise sqlite3.IntegrityError("this write fails after writing")


async def test_a_failing_write_is_undone_alone_in_its_batch(storage: SqliteStorage) -> None:
    # Submitted in one turn of the loop: one batch, one transaction.
    before = storage.submit(PutKeys(OBJ, ((b"a", b"1"),)))
    failing = storage.submit(_Failing())
    after = storage.submit(PutKeys(OBJ, ((b"b", b"2"),)))
    await before
    with pytest.raises(sqlite3.IntegrityError):
        await failing
    await after
    assert await storage.list(OBJ) == [("a", b"1"), ("b", b"2")]


async def test_concurrent_writes_share_one_commit(storage: SqliteStorage) -> None:
    commits = storage.stats.commits
    await asyncio.gather(*(storage.put(OBJ, f"k{i}", b"v") for i in range(100)))
    # All were submitted in one turn of the loop: the thread takes them in one batch.
    assert storage.stats.commits - commits == 1
    assert len(await storage.list(OBJ)) == 100


async def test_without_group_commit_every_write_commits_alone(tmp_path: Path) -> None:
    async with SqliteStorage(tmp_path / "naive.sqlite3", group_commit=False) as naive:
        await asyncio.gather(*(naive.put(OBJ, f"k{i}", b"v") for i in range(20)))
        assert naive.stats.commits == 20


async def test_a_failing_write_in_a_write_call_group_fails_alone(storage: SqliteStorage) -> None:
    from stateservice.idempotency import Applied
    from stateservice.kv_service import _Unkeyed, _WriteGroup

    group = _WriteGroup(
        [
            _Unkeyed(PutKeys(OBJ, ((b"a", b"1"),))),
            _Unkeyed(_FailingCount()),
            _Unkeyed(PutKeys(OBJ, ((b"b", b"2"),))),
        ]
    )
    before = storage.stats.writes
    first, failed, last = await storage.submit(group)
    assert first == Applied(1)
    assert isinstance(failed, sqlite3.IntegrityError)
    assert last == Applied(1)
    assert await storage.list(OBJ) == [("a", b"1"), ("b", b"2")]
    assert storage.stats.writes == before + 3


class _FailingCount:
    writes = True

    def __call__(self, conn: sqlite3.Connection) -> int:
        conn.execute("INSERT INTO kv VALUES ('counter', 'room-1', x'6b', x'00')")
        raise sqlite3.IntegrityError("this write fails after writing")
