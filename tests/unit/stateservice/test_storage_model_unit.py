"""Storage against an in-memory model: a stateful property test, without gRPC, on both
databases (the ``backend`` fixture).

The same model as tests/integration/test_storage_model.py (one dict per object, keys in
UTF-8 byte order), run on the storage layer directly: its conveniences (get, put, delete,
list) and its operations (GetKeys, PutKeys, DeleteKeys, DeleteAll, ListQuery), also
submitted together so that group commit puts them in one batch, with an operation that
fails in the middle of it. When the integration test fails and this one does not, the bug
is above the storage (servicer, wire, client).

Every example opens a storage on the test's database and empties it first, so it starts
from an empty database (a new PostgreSQL schema per example would cost its migration).

When a run fails, Hypothesis prints the shrunk steps as a program that reproduces it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tests.backends import Backend
from tests.storage_keys import KEYS, weighted
from wsgate.stateservice.storage import (
    DeleteAll,
    DeleteKeys,
    Entries,
    GetKeys,
    ListQuery,
    ObjectId,
    PutKeys,
    Sql,
)

T = TypeVar("T")

#: One object's content in the model: key -> value.
State: TypeAlias = dict[str, bytes]

#: The first two have the same namespace + name concatenation; the third's name is a
#: prefix of the first's.
OBJECTS = (ObjectId("room", "ab"), ObjectId("rooma", "b"), ObjectId("room", "a"))

SETTINGS = settings(max_examples=60, stateful_step_count=30, deadline=None, print_blob=True)
#: On PostgreSQL every step is a few commits (fsynced) over a socket: fewer examples keep
#: it to a few seconds; SQLite runs them all.
PG_SETTINGS = settings(SETTINGS, max_examples=25)

BOUNDS = weighted((2, st.none()), (1, KEYS))
PREFIXES = weighted((2, st.just("")), (1, st.sampled_from(("a", "\U0001f600"))), (1, KEYS))
LIMITS = weighted((1, st.none()), (3, st.integers(min_value=0, max_value=3)))
#: Stored values are opaque bytes at this layer.
VALUES = st.binary(max_size=3)
OBJECT_IDS = st.sampled_from(OBJECTS)


@dataclass(frozen=True)
class Bounds:
    """The arguments of ``list``."""

    prefix: str = ""
    start: str | None = None
    end: str | None = None
    limit: int | None = None
    reverse: bool = False


def model_list(state: State, bounds: Bounds) -> Entries:
    """What ``list`` must answer, by the documentation: bounds and order on UTF-8 bytes."""
    keys = [
        key
        for key in state
        if key.encode().startswith(bounds.prefix.encode())
        and (bounds.start is None or key.encode() >= bounds.start.encode())
        and (bounds.end is None or key.encode() < bounds.end.encode())
    ]
    keys.sort(key=str.encode, reverse=bounds.reverse)
    if bounds.limit is not None:
        keys = keys[: bounds.limit]
    return [(key, state[key]) for key in keys]


class Boom(Exception):
    """Raised by :class:`FailingPut` after it wrote."""


@dataclass(frozen=True)
class FailingPut:
    """A writing operation that puts, then raises: its savepoint must undo the put, and it
    must fail alone."""

    obj: ObjectId
    key: str
    writes = True

    def __call__(self, conn: Sql) -> int:
        PutKeys(self.obj, ((self.key.encode(), b"never stored"),))(conn)
        raise Boom(self.key)


@dataclass(frozen=True)
class Empty:
    """Delete every object's keys (what an example before this one left)."""

    writes = True

    def __call__(self, conn: Sql) -> None:
        conn.execute("DELETE FROM kv")


#: A batch item: (object, operation name, arguments); see StorageMachine.batch.
BatchItem: TypeAlias = tuple[ObjectId, str, Any]
BATCH_ITEMS: st.SearchStrategy[BatchItem] = st.one_of(
    st.tuples(OBJECT_IDS, st.just("put"), st.lists(st.tuples(KEYS, VALUES), max_size=3)),
    st.tuples(OBJECT_IDS, st.just("delete"), st.lists(KEYS, max_size=3)),
    st.tuples(OBJECT_IDS, st.just("delete_all"), st.none()),
    st.tuples(OBJECT_IDS, st.just("get"), st.lists(KEYS, max_size=3)),
    st.tuples(OBJECT_IDS, st.just("fail"), KEYS),
)


class StorageMachine(RuleBasedStateMachine):
    """Random operations on three objects of one storage, checked against dicts."""

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        # The machine is synchronous: each step runs its coroutine on this runner's loop,
        # where the storage (and its commit loop) lives for the whole example.
        self.runner = asyncio.Runner()
        self.storage = backend.storage()
        try:
            self.runner.run(self.storage.start())
            self.runner.run(self.storage.run(Empty()))
        except BaseException:
            self.runner.run(self.storage.close())
            self.runner.close()
            raise
        self.model: dict[ObjectId, State] = {obj: {} for obj in OBJECTS}

    def teardown(self) -> None:
        try:
            self.runner.run(self.storage.close())
        finally:
            self.runner.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the storage's loop."""
        return self.runner.run(coro)

    @invariant()
    def objects_match_the_model(self) -> None:
        for obj in OBJECTS:
            actual = self.run(self.storage.list(obj))
            assert actual == model_list(self.model[obj], Bounds()), f"{obj}: {actual!r}"

    @initialize(contents=st.tuples(*[st.dictionaries(KEYS, VALUES, max_size=8) for _ in OBJECTS]))
    def fill(self, contents: tuple[dict[str, bytes], ...]) -> None:
        """Start with some keys in every object."""
        for obj, entries in zip(OBJECTS, contents, strict=True):
            pairs = tuple((key.encode(), value) for key, value in entries.items())
            assert self.run(self.storage.run(PutKeys(obj, pairs))) == len(pairs)
            self.model[obj].update(entries)

    @rule(obj=OBJECT_IDS, key=KEYS, value=VALUES)
    def put(self, obj: ObjectId, key: str, value: bytes) -> None:
        self.run(self.storage.put(obj, key, value))
        self.model[obj][key] = value

    @rule(obj=OBJECT_IDS, entries=st.lists(st.tuples(KEYS, VALUES), max_size=4))
    def put_keys(self, obj: ObjectId, entries: list[tuple[str, bytes]]) -> None:
        """PutKeys: a key given twice takes its last value; answers how many entries."""
        pairs = tuple((key.encode(), value) for key, value in entries)
        assert self.run(self.storage.run(PutKeys(obj, pairs))) == len(entries)
        self.model[obj].update(entries)

    @rule(obj=OBJECT_IDS, key=KEYS)
    def delete(self, obj: ObjectId, key: str) -> None:
        existed = self.run(self.storage.delete(obj, key))
        assert existed is (self.model[obj].pop(key, None) is not None), f"{obj} {key!r}"

    @rule(obj=OBJECT_IDS, keys=st.lists(KEYS, max_size=4))
    def delete_keys(self, obj: ObjectId, keys: list[str]) -> None:
        """DeleteKeys: how many of the keys existed, a key listed twice counted once."""
        count = self.run(self.storage.run(DeleteKeys(obj, tuple(k.encode() for k in keys))))
        expected = sum(self.model[obj].pop(key, None) is not None for key in dict.fromkeys(keys))
        assert count == expected, f"{obj} {keys!r}: {count} deleted, model {expected}"

    @rule(obj=OBJECT_IDS)
    def delete_all(self, obj: ObjectId) -> None:
        count = self.run(self.storage.run(DeleteAll(obj)))
        assert count == len(self.model[obj]), f"{obj}: {count} deleted"
        self.model[obj].clear()

    @rule(obj=OBJECT_IDS, key=KEYS)
    def get(self, obj: ObjectId, key: str) -> None:
        assert self.run(self.storage.get(obj, key)) == self.model[obj].get(key), f"{key!r}"

    @rule(obj=OBJECT_IDS, keys=st.lists(KEYS, max_size=4))
    def get_keys(self, obj: ObjectId, keys: list[str]) -> None:
        """GetKeys: the keys that exist, in the order asked, each once."""
        found = self.run(self.storage.run(GetKeys(obj, tuple(k.encode() for k in keys))))
        state = self.model[obj]
        assert found == [(key, state[key]) for key in dict.fromkeys(keys) if key in state]

    @rule(
        obj=OBJECT_IDS,
        bounds=st.builds(
            Bounds, prefix=PREFIXES, start=BOUNDS, end=BOUNDS, limit=LIMITS, reverse=st.booleans()
        ),
    )
    def list_entries(self, obj: ObjectId, bounds: Bounds) -> None:
        """Storage.list (which answers limit 0 itself)."""
        actual = self.run(
            self.storage.list(
                obj,
                prefix=bounds.prefix,
                start=bounds.start,
                end=bounds.end,
                limit=bounds.limit,
                reverse=bounds.reverse,
            )
        )
        expected = model_list(self.model[obj], bounds)
        assert actual == expected, f"{obj} {bounds}: {actual!r}, model {expected!r}"

    @rule(
        obj=OBJECT_IDS,
        bounds=st.builds(
            Bounds,
            prefix=PREFIXES,
            start=BOUNDS,
            end=BOUNDS,
            # The servicer never builds limit 0: on the wire 0 means no limit.
            limit=st.none() | st.integers(min_value=1, max_value=3),
            reverse=st.booleans(),
        ),
    )
    def list_query(self, obj: ObjectId, bounds: Bounds) -> None:
        """ListQuery itself, as the servicer builds it (bytes bounds)."""
        query = ListQuery(
            obj=obj,
            prefix=bounds.prefix.encode(),
            start=None if bounds.start is None else bounds.start.encode(),
            end=None if bounds.end is None else bounds.end.encode(),
            limit=bounds.limit,
            reverse=bounds.reverse,
        )
        actual = self.run(self.storage.run(query))
        expected = model_list(self.model[obj], bounds)
        assert actual == expected, f"{query}: {actual!r}, model {expected!r}"

    @rule(items=st.lists(BATCH_ITEMS, min_size=1, max_size=8))
    def batch(self, items: list[BatchItem]) -> None:
        """Operations submitted in one turn go into one group commit, in order; one that
        raises fails alone, and what it wrote is rolled back."""

        async def go() -> list[Any]:
            futures: list[asyncio.Future[Any]] = []
            for obj, kind, args in items:
                if kind == "put":
                    op: Any = PutKeys(obj, tuple((k.encode(), v) for k, v in args))
                elif kind == "delete":
                    op = DeleteKeys(obj, tuple(k.encode() for k in args))
                elif kind == "delete_all":
                    op = DeleteAll(obj)
                elif kind == "get":
                    op = GetKeys(obj, tuple(k.encode() for k in args))
                else:
                    op = FailingPut(obj, args)
                futures.append(self.storage.submit(op))
            return list(await asyncio.gather(*futures, return_exceptions=True))

        commits_before = self.storage.stats.commits
        outcomes = self.run(go())
        # All of them were queued before the commit loop ran: one batch, one commit.
        assert self.storage.stats.commits == commits_before + 1
        for index, ((obj, kind, args), outcome) in enumerate(zip(items, outcomes, strict=True)):
            state = self.model[obj]
            where = f"item {index} ({obj}, {kind}, {args!r})"
            if kind == "put":
                state.update(args)
                assert outcome == len(args), f"{where}: {outcome!r}"
            elif kind == "delete":
                expected: Any = sum(state.pop(k, None) is not None for k in dict.fromkeys(args))
                assert outcome == expected, f"{where}: {outcome!r}, model {expected!r}"
            elif kind == "delete_all":
                assert outcome == len(state), f"{where}: {outcome!r}, model {len(state)}"
                state.clear()
            elif kind == "get":
                expected = [(k, state[k]) for k in dict.fromkeys(args) if k in state]
                assert outcome == expected, f"{where}: {outcome!r}, model {expected!r}"
            else:
                assert isinstance(outcome, Boom), f"{where}: {outcome!r}"


def test_storage_matches_the_model(backend: Backend) -> None:
    """Runs the machine; Hypothesis prints a failing run's steps as a program."""

    class Machine(StorageMachine):
        # Hypothesis makes machines with no arguments; each empties the test's database.
        def __init__(self) -> None:
            super().__init__(backend)

    run_state_machine_as_test(Machine, settings=PG_SETTINGS if backend.postgres else SETTINGS)
