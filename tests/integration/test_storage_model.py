"""Durable object storage against an in-memory model: a stateful property test.

A real StateServer (gRPC on 127.0.0.1 port 0, a real nats-server), on each database in
turn (the ``backend`` fixture: a SQLite file, a PostgreSQL schema), and a real StateClient;
Hypothesis drives a RuleBasedStateMachine through ``get``, ``get_many``, ``list``,
``put``, ``put_many``, ``delete``, ``delete_many``, ``delete_all``, writes started in one
go (coalesced into Write calls), and transactions that commit or raise, on three objects
at once. The model is one dict per object, and every answer is compared
with it, as is every object's whole content after each step that wrote, and the usage the
state service counts for its quotas (keys, and bytes of keys plus encoded values).

When a run fails, Hypothesis prints the shrunk steps as a program that reproduces it, and a
``@reproduce_failure`` blob.

Keys come from a small universe, so that the steps hit the same keys again and the ordering
edges: ``""``, a NUL, keys that are prefixes of others, and characters whose UTF-8 order
differs from their UTF-16 order (U+E000 and U+FFFF sort *before* supplementary characters in
UTF-8 and code point order, *after* them in UTF-16), and supplementary characters that
differ only beyond the BMP.

The event loop runs on a background thread for the whole test: the server and the client
live on it, and the synchronous state machine submits coroutines to it. One server serves
every example of the test (on PostgreSQL a server per example would cost each a schema, its
migration and a replica's start); each example (machine) has a client of its own and
objects of its own, named apart by a namespace prefix that keeps the three objects'
relations, so it starts from empty objects.

The machine found one bug, kept as its minimal reproduction,
test_a_write_to_a_free_object_does_not_wait_for_a_held_one: writes coalesced into one
Write call waited for each other, so a write to a free object waited for a transaction
holding another one. Write now streams each result as its write finishes.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

import pytest
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
from tests.harness import in_process_state_config
from tests.loop_thread import LoopThread
from tests.storage_keys import KEYS, weighted
from wsgate.stateservice.server import StateServer
from wsgate.v1 import state_pb2 as pb
from wsgate.values import INT64_MAX, INT64_MIN, encode_value
from wsgate.worker.object_storage import ObjectStorage, Transaction
from wsgate.worker.state_client import StateClient

T = TypeVar("T")

#: Names a durable object: (namespace, name).
ObjectKey: TypeAlias = tuple[str, str]
#: One object's content in the model: key -> value.
State: TypeAlias = dict[str, Any]

#: Three objects. The first two have the same namespace + name concatenation ("roomab"),
#: and the third's name is a prefix of the first's: a store that joined or prefixed
#: the parts carelessly would mix them up.
OBJECTS: tuple[ObjectKey, ...] = (("room", "ab"), ("rooma", "b"), ("room", "a"))

#: How long one step may take before the test calls it stuck (a transaction holds its
#: object for at most the service's 10 s transaction timeout).
STEP_TIMEOUT_S = 30.0

SETTINGS = settings(
    # Every step is a gRPC round trip (and a commit when it writes).
    max_examples=50,
    stateful_step_count=30,
    # Every step is I/O on a real server: timing is not the property under test.
    deadline=None,
    print_blob=True,
)
#: On PostgreSQL every commit is a round trip more (and an fsync of its own): fewer
#: examples keep the second run short; the model is the same, SQLite runs them all.
PG_SETTINGS = settings(SETTINGS, max_examples=15)

# -- keys and values ----------------------------------------------------------------------

#: List prefixes: often none, often one that several keys of the universe start with.
PREFIXES = weighted((2, st.just("")), (1, st.sampled_from(("a", "\U0001f600"))), (1, KEYS))
#: A list's start or end: mostly none, so that ranges hold enough keys for limits to cut.
BOUNDS = weighted((2, st.none()), (1, KEYS))

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=INT64_MIN, max_value=INT64_MAX)
    # NaN and -0.0 included: values are compared by their encoding, bit for bit.
    | st.floats()
    | st.text(st.characters(codec="utf-8"), max_size=4)
    | st.binary(max_size=4)
)
VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(st.characters(codec="utf-8"), max_size=3), inner, max_size=3)
    ),
    max_leaves=5,
)

OBJECT_KEYS = st.sampled_from(OBJECTS)

#: A list limit: none, the small ones (0 = none), and those around the wire's uint32 limit
#: (the client sends a larger one as "no limit").
LIMITS = weighted(
    (1, st.none()),
    (3, st.integers(min_value=0, max_value=3)),
    (1, st.sampled_from([2**32 - 1, 2**32])),
)


class _Missing:
    """The default passed to ``get``: tells a missing key from one whose value is None."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def same_value(actual: Any, expected: Any) -> bool:
    """Whether two stored values are the same, by their encoding.

    The encoding tells True from 1 from 1.0, keeps NaN and -0.0 bit for bit, and sorts map
    keys, which ``==`` would not all do.
    """
    if actual is MISSING or expected is MISSING:
        return actual is expected
    return encode_value(actual) == encode_value(expected)


def same_entries(actual: list[tuple[str, Any]], expected: list[tuple[str, Any]]) -> bool:
    """Whether two entry lists have the same keys in the same order, with the same values."""
    return [k for k, _ in actual] == [k for k, _ in expected] and all(
        same_value(a, e) for (_, a), (_, e) in zip(actual, expected, strict=True)
    )


def in_range(key: str, prefix: str, start: str | None, end: str | None) -> bool:
    """The model's list bounds, compared as UTF-8 bytes as the documentation says."""
    raw = key.encode()
    return (
        raw.startswith(prefix.encode())
        and (start is None or raw >= start.encode())
        and (end is None or raw < end.encode())
    )


# -- steps --------------------------------------------------------------------------------
#
# Each step knows what the model expects of it, how to run it on an ObjectStorage and
# inside a Transaction, and how to compare. Steps are frozen dataclasses so that
# Hypothesis prints them as readable, runnable code.


class Step:
    """One operation on one object."""

    def expect(self, state: State, *, in_txn: bool) -> Any:
        """What the model says it returns; a write also applies itself to ``state``."""
        raise NotImplementedError

    async def on_storage(self, storage: ObjectStorage) -> Any:
        """Run it on the object's storage and return the answer."""
        raise NotImplementedError

    async def on_txn(self, txn: Transaction) -> Any:
        """Run it inside a transaction and return the answer."""
        raise NotImplementedError

    def check(self, actual: Any, expected: Any, where: str) -> None:
        """Raise AssertionError unless ``actual`` is what the model expected."""
        raise NotImplementedError


@dataclass(frozen=True)
class Get(Step):
    """``get(key, MISSING)``."""

    key: str

    def expect(self, state: State, *, in_txn: bool) -> Any:
        return state.get(self.key, MISSING)

    async def on_storage(self, storage: ObjectStorage) -> Any:
        return await storage.get(self.key, MISSING)

    async def on_txn(self, txn: Transaction) -> Any:
        return await txn.get(self.key, MISSING)

    def check(self, actual: Any, expected: Any, where: str) -> None:
        assert same_value(actual, expected), f"{where}: {self} gave {actual!r}, model {expected!r}"


@dataclass(frozen=True)
class GetMany(Step):
    """``get_many(keys)``; the keys may repeat."""

    keys: tuple[str, ...]

    def expect(self, state: State, *, in_txn: bool) -> Any:
        return {key: state[key] for key in self.keys if key in state}

    async def on_storage(self, storage: ObjectStorage) -> Any:
        return await storage.get_many(self.keys)

    async def on_txn(self, txn: Transaction) -> Any:
        return await txn.get_many(self.keys)

    def check(self, actual: Any, expected: Any, where: str) -> None:
        # The order of get_many's answer is not documented: compare as mappings.
        ok = set(actual) == set(expected) and all(
            same_value(actual[k], expected[k]) for k in actual
        )
        assert ok, f"{where}: {self} gave {actual!r}, model {expected!r}"


@dataclass(frozen=True)
class List(Step):
    """``list(prefix=, start=, end=, limit=, reverse=)``."""

    prefix: str = ""
    start: str | None = None
    end: str | None = None
    limit: int | None = None
    reverse: bool = False

    def expect(self, state: State, *, in_txn: bool) -> Any:
        keys = [k for k in state if in_range(k, self.prefix, self.start, self.end)]
        keys.sort(key=str.encode, reverse=self.reverse)
        if self.limit is not None:
            keys = keys[: self.limit]
        return [(key, state[key]) for key in keys]

    async def on_storage(self, storage: ObjectStorage) -> Any:
        found = await storage.list(
            prefix=self.prefix,
            start=self.start,
            end=self.end,
            limit=self.limit,
            reverse=self.reverse,
        )
        return list(found.items())

    async def on_txn(self, txn: Transaction) -> Any:
        found = await txn.list(
            prefix=self.prefix,
            start=self.start,
            end=self.end,
            limit=self.limit,
            reverse=self.reverse,
        )
        return list(found.items())

    def check(self, actual: Any, expected: Any, where: str) -> None:
        assert same_entries(actual, expected), (
            f"{where}: {self} gave keys {[k for k, _ in actual]!r} ({actual!r}), "
            f"model {[k for k, _ in expected]!r} ({expected!r})"
        )


class Write(Step):
    """A write: on storage it returns a future of its result; in a transaction, None."""

    def apply(self, state: State) -> Any:
        """Apply it to ``state``; return what the storage's future resolves to."""
        raise NotImplementedError

    def start(self, storage: ObjectStorage) -> asyncio.Future[Any]:
        """Start it on the storage (must be called on the loop)."""
        raise NotImplementedError

    def in_txn(self, txn: Transaction) -> None:
        """Queue it in the transaction."""
        raise NotImplementedError

    def expect(self, state: State, *, in_txn: bool) -> Any:
        result = self.apply(state)
        return None if in_txn else result

    async def on_storage(self, storage: ObjectStorage) -> Any:
        return await self.start(storage)

    async def on_txn(self, txn: Transaction) -> Any:
        return self.in_txn(txn)

    def check(self, actual: Any, expected: Any, where: str) -> None:
        # bool for delete, int for the counts, None otherwise: the type is part of the API.
        ok = actual == expected and type(actual) is type(expected)
        assert ok, f"{where}: {self} gave {actual!r}, model {expected!r}"


@dataclass(frozen=True)
class Put(Write):
    """``put(key, value)``."""

    key: str
    value: Any

    def apply(self, state: State) -> Any:
        state[self.key] = self.value
        return None

    def start(self, storage: ObjectStorage) -> asyncio.Future[Any]:
        return storage.put(self.key, self.value)

    def in_txn(self, txn: Transaction) -> None:
        txn.put(self.key, self.value)


@dataclass(frozen=True)
class PutMany(Write):
    """``put_many(entries)``."""

    entries: dict[str, Any]

    def apply(self, state: State) -> Any:
        state.update(self.entries)
        return None

    def start(self, storage: ObjectStorage) -> asyncio.Future[Any]:
        return storage.put_many(self.entries)

    def in_txn(self, txn: Transaction) -> None:
        txn.put_many(self.entries)


@dataclass(frozen=True)
class Delete(Write):
    """``delete(key)``: resolves to whether the key existed."""

    key: str

    def apply(self, state: State) -> Any:
        return state.pop(self.key, MISSING) is not MISSING

    def start(self, storage: ObjectStorage) -> asyncio.Future[Any]:
        return storage.delete(self.key)

    def in_txn(self, txn: Transaction) -> None:
        txn.delete(self.key)


@dataclass(frozen=True)
class DeleteMany(Write):
    """``delete_many(keys)``: resolves to how many existed; the keys may repeat."""

    keys: tuple[str, ...]

    def apply(self, state: State) -> Any:
        return sum(state.pop(key, MISSING) is not MISSING for key in dict.fromkeys(self.keys))

    def start(self, storage: ObjectStorage) -> asyncio.Future[Any]:
        return storage.delete_many(self.keys)

    def in_txn(self, txn: Transaction) -> None:
        txn.delete_many(self.keys)


@dataclass(frozen=True)
class DeleteAll(Write):
    """``delete_all()``: resolves to how many keys there were."""

    def apply(self, state: State) -> Any:
        count = len(state)
        state.clear()
        return count

    def start(self, storage: ObjectStorage) -> asyncio.Future[Any]:
        return storage.delete_all()

    def in_txn(self, txn: Transaction) -> None:
        txn.delete_all()


READS: st.SearchStrategy[Step] = weighted(
    (1, st.builds(Get, key=KEYS)),
    (1, st.builds(GetMany, keys=st.lists(KEYS, max_size=4).map(tuple))),
    (
        2,
        st.builds(
            List, prefix=PREFIXES, start=BOUNDS, end=BOUNDS, limit=LIMITS, reverse=st.booleans()
        ),
    ),
)
_PUT: st.SearchStrategy[Write] = st.builds(Put, key=KEYS, value=VALUES)
_PUT_MANY: st.SearchStrategy[Write] = st.builds(
    PutMany, entries=st.dictionaries(KEYS, VALUES, max_size=5)
)
_DELETE: st.SearchStrategy[Write] = st.builds(Delete, key=KEYS)
_DELETE_MANY: st.SearchStrategy[Write] = st.builds(
    DeleteMany, keys=st.lists(KEYS, max_size=4).map(tuple)
)
#: Puts 6, deletes 4, delete_all 1: objects must fill up for reads, deletes, ranges and
#: limits to have something to find, and a delete_all empties them again.
WRITES: st.SearchStrategy[Write] = weighted(
    (3, _PUT), (3, _PUT_MANY), (2, _DELETE), (2, _DELETE_MANY), (1, st.builds(DeleteAll))
)


# -- writes started together, and transactions ---------------------------------------------


@dataclass(frozen=True)
class WriteTo:
    """A plain write to ``obj``."""

    obj: ObjectKey
    write: Write


@dataclass(frozen=True)
class NextTurn:
    """Yield to the event loop before starting the next write, so it goes in another call."""


@dataclass(frozen=True)
class Elsewhere:
    """In a transaction's function: a plain write to another object, awaited there. The
    transaction holds only its own object, so this must not wait for it."""

    obj: ObjectKey
    write: Write


@dataclass(frozen=True)
class Later:
    """In a transaction's function: a plain write to the transaction's own object, started
    there and awaited after the transaction. It must wait for the transaction and apply
    after it (or after its abort)."""

    write: Write


TxnStep: TypeAlias = Step | Elsewhere | Later


@dataclass(frozen=True)
class TxnPlan:
    """What a transaction's function does, in order, on ``obj``."""

    obj: ObjectKey
    steps: tuple[TxnStep, ...]


class Boom(Exception):
    """Raised by a transaction's function to abort it."""


def _txn_plans_for(obj: ObjectKey) -> st.SearchStrategy[TxnPlan]:
    others = [other for other in OBJECTS if other != obj]
    step: st.SearchStrategy[TxnStep] = weighted(
        (3, READS),
        (3, WRITES),
        (1, st.builds(Elsewhere, obj=st.sampled_from(others), write=WRITES)),
        (1, st.builds(Later, write=WRITES)),
    )
    # Any number of Later writes: a Write call whose writes wait behind a transaction no
    # longer counts against the client's calls in flight, so Elsewhere writes still go.
    steps = st.lists(step, max_size=8)
    return st.builds(TxnPlan, obj=st.just(obj), steps=steps.map(tuple))


TXN_PLANS = OBJECT_KEYS.flatmap(_txn_plans_for)

#: Stands in a transaction's list of answers for a Later write (answered after it).
_LATER = "<answered after the transaction>"


# -- the event loop thread ------------------------------------------------------------------


@dataclass
class Env:
    """What every machine of one test shares: the loop and the state service on it."""

    loop: LoopThread
    server: StateServer
    _serial: Iterator[int] = field(default_factory=itertools.count, repr=False)

    def new_namespace_prefix(self) -> str:
        """A prefix no other machine (example) uses: its objects start empty."""
        return f"e{next(self._serial)}."


# -- the machine --------------------------------------------------------------------------


class StorageMachine(RuleBasedStateMachine):
    """Random operations on three objects of a real state service, checked against dicts."""

    def __init__(self, env: Env) -> None:
        super().__init__()
        self.env = env
        self.client = StateClient(env.server.address)
        env.loop.run(self.client.start())
        # The same prefix on every namespace keeps what OBJECTS are made to test: the first
        # two still concatenate alike, the third's name is still a prefix of the first's.
        prefix = env.new_namespace_prefix()
        self.storages = {obj: self.client.storage(prefix + obj[0], obj[1]) for obj in OBJECTS}
        self.model: dict[ObjectKey, State] = {obj: {} for obj in OBJECTS}
        # Whether a step wrote since the objects were last compared with the model; all
        # are compared at first, to see that the example's objects start empty.
        self.wrote = True

    def teardown(self) -> None:
        self.env.loop.run(self.client.close())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop thread (where the client's futures must be made)."""
        return self.env.loop.run(coro)

    def check_object(self, obj: ObjectKey) -> None:
        """The whole object, listed, equals the model; so does its counted usage."""
        whole = List()
        whole.check(
            self.run(whole.on_storage(self.storages[obj])),
            whole.expect(self.model[obj], in_txn=False),
            f"object {obj}",
        )
        storage = self.storages[obj]
        request = pb.UsageRequest(
            object=pb.ObjectId(namespace=storage.namespace, name=storage.name)
        )
        counted = self.run(self.client.kv.usage(request)).usage
        model = self.model[obj]
        size = sum(len(key.encode()) + len(encode_value(value)) for key, value in model.items())
        assert (counted.keys, counted.bytes) == (len(model), size), f"usage of object {obj}"

    @invariant()
    def objects_match_the_model(self) -> None:
        # After any write, all three objects: a write that leaked into another object
        # shows at once.
        if self.wrote:
            for obj in OBJECTS:
                self.check_object(obj)
            self.wrote = False

    # -- plain reads and writes ----------------------------------------------------------

    @initialize(contents=st.tuples(*[st.dictionaries(KEYS, VALUES, max_size=8) for _ in OBJECTS]))
    def fill(self, contents: tuple[dict[str, Any], ...]) -> None:
        """Start with some keys in every object, so that the first reads, deletes, ranges
        and limits already have something to find."""
        for obj, entries in zip(OBJECTS, contents, strict=True):
            step = PutMany(entries)
            actual = self.run(step.on_storage(self.storages[obj]))
            step.check(actual, step.expect(self.model[obj], in_txn=False), f"{obj}")
        self.wrote = True

    @rule(obj=OBJECT_KEYS, step=READS)
    def read(self, obj: ObjectKey, step: Step) -> None:
        """get, get_many or list, on the object's storage."""
        actual = self.run(step.on_storage(self.storages[obj]))
        step.check(actual, step.expect(self.model[obj], in_txn=False), f"{obj}")

    @rule(obj=OBJECT_KEYS, step=WRITES)
    def write(self, obj: ObjectKey, step: Write) -> None:
        """put, put_many, delete, delete_many or delete_all, awaited."""
        actual = self.run(step.on_storage(self.storages[obj]))
        self.wrote = True
        step.check(actual, step.expect(self.model[obj], in_txn=False), f"{obj}")

    @rule(
        batch=st.lists(
            st.builds(WriteTo, obj=OBJECT_KEYS, write=WRITES) | st.builds(NextTurn),
            min_size=2,
            max_size=8,
        ).map(tuple)
    )
    def writes_started_together(self, batch: tuple[WriteTo | NextTurn, ...]) -> None:
        """Writes started without awaiting in between (coalesced into Write calls; with
        NextTurn, into several calls in flight at once) apply in the order they started."""

        async def go() -> list[Any]:
            futures: list[asyncio.Future[Any]] = []
            for item in batch:
                if isinstance(item, NextTurn):
                    await asyncio.sleep(0)
                else:
                    futures.append(item.write.start(self.storages[item.obj]))
            return list(await asyncio.gather(*futures))

        results = iter(self.run(go()))
        self.wrote = True
        for index, item in enumerate(batch):
            if isinstance(item, WriteTo):
                expected = item.write.expect(self.model[item.obj], in_txn=False)
                item.write.check(next(results), expected, f"write {index} to {item.obj}")

    @rule(obj=OBJECT_KEYS, limit=st.integers(max_value=-1))
    def negative_limit_is_refused(self, obj: ObjectKey, limit: int) -> None:
        """A negative list limit is a ValueError, before any call."""
        with pytest.raises(ValueError, match="limit"):
            self.run(self.storages[obj].list(limit=limit))

    # -- transactions --------------------------------------------------------------------

    @rule(plan=TXN_PLANS, result=st.none() | VALUES)
    def transaction_commits(self, plan: TxnPlan, result: Any) -> None:
        """A transaction whose function returns ``result``: its reads see the object plus
        its own writes, and its writes apply at once, when it commits."""
        self._transaction(plan, result=result, raises=False)

    @rule(plan=TXN_PLANS)
    def transaction_raises(self, plan: TxnPlan) -> None:
        """A transaction whose function raises after its steps: the exception propagates
        and nothing of its writes applies."""
        self._transaction(plan, result=None, raises=True)

    def _transaction(self, plan: TxnPlan, *, result: Any, raises: bool) -> None:
        obj = plan.obj
        storage = self.storages[obj]
        # The model's answers. Inside the transaction: the object as committed plus the
        # transaction's own writes so far (``working``); other objects: at once.
        working = dict(self.model[obj])
        expected: list[Any] = []
        for step in plan.steps:
            if isinstance(step, Elsewhere):
                expected.append(step.write.expect(self.model[step.obj], in_txn=False))
            elif isinstance(step, Later):
                expected.append(_LATER)
            else:
                expected.append(step.expect(working, in_txn=True))
        boom = Boom("the transaction's function raised")

        async def go() -> tuple[list[Any], Any, list[Any]]:
            answers: list[Any] = []
            later: list[asyncio.Future[Any]] = []

            async def fn(txn: Transaction) -> Any:
                for step in plan.steps:
                    if isinstance(step, Elsewhere):
                        answers.append(await step.write.on_storage(self.storages[step.obj]))
                    elif isinstance(step, Later):
                        later.append(step.write.start(storage))
                        answers.append(_LATER)
                    else:
                        answers.append(await step.on_txn(txn))
                if raises:
                    raise boom
                return result

            outcome: Any
            try:
                outcome = await storage.transaction(fn)
            except Boom as exc:
                outcome = exc
            return answers, outcome, list(await asyncio.gather(*later))

        answers, outcome, later_answers = self.run(go())
        self.wrote = True
        for index, (step, actual, wanted) in enumerate(
            zip(plan.steps, answers, expected, strict=True)
        ):
            if isinstance(step, Elsewhere):
                step.write.check(actual, wanted, f"step {index}, to {step.obj}")
            elif isinstance(step, Step):
                step.check(actual, wanted, f"step {index} in the transaction on {obj}")
        if raises:
            assert outcome is boom, f"the transaction gave {outcome!r}, not the raised {boom!r}"
        else:
            assert same_value(outcome, result), f"the transaction returned {outcome!r}"
            self.model[obj] = working
        # The Later writes waited for the transaction: they apply after it, in order.
        later_steps = [step for step in plan.steps if isinstance(step, Later)]
        for step, actual in zip(later_steps, later_answers, strict=True):
            wanted = step.write.expect(self.model[obj], in_txn=False)
            step.write.check(actual, wanted, f"{step} after the transaction on {obj}")
        self.check_object(obj)


# -- the test -----------------------------------------------------------------------------


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread("storage-model-loop", STEP_TIMEOUT_S)
    try:
        yield loop
    finally:
        loop.close()


def test_storage_matches_the_model(
    nats_url: str, backend: Backend, loop_thread: LoopThread
) -> None:
    """Runs the machine; Hypothesis prints a failing run's steps as a program."""
    server = StateServer(
        in_process_state_config(backend.tmp_path, nats_url, **backend.state_settings())
    )
    loop_thread.run(server.start())
    try:
        env = Env(loop_thread, server)

        class Machine(StorageMachine):
            # Hypothesis makes machines with no arguments; this one is bound to this env.
            def __init__(self) -> None:
                super().__init__(env)

        run_state_machine_as_test(Machine, settings=PG_SETTINGS if backend.postgres else SETTINGS)
    finally:
        loop_thread.run(server.close())


async def test_a_write_to_a_free_object_does_not_wait_for_a_held_one(
    nats_url: str, backend: Backend
) -> None:
    """The minimal reproduction of what the machine found with an Elsewhere write after a
    Later one: a transaction holds only its own object ("objects never wait for each
    other", stateservice.locks), so a put to another object must not wait for it."""
    config = in_process_state_config(backend.tmp_path, nats_url, **backend.state_settings())
    async with StateServer(config) as server, StateClient(server.address) as client:
        held, free = client.storage("room", "held"), client.storage("room", "free")
        holding, release = asyncio.Event(), asyncio.Event()

        async def hold(txn: Transaction) -> None:
            await txn.get("k")  # the service holds the object before answering
            holding.set()
            await release.wait()

        transaction = held.transaction(hold)
        await holding.wait()
        waiting = held.put("k", 1)  # waits for the transaction: right
        unrelated = free.put("k", 2)  # same turn of the loop: the same Write call
        try:
            done, _ = await asyncio.wait({unrelated}, timeout=1.0)
            assert unrelated in done, "a put to a free object waited for another's transaction"
        finally:
            release.set()
            await transaction
            await waiting
            await unrelated
        assert await held.get("k") == 1
        assert await free.get("k") == 2
