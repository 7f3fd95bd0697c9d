"""Transactions, batch forms, idempotency keys and group commit, on a real StateServer over
gRPC (in this process, port 0), on each database in turn (the ``backend`` fixture: a
SQLite file, a PostgreSQL schema)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from tests.backends import Backend
from tests.harness import eventually, in_process_state_config, write_results
from wsgate.config import StateConfig
from wsgate.errors import InvalidValue, TooManyKeys, TransactionAborted
from wsgate.limits import MAX_BATCH_KEYS
from wsgate.stateservice.component import StateContext
from wsgate.stateservice.idempotency import IdempotencyPruner
from wsgate.stateservice.server import StateServer
from wsgate.v1 import state_pb2 as pb
from wsgate.v1 import state_pb2_grpc
from wsgate.values import encode_value
from wsgate.worker.gate import OutputGate, current_gate
from wsgate.worker.object_storage import ObjectStorage, Transaction
from wsgate.worker.state_client import StateClient

#: The transaction timeout of this module's state service (short: some tests wait it out).
TRANSACTION_TIMEOUT_S = 1.0


#: For a test whose writes never reach the database (refused, or aborted before commit):
#: the state service on one backend is enough.
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


def state_config(backend: Backend, nats_url: str, **settings: Any) -> StateConfig:
    """An in-process state service's config, on ``backend``'s database."""
    return in_process_state_config(
        backend.tmp_path, nats_url, **backend.state_settings(), **settings
    )


@pytest.fixture
async def server(
    backend: Backend, nats_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[StateServer]:
    # A test marked transaction_timeout(s) gets a service with that timeout instead.
    marker = request.node.get_closest_marker("transaction_timeout")
    timeout_s = marker.args[0] if marker else TRANSACTION_TIMEOUT_S
    async with StateServer(
        state_config(backend, nats_url, transaction_timeout_s=timeout_s)
    ) as server:
        yield server


@pytest.fixture
async def client(server: StateServer) -> AsyncIterator[StateClient]:
    async with StateClient(server.address) as client:
        yield client


@pytest.fixture
def counter(client: StateClient) -> ObjectStorage:
    return client.storage("counter", "main")


async def increment(txn: Transaction) -> int:
    value: int = await txn.get("n", 0) + 1
    txn.put("n", value)
    return value


# -- batch forms -----------------------------------------------------------------------------


async def test_batch_forms(counter: ObjectStorage) -> None:
    await counter.put_many({"a": 1, "b": [2], "c": {"d": b"\x00"}})
    assert await counter.get_many(["a", "c", "missing", "a"]) == {"a": 1, "c": {"d": b"\x00"}}
    assert await counter.delete_many(["a", "missing", "a"]) == 1
    assert await counter.list() == {"b": [2], "c": {"d": b"\x00"}}
    assert await counter.delete_all() == 2
    assert await counter.list() == {}
    assert await counter.delete_all() == 0


async def test_a_batch_at_the_key_limit_is_accepted(counter: ObjectStorage) -> None:
    keys = [f"k{i:03}" for i in range(MAX_BATCH_KEYS)]
    await counter.put_many(dict.fromkeys(keys, 1))
    assert len(await counter.get_many(keys)) == MAX_BATCH_KEYS
    assert await counter.delete_many(keys) == MAX_BATCH_KEYS


@sqlite_only
@pytest.mark.parametrize("operation", ["put_many", "get_many", "delete_many"])
async def test_a_batch_one_key_over_the_limit_is_refused(
    counter: ObjectStorage, operation: str
) -> None:
    keys = [f"k{i:03}" for i in range(MAX_BATCH_KEYS + 1)]
    argument: Any = dict.fromkeys(keys, 1) if operation == "put_many" else keys
    with pytest.raises(TooManyKeys) as info:
        await getattr(counter, operation)(argument)
    assert (info.value.size, info.value.limit) == (129, 128)
    assert "129 keys" in str(info.value)
    assert "128 keys" in str(info.value)
    assert await counter.list() == {}


async def test_writes_start_without_being_awaited(counter: ObjectStorage) -> None:
    # As in Cloudflare: put() starts the write; awaiting only waits for durability.
    first = counter.put("k", 1)
    second = counter.put("k", 2)
    await asyncio.gather(first, second)
    assert await counter.get("k") == 2


# -- transactions ----------------------------------------------------------------------------


async def test_a_transaction_reads_its_own_writes(counter: ObjectStorage) -> None:
    await counter.put_many({"a": 1, "b": 2, "c": 3})

    async def body(txn: Transaction) -> dict[str, Any]:
        txn.put("b", 20)
        txn.delete("c")
        txn.put("d", 4)
        seen = {
            "b": await txn.get("b"),
            "c": await txn.get("c", "gone"),
            "list": await txn.list(),
            "reverse2": await txn.list(reverse=True, limit=2),
        }
        txn.delete_all()
        txn.put("z", 26)
        seen["after_delete_all"] = await txn.list()
        return seen

    seen = await counter.transaction(body)
    assert seen == {
        "b": 20,
        "c": "gone",
        "list": {"a": 1, "b": 20, "d": 4},
        "reverse2": {"d": 4, "b": 20},
        "after_delete_all": {"z": 26},
    }
    assert await counter.list() == {"z": 26}


async def test_a_list_limit_counts_what_the_transaction_deleted(counter: ObjectStorage) -> None:
    await counter.put_many({"a": 1, "b": 2, "c": 3, "d": 4})

    async def body(txn: Transaction) -> Any:
        txn.delete_many(["a", "b"])
        return await txn.list(limit=2)

    assert await counter.transaction(body) == {"c": 3, "d": 4}


async def test_a_failing_transaction_writes_nothing(counter: ObjectStorage) -> None:
    await counter.put("n", 1)

    async def body(txn: Transaction) -> None:
        txn.put("n", 100)
        txn.put("other", 1)
        raise RuntimeError("changed my mind")

    with pytest.raises(RuntimeError, match="changed my mind"):
        await counter.transaction(body)
    assert await counter.list() == {"n": 1}
    # And the object was released.
    assert await counter.transaction(increment) == 2


@sqlite_only
async def test_an_unstorable_result_aborts_the_transaction(counter: ObjectStorage) -> None:
    async def body(txn: Transaction) -> object:
        txn.put("n", 1)
        return object()

    with pytest.raises(InvalidValue):
        await counter.transaction(body)
    assert await counter.list() == {}


@sqlite_only
async def test_a_transaction_over_the_key_limit_is_refused_whole(counter: ObjectStorage) -> None:
    async def body(txn: Transaction) -> None:
        txn.put_many({f"k{i:03}": i for i in range(MAX_BATCH_KEYS + 1)})

    with pytest.raises(TooManyKeys):
        await counter.transaction(body)
    assert await counter.list() == {}


# 200 transactions queue for one object, and the last waits for all the others (the wait
# counts towards the timeout): on a busy 2-core machine 1 s is too tight for that.
@pytest.mark.transaction_timeout(10.0)
async def test_concurrent_increments_are_serialized(counter: ObjectStorage) -> None:
    results = await asyncio.gather(*(counter.transaction(increment) for _ in range(200)))
    assert sorted(results) == list(range(1, 201))
    assert await counter.get("n") == 200


async def test_a_plain_write_waits_for_the_transaction_holding_its_object(
    counter: ObjectStorage,
) -> None:
    read = asyncio.Event()
    go_on = asyncio.Event()

    async def slow_increment(txn: Transaction) -> int:
        value: int = await txn.get("n", 0)
        read.set()
        await go_on.wait()
        txn.put("n", value + 1)
        return value + 1

    transaction = counter.transaction(slow_increment)
    await read.wait()
    overwrite = counter.put("n", 100)
    # The put is queued behind the transaction; it cannot have landed in between.
    assert await counter.get("n") is None
    go_on.set()
    assert await transaction == 1
    await overwrite
    assert await counter.get("n") == 100


async def test_a_held_object_does_not_stall_other_objects(client: StateClient) -> None:
    held = client.storage("counter", "held")
    other = client.storage("counter", "other")
    read = asyncio.Event()
    release = asyncio.Event()

    async def hold(txn: Transaction) -> None:
        await txn.get("n")
        read.set()
        await release.wait()

    transaction = held.transaction(hold)
    await read.wait()
    # Writes, reads and transactions on another object go through while "held" is held.
    await other.put("n", 1)
    assert await other.transaction(increment) == 2
    assert await held.get("n") is None  # reads of the held object are not blocked either
    release.set()
    await transaction


@sqlite_only
async def test_a_transaction_past_its_deadline_is_aborted(counter: ObjectStorage) -> None:
    # The server fixture aborts transactions after 1 s.
    async def too_slow(txn: Transaction) -> None:
        txn.put("n", 1)
        await txn.get("n")
        await asyncio.sleep(3)  # the holder stalls: what the timeout exists for

    with pytest.raises(TransactionAborted, match="took longer than 1 s"):
        await counter.transaction(too_slow, timeout_s=10)
    assert await counter.list() == {}
    assert await counter.transaction(increment) == 1


# -- idempotency -----------------------------------------------------------------------------


async def test_a_keyed_write_is_applied_once(server: StateServer, counter: ObjectStorage) -> None:
    obj = pb.ObjectId(namespace="counter", name="main")
    entry = pb.Entry(key="n", value=encode_value(1))
    write = pb.Write(put=pb.PutRequest(object=obj, entries=[entry]), idempotency_key="c_1:7:1")
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = state_pb2_grpc.StateStub(channel)
        (first,) = await write_results(stub, pb.WriteRequest(writes=[write]))
        await counter.put("n", 2)  # a later write that a replay must not undo
        again, twice = await write_results(stub, pb.WriteRequest(writes=[write, write]))
    assert (first.count, first.replayed) == (1, False)
    assert (again.count, again.replayed) == (1, True)
    assert (twice.count, twice.replayed) == (1, True)
    assert await counter.get("n") == 2


async def test_a_keyed_transaction_replays_its_first_result(counter: ObjectStorage) -> None:
    runs = 0

    async def counted_increment(txn: Transaction) -> int:
        nonlocal runs
        runs += 1
        return await increment(txn)

    async def handler_run() -> int:
        # What the worker does for every delivery of event 5 of connection c_9.
        current_gate.set(OutputGate("c_9:5"))
        return await counter.transaction(counted_increment)

    assert await asyncio.create_task(handler_run()) == 1
    assert await counter.transaction(increment) == 2  # someone else, in between
    assert await asyncio.create_task(handler_run()) == 1  # the redelivery: same answer
    assert runs == 1
    assert await counter.get("n") == 2


async def test_writes_of_a_run_are_numbered_so_a_replay_matches_them(
    counter: ObjectStorage,
) -> None:
    async def handler_run() -> None:
        current_gate.set(OutputGate("c_3:2"))
        await counter.put("log", "first")
        await counter.put("log", "second")

    await asyncio.create_task(handler_run())
    await counter.put("log", "later")
    await asyncio.create_task(handler_run())
    assert await counter.get("log") == "later"


# -- group commit ----------------------------------------------------------------------------


async def test_concurrent_writers_share_commits(server: StateServer, client: StateClient) -> None:
    stats = server.storage.stats
    before_commits, before_writes = stats.commits, stats.writes
    objects = [client.storage("spread", str(i)) for i in range(10)]
    await asyncio.gather(*(objects[i % 10].put(f"k{i}", i) for i in range(2000)))
    writes = stats.writes - before_writes
    commits = stats.commits - before_commits
    assert writes == 2000
    # One fsync serves many writers: far fewer commits than writes.
    assert commits * 10 <= writes, (commits, writes)
    assert await objects[3].get("k1993") == 1993


async def test_keys_past_their_retention_are_pruned(
    backend: Backend, nats_url: str, server: StateServer, counter: ObjectStorage
) -> None:
    async def handler_run() -> None:
        current_gate.set(OutputGate("c_4:1"))
        await counter.put("n", "from the event")

    await asyncio.create_task(handler_run())
    await counter.put("n", "later")
    assert server.ownership is not None
    pruner = IdempotencyPruner(
        StateContext(
            state_config(backend, nats_url, idempotency_retention_s=0.001),
            server.storage,
            server.locks,
            nc=None,  # type: ignore[arg-type]  # the pruner never touches the bus
            leases=server.leases,
            ownership=server.ownership,
        )
    )
    # Retention is measured in wall-clock time: poll, bounded.
    await eventually(pruner.prune_once, "a record past its retention pruned", timeout_s=5)
    # Forgotten: the same key is applied again (which is why retention must exceed any
    # redelivery window).
    await asyncio.create_task(handler_run())
    assert await counter.get("n") == "from the event"


async def test_writes_waiting_behind_a_transaction_do_not_hold_back_other_writes(
    backend: Backend, nats_url: str
) -> None:
    # A patient server: the hold must outlast everything the test checks.
    config = state_config(backend, nats_url, transaction_timeout_s=60)
    async with StateServer(config) as server, StateClient(server.address) as client:
        await _check_held_writes_do_not_hold_back_others(client)


async def _check_held_writes_do_not_hold_back_others(client: StateClient) -> None:
    held = client.storage("counter", "held")
    free = client.storage("counter", "free")
    holding, release = asyncio.Event(), asyncio.Event()

    async def hold(txn: Transaction) -> None:
        await txn.get("n")
        holding.set()
        await release.wait()

    transaction = held.transaction(hold)
    await holding.wait()
    waiting = []
    for i in range(8):  # more Write calls than the client keeps in flight, all held back
        waiting.append(held.put("n", i))
        await asyncio.sleep(0)  # each in a call of its own
    # Still held: the write to the free object is answered all the same.
    done, _ = await asyncio.wait({free.put("n", 1)}, timeout=10)
    assert done, "a write to a free object waited for another object's transaction"
    assert not any(w.done() for w in waiting)
    release.set()
    await transaction
    await asyncio.gather(*waiting)
    assert await held.get("n") == 7
