"""The state tier as N replicas over one PostgreSQL: objects placed by rendezvous hashing
over the replicas alive on the bus, refused with NOT_OWNER (naming the owner) by the
others, and moved when a replica dies, joins or leaves, under load, with nothing lost.

Real parts: nats-server, a PostgreSQL from Debian's packages (the session's
``postgres_server``), three ``wsgate state --dsn`` processes, workers and gateways running
tests/apps/objects.py. Clients check what they saw, as in test_activations.py: each
client has an object of its own and counts on it, so its answers must be exactly
1, 2, 3, ... in order, with no socket closed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
import pytest

from tests.harness import Stack, eventually, in_process_state_config, metric
from wsgate.client import ClientClosed, connect
from wsgate.errors import ConfigError, NotOwner, ObjectActive
from wsgate.pgserver import PostgresServer, start_postgres
from wsgate.placement import Replica, object_key, owner_of
from wsgate.procs import Child
from wsgate.state_errors import exception_from_rpc_error
from wsgate.stateservice.server import StateServer
from wsgate.stateservice.storage import PG_IDLE_IN_TRANSACTION_MS
from wsgate.v1 import state_pb2 as pb
from wsgate.v1 import state_pb2_grpc
from wsgate.worker.state_client import StateClient

pytestmark = pytest.mark.timeout(180)

APP = "tests.apps.objects:app"
#: The naive counter's namespace: its class's name.
NAMESPACE = "Naive"
#: How long a replica stays in the others' view after its last announcement.
REPLICA_TIMEOUT_S = 1.5
LEASE_S = 3.0
REPLICA_ARGS = ("--replica-timeout-s", str(REPLICA_TIMEOUT_S), "--lease-s", str(LEASE_S))
ACK = ("--ack-timeout-s", "1")
#: The stated bound on how long the objects of a killed replica go unanswered: the
#: replica's timeout (the others and the workers drop it), one look of the workers' timer,
#: a commit's retry backoff, and room for 2 busy cores.
MOVE_BOUND_S = REPLICA_TIMEOUT_S + 3.5

_schemas = itertools.count(1)


@dataclass
class Client:
    """One client counting on an object of its own; what it saw."""

    path: str
    values: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def longest_gap_s(self) -> float:
        return max((b - a for a, b in itertools.pairwise(self.times)), default=0.0)


async def count(url: str, client: Client, each: int) -> None:
    """``each`` increments, each answered before the next is sent."""
    try:
        async with connect(url) as ws:
            for _ in range(each):
                await ws.send("inc")
                answer = await ws.receive()
                assert isinstance(answer, str)
                client.values.append(int(answer))
                client.times.append(time.monotonic())
    except (ClientClosed, OSError, AssertionError) as exc:
        client.errors.append(repr(exc))


def start_load(stack: Stack, clients: list[Client], each: int) -> list[asyncio.Task[None]]:
    gateways = len(stack.gateways)
    return [
        asyncio.create_task(count(stack.ws_url(c.path, i % gateways), c, each))
        for i, c in enumerate(clients)
    ]


async def answered(clients: list[Client], at_least: int) -> None:
    async def enough() -> bool:
        return sum(len(c.values) for c in clients) >= at_least

    await eventually(enough, f"{at_least} answers", timeout_s=90)


def assert_exact(clients: list[Client], each: int) -> None:
    """Every client got 1..each in order: nothing lost, nothing doubled, no socket closed."""
    for client in clients:
        assert client.errors == [], (client.path, client.errors)
        assert client.values == list(range(1, each + 1)), client.path


def replica_of(child: object) -> Replica:
    info = child.info  # type: ignore[attr-defined]
    return Replica(str(info["replica_id"]), str(info["address"]))


def owner(stack: Stack, path: str) -> Replica:
    """The replica that owns the naive counter at ``path`` among the stack's replicas."""
    name = path.rsplit("/", 1)[1]
    found = owner_of(object_key(NAMESPACE, name), [replica_of(r) for r in stack.replicas])
    assert found is not None
    return found


def metrics_url(child: object) -> str:
    return f"http://127.0.0.1:{child.info['probe_port']}/metrics"  # type: ignore[attr-defined]


async def replicas_see(stack: Stack, count: int, among: list[Child] | None = None) -> None:
    """Every replica (of ``among``, by default all) sees ``count`` live replicas (itself
    included)."""

    async def agreed() -> bool:
        for child in among if among is not None else stack.replicas:
            if await metric(metrics_url(child), "wsgate_state_replicas") != count:
                return False
        return True

    await eventually(agreed, f"every replica to see {count}", timeout_s=20)


def paths_owned(stack: Stack, by: Replica | None, want: int, prefix: str) -> list[str]:
    """``want`` counter paths owned by ``by`` (or by anyone but it, with ``by`` negated by
    the caller): the first names of the form <prefix><n> that it owns."""
    found = []
    for n in itertools.count():
        path = f"/naive/{prefix}{n}"
        if by is None or owner(stack, path) == by:
            found.append(path)
        if len(found) == want:
            return found
    raise AssertionError("unreachable")


@pytest.fixture
def dsn(postgres_server: PostgresServer) -> str:
    return postgres_server.new_database_schema(f"replicas{next(_schemas)}_{os.getpid()}")


def replicas_stack(
    tmp_path: Path, dsn: str, replicas: int = 3, replica_args: tuple[str, ...] = REPLICA_ARGS
) -> Iterator[Stack]:
    stack = Stack(tmp_path)
    try:
        stack.start_nats()
        for _ in range(replicas):
            stack.start_replica(dsn, *replica_args)
        for _ in range(2):
            stack.start_worker(APP)
        stack.start_gateway(*ACK)
        stack.start_gateway(*ACK)
        yield stack
    finally:
        statuses = stack.stop()
        stack.dump_logs()
    bad = {name: s for name, s in statuses.items() if s not in (0, -signal.SIGTERM)}
    assert not bad, f"processes did not exit cleanly: {bad}"


@pytest.fixture
def stack(tmp_path: Path, dsn: str) -> Iterator[Stack]:
    yield from replicas_stack(tmp_path, dsn)


def db_rows(dsn: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return list(conn.execute(sql).fetchall())


async def test_a_replica_refuses_an_object_it_does_not_own_naming_the_owner(
    stack: Stack,
) -> None:
    await replicas_see(stack, 3)
    obj = pb.ObjectId(namespace=NAMESPACE, name="somewhere")
    the_owner = owner(stack, "/naive/somewhere")
    other = next(r for r in map(replica_of, stack.replicas) if r != the_owner)
    async with grpc.aio.insecure_channel(other.address) as channel:
        stub = state_pb2_grpc.StateStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Get(pb.GetRequest(object=obj, keys=["count"]), timeout=5)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    error = exception_from_rpc_error(refused.value, "Get")
    assert isinstance(error, NotOwner)
    assert (error.owner, error.address) == (the_owner.replica_id, the_owner.address)
    # A client that knows only the wrong replica follows the refusal to the owner.
    async with StateClient(other.address) as client:
        await client.storage(NAMESPACE, "somewhere").put("count", 41)
        assert await client.storage(NAMESPACE, "somewhere").get("count") == 41
        assert client.redirects >= 1
    # ... and the owner counted it as its own, the other as a refusal.
    assert await metric(metrics_url(stack.replicas[0]), "wsgate_state_replicas") == 3
    refusals = [
        await metric(metrics_url(c), "wsgate_state_not_owner_total") for c in stack.replicas
    ]
    assert refusals[[replica_of(c) for c in stack.replicas].index(other)] >= 1


async def test_kill_9_of_a_replica_under_load_loses_nothing_and_its_alarms_fire_once(
    stack: Stack, dsn: str
) -> None:
    await replicas_see(stack, 3)
    victim_child = stack.replicas[1]
    victim = replica_of(victim_child)
    moved = paths_owned(stack, victim, 6, "moved")
    staying = [p for p in paths_owned(stack, None, 40, "stay") if owner(stack, p) != victim][:6]
    alarmed = paths_owned(stack, victim, 3, "alarm")
    each = 60
    clients = [Client(path) for path in moved + staying]
    tasks = start_load(stack, clients, each)
    # Alarms on the victim's objects, due just after it dies.
    for path in alarmed:
        async with connect(stack.ws_url(path)) as ws:
            await ws.send("alarm-in 1500")
            assert await ws.receive() == "alarm"
    await answered(clients, len(clients) * each // 3)
    stack.kill(victim_child)
    killed_at = time.monotonic()
    await asyncio.gather(*tasks)

    assert_exact(clients, each)
    # Its objects moved within the bound: the longest silence of their clients.
    for client in clients[: len(moved)]:
        assert client.longest_gap_s < MOVE_BOUND_S, (client.path, client.longest_gap_s)
    assert time.monotonic() - killed_at > 0
    # Acknowledged writes are all in the database: one count per object, at its last value.
    rows = dict(db_rows(dsn, "SELECT name, value FROM kv WHERE namespace = 'Naive'"))
    assert {name for name in rows} >= {c.path.rsplit("/", 1)[1] for c in clients}

    # Each alarm ran once (its turn counts 1) and its row is gone: it cannot run again.
    async def alarms_ran() -> bool:
        return db_rows(dsn, "SELECT count(*) FROM alarms")[0][0] == 0

    await eventually(alarms_ran, "the moved objects' alarms to run", timeout_s=30)
    for path in alarmed:
        async with connect(stack.ws_url(path)) as ws:
            await ws.send("read")
            assert await ws.receive() == "1", path
            await ws.send("alarm?")
            assert await ws.receive() == "none"


async def test_replicas_joining_and_leaving_under_load_move_leases_never_data(
    tmp_path: Path, dsn: str
) -> None:
    for stack in replicas_stack(tmp_path, dsn, replicas=2):
        await replicas_see(stack, 2)
        each = 80
        clients = [Client(f"/naive/churn{i}") for i in range(12)]
        tasks = start_load(stack, clients, each)
        await answered(clients, len(clients) * each // 4)
        # A third replica joins: about a third of the objects move to it.
        joined = stack.start_replica(dsn, *REPLICA_ARGS)
        await replicas_see(stack, 3)
        newcomer = replica_of(joined)
        its_objects = [c.path for c in clients if owner(stack, c.path) == newcomer]
        assert its_objects, "no object moved to the new replica (choose more objects)"
        await eventually(
            _positive(metrics_url(joined), "wsgate_state_leases"),
            "the new replica to hold leases",
            timeout_s=30,
        )
        await answered(clients, len(clients) * each // 2)
        # The first replica leaves (SIGTERM: it announces it and its objects move at once).
        leaving = stack.replicas[0]
        assert leaving.stop() == 0
        stack.forget(leaving)
        await asyncio.gather(*tasks)
        assert_exact(clients, each)
        # The data never moved: one row per object, in the one database, at its count.
        rows = db_rows(dsn, "SELECT name FROM kv WHERE namespace = 'Naive' AND key = 'count'")
        assert sorted(name for (name,) in rows) == sorted(c.path.rsplit("/", 1)[1] for c in clients)


def _positive(url: str, name: str) -> Callable[[], Awaitable[bool]]:
    async def positive() -> bool:
        return await metric(url, name) > 0

    return positive


async def test_a_write_from_outside_to_an_active_object_that_moved_is_refused(
    tmp_path: Path, dsn: str
) -> None:
    # Leases of 20 s: the holder renews every 5 s, so the write below reaches the new
    # owner before the renewal tells it about the lease; it must find the lease anyway.
    args = ("--replica-timeout-s", str(REPLICA_TIMEOUT_S), "--lease-s", "20")
    for stack in replicas_stack(tmp_path, dsn, replica_args=args):
        await replicas_see(stack, 3)
        victim_child = stack.replicas[1]
        (path,) = paths_owned(stack, replica_of(victim_child), 1, "moving")
        name = path.rsplit("/", 1)[1]
        async with connect(stack.ws_url(path)) as ws:
            await ws.send("inc")
            assert await ws.receive() == "1"  # active on a worker, granted by the victim
            stack.kill(victim_child)
            await replicas_see(stack, 2)
            survivor = replica_of(stack.replicas[0])
            async with StateClient(survivor.address) as client:
                with pytest.raises(ObjectActive):
                    await client.storage(NAMESPACE, name).put("count", 100)
            # The activation goes on, its count intact.
            await ws.send("inc")
            assert await ws.receive() == "2"


async def test_a_postgresql_restart_under_load_loses_nothing_and_closes_no_socket(
    tmp_path: Path,
) -> None:
    # A PostgreSQL of its own: this test restarts it. Two replicas: every commit in flight
    # fails UNAVAILABLE while it is down and is retried once it is back.
    pg = start_postgres(tmp_path / "pg")
    try:
        dsn = pg.new_database_schema("restart")
        (tmp_path / "stack").mkdir()
        for stack in replicas_stack(tmp_path / "stack", dsn, replicas=2):
            await replicas_see(stack, 2)
            each = 60
            clients = [Client(f"/naive/pg{i}") for i in range(8)]
            tasks = start_load(stack, clients, each)
            await answered(clients, len(clients) * each // 3)
            port = pg.port
            pg.stop()  # fast shutdown: every connection is cut
            pg = start_postgres(tmp_path / "pg", port=port)
            await asyncio.gather(*tasks)
            assert_exact(clients, each)
    finally:
        pg.stop()


async def test_a_replica_on_every_address_must_be_told_what_to_advertise(
    tmp_path: Path, dsn: str, nats_url: str
) -> None:
    config = in_process_state_config(tmp_path, nats_url, host="0.0.0.0", dsn=dsn, migrate="yes")
    with pytest.raises(ConfigError, match="advertise"):
        await StateServer(config).start()


async def test_a_paused_replica_writes_nothing_after_the_others_took_its_objects_over(
    stack: Stack,
) -> None:
    await replicas_see(stack, 3)
    victim = stack.replicas[1]
    others = [stack.replicas[0], stack.replicas[2]]
    moved = paths_owned(stack, replica_of(victim), 4, "paused")
    staying = [p for p in paths_owned(stack, None, 30, "awake") if p not in moved][:4]
    each = 80
    clients = [Client(path) for path in moved + staying]
    tasks = start_load(stack, clients, each)
    await answered(clients, len(clients) * each // 4)
    os.kill(victim.pid, signal.SIGSTOP)  # mid-batch, maybe: its locks go with its session
    try:
        await replicas_see(stack, 2, among=others)
        # The others serve its objects now: its clients go on while it sleeps.
        before = sum(len(c.values) for c in clients[: len(moved)])
        await eventually(
            _moved_on(clients[: len(moved)], before + 20),
            "the paused replica's objects to be served by the others",
            timeout_s=30,
        )
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    # It wakes up believing it owns its objects: whatever it had in flight is refused by
    # the epochs in the database, and it rejoins (its objects move back to it).
    await replicas_see(stack, 3)
    await asyncio.gather(*tasks)
    assert_exact(clients, each)
    # Moved within the bound, plus the time PostgreSQL gives a session idle in a
    # transaction (the paused replica may hold a lease row's lock) before ending it.
    bound_s = MOVE_BOUND_S + PG_IDLE_IN_TRANSACTION_MS / 1000
    for client in clients[: len(moved)]:
        assert client.longest_gap_s < bound_s, (client.path, client.longest_gap_s)


def _moved_on(clients: list[Client], answers: int) -> Callable[[], Awaitable[bool]]:
    async def moved_on() -> bool:
        return sum(len(c.values) for c in clients) >= answers

    return moved_on
