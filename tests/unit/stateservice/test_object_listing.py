"""Listing a namespace's objects (ListObjects) on SQLite and PostgreSQL: those that hold
storage or members, in code point order, paged, by prefix, with their usage."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.backends import Backend
from wsgate import ids
from wsgate.stateservice.membership import JoinMember, LeaveMember
from wsgate.stateservice.storage import DeleteAll, ObjectId, PutKeys, Storage
from wsgate.stateservice.usage import ListObjects, Usage, _prefix_end


@pytest.fixture
async def storage(backend: Backend) -> AsyncIterator[Storage]:
    async with backend.storage() as storage:
        yield storage


async def put(storage: Storage, name: str, key: bytes = b"k", value: bytes = b"v") -> None:
    await storage.run(PutKeys(ObjectId("rooms", name), ((key, value),)))


async def names(storage: Storage, **kwargs: object) -> tuple[list[str], bool]:
    page, more = await storage.run(ListObjects("rooms", **kwargs))  # type: ignore[arg-type]
    return [name for name, _ in page], more


async def test_objects_that_hold_something_in_code_point_order(storage: Storage) -> None:
    for name in ("b", "a", "ab", "B", "é", "😀", "a\x01"):
        await put(storage, name)
    await put(storage, "elsewhere")  # the same name space, another namespace below
    await storage.run(PutKeys(ObjectId("other", "zz"), ((b"k", b"v"),)))
    assert await names(storage) == (
        sorted(["b", "a", "ab", "B", "é", "😀", "a\x01", "elsewhere"]),
        False,
    )
    assert await names(storage, prefix="a") == (["a", "a\x01", "ab"], False)
    assert await names(storage, prefix="😀") == (["😀"], False)
    assert await names(storage, prefix="zz") == ([], False)


async def test_pages_at_the_limit_and_past_it(storage: Storage) -> None:
    for n in range(7):
        await put(storage, f"room{n}")
    assert await names(storage, limit=7) == ([f"room{n}" for n in range(7)], False)
    assert await names(storage, limit=6) == ([f"room{n}" for n in range(6)], True)
    assert await names(storage, limit=3, after="room2") == (["room3", "room4", "room5"], True)
    assert await names(storage, limit=3, after="room5") == (["room6"], False)
    assert await names(storage, after="room6") == ([], False)


async def test_usage_is_listed_and_an_emptied_object_is_gone(storage: Storage) -> None:
    await put(storage, "stored", b"key", b"value")
    gateway = ids.new_gateway_id("gw")
    member = ids.ConnectionIds(gateway).next()
    await storage.run(JoinMember(ObjectId("rooms", "joined"), member, gateway, ("t",), b""))
    page, _ = await storage.run(ListObjects("rooms"))
    assert page == [("joined", Usage(0, 0, 1)), ("stored", Usage(1, 8, 0))]
    await storage.run(DeleteAll(ObjectId("rooms", "stored")))
    await storage.run(LeaveMember(ObjectId("rooms", "joined"), member))
    assert await names(storage) == ([], False)


def test_the_end_of_a_prefix_range() -> None:
    assert _prefix_end("") is None
    assert _prefix_end("ab") == "ac"
    assert _prefix_end("a\U0010ffff") == "b"
    assert _prefix_end("\U0010ffff") is None
    assert _prefix_end("x\ud7ff") == "x\ue000"
