"""Membership and broadcast, for real, with the state service on each database in turn
(SQLite, PostgreSQL: the ``backend`` and ``module_backend`` fixtures).

In-process: a real nats-server, a StateServer and the worker SDK's ObjectMembers over a
real StateClient; NATS subscribers stand in for gateways where only the commands matter.
Separate processes (tests/harness.py): real gateways, a worker running
``tests.apps.members:app`` and WebSocket clients, for close, ``kill -9`` of a gateway,
broadcast over two gateways, and the scale test (10,000 WebSockets, one broadcast).
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from tests.backends import Backend
from tests.harness import Stack, eventually, in_process_state_config, metric, stack_context
from wsgate import ids, subjects
from wsgate.bench.loadgen import raise_nofile_limit
from wsgate.config import GatewayConfig, StateConfig
from wsgate.errors import (
    AttachmentTooLarge,
    InvalidConnectionId,
    InvalidObjectId,
    InvalidValue,
    StateError,
    TagTooLarge,
    TooManyTags,
)
from wsgate.gateway.server import Gateway
from wsgate.limits import MAX_ATTACHMENT_BYTES, MAX_TAG_CHARS, MAX_TAGS
from wsgate.procs import Child, start_nats_server
from wsgate.state_errors import ERROR_INFO_KEY
from wsgate.stateservice.membership import INVALID_CONNECTION_ID, PAGE_SIZE, MembershipComponent
from wsgate.stateservice.server import StateServer
from wsgate.stateservice.storage import ObjectId
from wsgate.v1 import envelope_pb2 as envelope
from wsgate.v1 import state_pb2 as pb
from wsgate.v1 import state_pb2_grpc
from wsgate.values import encode_value
from wsgate.worker.membership import Member, ObjectMembers, leave_all
from wsgate.worker.state_client import StateClient

PREFIX = "wsgate"


def new_ids(count: int, node: str = "gw") -> list[str]:
    """``count`` connection ids of a new gateway, in connection id order."""
    source = ids.ConnectionIds(ids.new_gateway_id(node))
    return sorted(source.next() for _ in range(count))


async def gather_bounded(calls: list[Awaitable[Any]], limit: int = 256) -> list[Any]:
    """Await ``calls`` at most ``limit`` at a time (one gRPC channel cancels calls beyond
    roughly a thousand in flight)."""
    slots = asyncio.Semaphore(limit)

    async def one(call: Awaitable[Any]) -> Any:
        async with slots:
            return await call

    return await asyncio.gather(*(one(call) for call in calls))


def attachment_of_size(size: int) -> bytes:
    """A bytes value whose encoded Value is exactly ``size`` bytes."""
    length = size
    while len(encode_value(b"x" * length)) > size:
        length -= 1
    value = b"x" * length
    assert len(encode_value(value)) == size
    return value


# -- in-process fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    child = start_nats_server(tmp_path_factory.mktemp("nats"))
    try:
        yield child
    finally:
        child.stop()


#: For a test whose calls never reach the database (refused before it, or not about it):
#: the state service on one backend is enough.
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


def state_config(backend: Backend, nats_url: str, **settings: Any) -> StateConfig:
    """An in-process state service's config, on ``backend``'s database."""
    return in_process_state_config(
        backend.tmp_path, nats_url, **backend.state_settings(), **settings
    )


@pytest.fixture
async def server(backend: Backend, nats_server: Child) -> AsyncIterator[StateServer]:
    config = state_config(backend, str(nats_server.info["url"]), prefix=PREFIX)
    async with StateServer(config) as server:
        yield server


@pytest.fixture
async def client(server: StateServer) -> AsyncIterator[StateClient]:
    async with StateClient(server.address) as client:
        yield client


@pytest.fixture
def room(client: StateClient) -> ObjectMembers:
    return ObjectMembers(client, "room", "lobby")


@pytest.fixture
async def stub(server: StateServer) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield state_pb2_grpc.MembershipStub(channel)


@pytest.fixture
async def bus(nats_server: Child) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(str(nats_server.info["url"]))
    try:
        yield nc
    finally:
        await nc.close()


def membership_of(server: StateServer) -> MembershipComponent:
    (component,) = [c for c in server._components if isinstance(c, MembershipComponent)]
    return component


def error_info_of(err: grpc.aio.AioRpcError) -> pb.ErrorInfo:
    for key, value in err.trailing_metadata() or ():
        if key == ERROR_INFO_KEY:
            return pb.ErrorInfo.FromString(value)
    raise AssertionError(f"no {ERROR_INFO_KEY} in {err.trailing_metadata()!r}")


class FakeGateways:
    """NATS subscribers on every gateway subject: the commands a broadcast publishes."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, envelope.GatewayCommand]] = []

    async def on_command(self, msg: Msg) -> None:
        gateway_id = msg.subject.rsplit(".", 1)[1]
        for item in envelope.GatewayBatch.FromString(msg.data).items:
            self.commands.append((gateway_id, item.command))

    def addressed(self) -> dict[str, list[str]]:
        by_gateway: dict[str, list[str]] = {}
        for gateway_id, command in self.commands:
            by_gateway.setdefault(gateway_id, []).extend(command.connection_ids)
        return by_gateway


@pytest.fixture
async def gateways(bus: NatsClient) -> FakeGateways:
    fake = FakeGateways()
    await bus.subscribe(subjects.gateway_subject(PREFIX, subjects.ANY), cb=fake.on_command)
    await bus.flush()
    return fake


# -- join, list, leave, attachments -------------------------------------------------------


async def test_accept_list_and_leave(room: ObjectMembers, client: StateClient) -> None:
    a, b, c = new_ids(3)
    await room.accept(c, tags=["blue"], attachment={"name": "cy"})
    await room.accept(a, tags=["red", "blue"], attachment={"name": "ada"})
    await room.accept(b)
    assert await room.connections() == [
        Member(a, ("red", "blue"), {"name": "ada"}),
        Member(b, (), None),
        Member(c, ("blue",), {"name": "cy"}),
    ]
    assert [m.id for m in await room.connections(tag="blue")] == [a, c]
    assert [m.id for m in await room.connections(tag="red")] == [a]
    assert await room.connections(tag="green") == []
    assert await ObjectMembers(client, "room", "other").connections() == []
    assert await room.leave(b) is True
    assert await room.leave(b) is False
    assert [m.id for m in await room.connections()] == [a, c]


async def test_accept_again_replaces_tags_and_attachment(room: ObjectMembers) -> None:
    (a,) = new_ids(1)
    await room.accept(a, tags=["red", "red", "blue"], attachment=[1, 2])
    await room.accept(a, tags=["green"], attachment={"v": b"\x00"})
    assert await room.connections() == [Member(a, ("green",), {"v": b"\x00"})]
    assert await room.connections(tag="red") == []


async def test_attachments_read_and_replace(room: ObjectMembers) -> None:
    a, stranger = new_ids(2)
    await room.accept(a, attachment={"name": "ada"})
    assert await room.attachment(a) == {"name": "ada"}
    assert await room.set_attachment(a, {"name": "ada", "score": 3}) is True
    assert await room.attachment(a) == {"name": "ada", "score": 3}
    assert await room.set_attachment(a, None) is True
    assert await room.attachment(a, "none") == "none"
    assert await room.attachment(stranger, "absent") == "absent"
    assert await room.set_attachment(stranger, 1) is False
    assert await room.attachment(stranger) is None


async def test_connections_pages_through_every_member(room: ObjectMembers, stub: Any) -> None:
    cids = new_ids(2 * PAGE_SIZE + 1)
    await gather_bounded([room.accept(cid, tags=["t"]) for cid in cids])
    assert [m.id for m in await room.connections()] == cids
    assert [m.id for m in await room.connections(tag="t")] == cids
    # The page size: 0 means it, and more than it is cut to it.
    obj = pb.ObjectId(namespace="room", name="lobby")
    for limit in (0, PAGE_SIZE, PAGE_SIZE + 1):
        page = await stub.Members(pb.MembersRequest(object=obj, limit=limit))
        assert (len(page.members), page.more) == (PAGE_SIZE, True)
    last = await stub.Members(pb.MembersRequest(object=obj, after=cids[2 * PAGE_SIZE - 1]))
    assert ([m.connection_id for m in last.members], last.more) == ([cids[-1]], False)


async def test_leave_all_removes_a_connection_everywhere_and_for_good(
    client: StateClient,
) -> None:
    a, b = new_ids(2)
    rooms = [ObjectMembers(client, "room", name) for name in ("r1", "r2", "r3")]
    for r in rooms:
        await r.accept(a, tags=["t"])
        await r.accept(b)
    assert await leave_all(client, a) == 3
    assert await leave_all(client, a) == 0
    for r in rooms:
        assert [m.id for m in await r.connections()] == [b]
        assert await r.connections(tag="t") == []
    # A late accept (a stale copy of an event, after the close) does not bring it back.
    await rooms[0].accept(a)
    assert [m.id for m in await rooms[0].connections()] == [b]


async def test_a_write_waits_for_a_transaction_holding_the_object(
    server: StateServer, room: ObjectMembers
) -> None:
    (a,) = new_ids(1)
    obj = ObjectId("room", "lobby")
    await server.locks.acquire(obj)  # as a transaction does from begin to commit
    try:
        join = asyncio.create_task(room.accept(a))

        async def waiting() -> bool:
            queue = server.locks._queues.get(obj)
            return queue is not None and len(queue.waiters) == 1

        await eventually(waiting, "the join to queue behind the hold", timeout_s=5)
        assert await room.connections() == []  # reads do not wait; the join did not happen
    finally:
        server.locks.release(obj)
    await join
    assert [m.id for m in await room.connections()] == [a]


# -- limits and refusals ------------------------------------------------------------------


async def test_ten_tags_pass_eleven_are_refused(room: ObjectMembers) -> None:
    a, b = new_ids(2)
    await room.accept(a, tags=[f"t{i}" for i in range(MAX_TAGS)])
    assert len((await room.connections())[0].tags) == 10
    with pytest.raises(TooManyTags) as caught:
        await room.accept(b, tags=[f"t{i}" for i in range(MAX_TAGS + 1)])
    assert (caught.value.size, caught.value.limit) == (11, 10)
    assert [m.id for m in await room.connections()] == [a]


async def test_a_tag_of_256_characters_passes_257_is_refused(room: ObjectMembers) -> None:
    a, b = new_ids(2)
    longest = "é" * MAX_TAG_CHARS  # characters, not bytes (this is 512 bytes of UTF-8)
    await room.accept(a, tags=[longest])
    assert [m.id for m in await room.connections(tag=longest)] == [a]
    with pytest.raises(TagTooLarge) as caught:
        await room.accept(b, tags=["ok", longest + "é"])
    assert (caught.value.size, caught.value.limit) == (257, 256)
    assert caught.value.key == ("é" * 257)[:64]
    with pytest.raises(TagTooLarge) as empty:
        await room.accept(b, tags=[""])
    assert (empty.value.size, empty.value.limit) == (0, 256)
    with pytest.raises(TagTooLarge):
        await room.connections(tag=longest + "é")  # a filter is checked the same way


async def test_an_attachment_of_16384_bytes_passes_16385_is_refused(room: ObjectMembers) -> None:
    a, b = new_ids(2)
    largest = attachment_of_size(MAX_ATTACHMENT_BYTES)
    await room.accept(a, attachment=largest)
    assert await room.attachment(a) == largest
    with pytest.raises(AttachmentTooLarge) as caught:
        await room.accept(b, attachment=attachment_of_size(MAX_ATTACHMENT_BYTES + 1))
    assert (caught.value.size, caught.value.limit) == (16385, 16384)
    with pytest.raises(AttachmentTooLarge):
        await room.set_attachment(a, attachment_of_size(MAX_ATTACHMENT_BYTES + 1))
    assert await room.attachment(a) == largest  # unchanged
    assert [m.id for m in await room.connections()] == [a]


@sqlite_only
async def test_bad_ids_and_values_are_refused_with_their_reason(
    stub: Any, client: StateClient
) -> None:
    (a,) = new_ids(1)
    obj = pb.ObjectId(namespace="room", name="lobby")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Join(pb.JoinRequest(object=obj, connection_id="not an id"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info_of(caught.value).reason == INVALID_CONNECTION_ID
    assert error_info_of(caught.value).key == "not an id"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Join(pb.JoinRequest(object=obj, connection_id=a, attachment=b"\xff\xff"))
    assert error_info_of(caught.value).reason == "INVALID_VALUE"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Join(pb.JoinRequest(object=pb.ObjectId(name="x"), connection_id=a))
    assert error_info_of(caught.value).reason == "INVALID_OBJECT_ID"
    # Through the SDK: the id is checked before any call; the rest come back typed.
    with pytest.raises(InvalidConnectionId):
        await ObjectMembers(client, "room", "lobby").accept("not an id")
    with pytest.raises(InvalidObjectId):
        await ObjectMembers(client, "", "lobby").accept(a)
    with pytest.raises(InvalidValue):
        await ObjectMembers(client, "room", "lobby").accept(a, attachment=object())
    with pytest.raises(StateError):
        await client.membership.leave_all(pb.LeaveAllRequest(connection_id="x"))
    with pytest.raises(TypeError):
        await ObjectMembers(client, "room", "lobby").accept(a, tags="admin")


# -- broadcast, with NATS subscribers as the gateways -------------------------------------


async def test_broadcast_sends_one_command_per_gateway(
    room: ObjectMembers, gateways: FakeGateways
) -> None:
    one, two = new_ids(300, "one"), new_ids(200, "two")
    await gather_bounded([room.accept(cid) for cid in one + two])
    result = await room.broadcast("hello")
    assert (result.recipients, result.commands) == (500, 2)
    # Broadcast returns once NATS has the commands; the subscriber gets them right after.
    await eventually(lambda: len(gateways.commands) >= 2, "the two commands", timeout_s=5)
    assert gateways.addressed() == {ids.gateway_of(one[0]): one, ids.gateway_of(two[0]): two}
    assert len(gateways.commands) == 2
    assert all(c.send == envelope.Message(text="hello") for _, c in gateways.commands)


async def test_broadcast_by_tag_and_with_exclusions(
    room: ObjectMembers, gateways: FakeGateways
) -> None:
    a, b, c = new_ids(3, "one")
    (d,) = new_ids(1, "two")
    await room.accept(a, tags=["red"])
    await room.accept(b, tags=["red", "blue"])
    await room.accept(c, tags=["blue"])
    await room.accept(d, tags=["red"])
    red = await room.broadcast(b"\x00bin", tag="red", exclude=[b])
    assert (red.recipients, red.commands) == (2, 2)
    await eventually(lambda: len(gateways.commands) == 2, "commands", timeout_s=5)
    assert sorted(cid for _, cmd in gateways.commands for cid in cmd.connection_ids) == [a, d]
    assert {cmd.send.binary for _, cmd in gateways.commands} == {b"\x00bin"}
    nobody = await room.broadcast("x", tag="green")
    assert (nobody.recipients, nobody.commands) == (0, 0)


async def test_broadcast_splits_a_gateway_list_only_over_the_payload_limit(
    room: ObjectMembers, gateways: FakeGateways, server: StateServer
) -> None:
    """The test NATS allows 8 MiB: a message near it leaves room for a few ids only."""
    cids = new_ids(40)
    await asyncio.gather(*(room.accept(cid) for cid in cids))
    nc = server._nc
    assert nc is not None
    id_bytes = len(envelope.GatewayCommand(connection_ids=cids).SerializeToString())
    budget = nc.max_payload - 4096
    # Sized so that all 40 ids fit exactly, then one byte more.
    fits = budget - id_bytes - 10
    while (
        envelope.GatewayCommand(
            connection_ids=cids, send=envelope.Message(binary=b"x" * fits)
        ).ByteSize()
        < budget
    ):
        fits += 1
    assert (await room.broadcast(b"x" * fits)).commands == 1
    assert (await room.broadcast(b"x" * (fits + 1))).commands == 2
    await eventually(lambda: len(gateways.commands) == 3, "commands", timeout_s=10)
    assert all(c.ByteSize() <= budget for _, c in gateways.commands)
    assert [cid for _, c in gateways.commands[1:] for cid in c.connection_ids] == cids


# -- leases -------------------------------------------------------------------------------


async def announce(bus: NatsClient, gateway_id: str, lease_ms: int, leaving: bool = False) -> None:
    presence = envelope.GatewayPresence(gateway_id=gateway_id, lease_ms=lease_ms, leaving=leaving)
    await bus.publish(subjects.presence_subject(PREFIX, gateway_id), presence.SerializeToString())
    await bus.flush()


async def test_a_gateway_whose_lease_runs_out_loses_its_members(
    server: StateServer, room: ObjectMembers, bus: NatsClient
) -> None:
    dead, alive, unheard = new_ids(3, "dead"), new_ids(2, "alive"), new_ids(1, "unheard")
    dead_gw, alive_gw = ids.gateway_of(dead[0]), ids.gateway_of(alive[0])
    monitor = membership_of(server).presence
    await announce(bus, dead_gw, lease_ms=300)
    await announce(bus, alive_gw, lease_ms=300)
    await eventually(lambda: monitor.stats.announcements >= 2, "announcements", timeout_s=5)
    other_room = ObjectMembers(room._state, "room", "other")
    await asyncio.gather(*(room.accept(cid) for cid in dead + alive + unheard))
    await other_room.accept(dead[0], tags=["t"])
    started = time.monotonic()

    async def dead_gone() -> bool:
        await announce(bus, alive_gw, lease_ms=300)  # the live gateway keeps renewing
        listed = {m.id for m in await room.connections()}
        return not listed & set(dead)

    await eventually(dead_gone, "the dead gateway's members to go", timeout_s=10)
    assert time.monotonic() - started < 5
    assert [m.id for m in await room.connections()] == sorted(alive + unheard)
    assert await other_room.connections() == []
    assert monitor.stats.members_swept == 4
    # A gateway never heard from is under its grace lease (30 s): untouched so far.
    assert unheard[0] in {m.id for m in await room.connections()}


async def test_a_leaving_gateway_loses_its_members_at_once(
    server: StateServer, room: ObjectMembers, bus: NatsClient
) -> None:
    leaving, staying = new_ids(2, "leaving"), new_ids(1, "staying")
    await asyncio.gather(*(room.accept(cid) for cid in leaving + staying))
    await announce(bus, ids.gateway_of(leaving[0]), lease_ms=60_000)
    await announce(bus, ids.gateway_of(leaving[0]), lease_ms=0, leaving=True)

    async def gone() -> bool:
        return [m.id for m in await room.connections()] == staying

    # Well inside the 60 s lease, and the 30 s grace of the gateway never heard from.
    await eventually(gone, "the leaving gateway's members to go", timeout_s=5)


@sqlite_only
async def test_garbage_on_the_presence_subject_is_counted_and_dropped(
    server: StateServer, bus: NatsClient, room: ObjectMembers
) -> None:
    monitor = membership_of(server).presence
    subject = subjects.presence_subject(PREFIX, "gw-abcdefgh")
    await bus.publish(subject, b"\xff\x00garbage")
    await bus.publish(
        subject, envelope.GatewayPresence(gateway_id="no!", lease_ms=1).SerializeToString()
    )
    await bus.publish(
        subject, envelope.GatewayPresence(gateway_id="gw-abcdefgh").SerializeToString()
    )
    await bus.flush()
    await eventually(lambda: monitor.stats.garbage == 3, "garbage", timeout_s=5)
    (a,) = new_ids(1)
    await room.accept(a)  # still serving
    assert [m.id for m in await room.connections()] == [a]


@sqlite_only
async def test_a_presence_for_another_gateway_is_dropped_and_counted(
    server: StateServer, room: ObjectMembers, bus: NatsClient
) -> None:
    """A presence names its gateway twice, in its subject (which NATS lets only that
    gateway's identity publish on) and in its payload: a ``leaving`` for gateway B sent on
    gateway A's subject evicts nobody and is counted; the same sent by B works."""
    victims, intruders = new_ids(2, "victim"), new_ids(1, "intruder")
    victim_gw, intruder_gw = ids.gateway_of(victims[0]), ids.gateway_of(intruders[0])
    monitor = membership_of(server).presence
    impostors = monitor.stats.impostors
    await asyncio.gather(*(room.accept(cid) for cid in victims + intruders))
    forged = envelope.GatewayPresence(gateway_id=victim_gw, leaving=True)
    await bus.publish(subjects.presence_subject(PREFIX, intruder_gw), forged.SerializeToString())
    await bus.flush()
    await eventually(lambda: monitor.stats.impostors == impostors + 1, "the impostor", timeout_s=5)
    sweeps = monitor.stats.sweeps
    await eventually(lambda: monitor.stats.sweeps >= sweeps + 2, "sweeps", timeout_s=5)
    assert not monitor.leases.is_leaving(victim_gw)
    assert {m.id for m in await room.connections()} >= set(victims)
    # The gateway itself may leave.
    await announce(bus, victim_gw, lease_ms=0, leaving=True)

    async def gone() -> bool:
        return not {m.id for m in await room.connections()} & set(victims)

    await eventually(gone, "the victim's own leaving", timeout_s=5)


async def test_members_stored_before_a_restart_get_a_grace_lease(
    backend: Backend, nats_server: Child
) -> None:
    config = state_config(backend, str(nats_server.info["url"]))
    (a,) = new_ids(1)
    async with StateServer(config) as first, StateClient(first.address) as client:
        await ObjectMembers(client, "room", "r").accept(a)
    async with StateServer(config) as second, StateClient(second.address) as client:
        leases = membership_of(second).presence.leases
        assert ids.gateway_of(a) in leases
        expires = leases.expires_at(ids.gateway_of(a))
        assert expires is not None
        assert expires > time.monotonic() + 20  # ~30 s of grace
        assert [m.id for m in await ObjectMembers(client, "room", "r").connections()] == [a]


async def test_leases_hold_while_the_state_service_is_cut_off_from_nats(
    backend: Backend, tmp_path: Path
) -> None:
    """Cut off from NATS, the state service hears nobody: no lease may run out then, and
    once NATS is back every gateway gets the grace period to be heard again."""
    first = start_nats_server(tmp_path / "nats1")
    url = str(first.info["url"])
    second: Child | None = None
    config = state_config(backend, url)
    try:
        async with StateServer(config) as server, StateClient(server.address) as client:
            monitor = membership_of(server).presence
            room = ObjectMembers(client, "room", "cut")
            cids = new_ids(2)
            gateway_id = ids.gateway_of(cids[0])
            bus = await nats.connect(url)
            await announce(bus, gateway_id, lease_ms=300)
            await bus.close()
            lease_end = time.monotonic() + 0.3
            await gather_bounded([room.accept(cid) for cid in cids])
            first.stop()  # the bus goes away
            nc = server._nc
            assert nc is not None
            await eventually(lambda: not nc.is_connected, "the disconnection", timeout_s=10)
            await eventually(lambda: time.monotonic() > lease_end, "the lease end", timeout_s=5)
            sweeps = monitor.stats.sweeps
            await eventually(lambda: monitor.stats.sweeps >= sweeps + 2, "sweeps", timeout_s=5)
            assert [m.id for m in await room.connections()] == cids  # held, not swept

            port = int(url.rsplit(":", 1)[1])
            second = start_nats_server(tmp_path / "nats2", port=port)
            await eventually(lambda: nc.is_connected, "reconnection", timeout_s=10)
            sweeps = monitor.stats.sweeps
            await eventually(lambda: monitor.stats.sweeps >= sweeps + 2, "sweeps", timeout_s=5)
            expires = monitor.leases.expires_at(gateway_id)
            assert expires is not None
            assert expires > time.monotonic() + 20  # the grace period, from the reconnection
            assert [m.id for m in await room.connections()] == cids
            assert monitor.stats.members_swept == 0
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_a_gateway_announces_itself_and_says_when_it_leaves(
    nats_server: Child, bus: NatsClient
) -> None:
    heard: list[envelope.GatewayPresence] = []

    async def on_presence(msg: Msg) -> None:
        heard.append(envelope.GatewayPresence.FromString(msg.data))

    await bus.subscribe(subjects.presence_subject(PREFIX, subjects.ANY), cb=on_presence)
    await bus.flush()
    config = GatewayConfig(nats_url=str(nats_server.info["url"]), port=0, presence_interval_s=0.05)
    gateway = Gateway(config)
    async with gateway:
        await eventually(lambda: len(heard) >= 3, "announcements", timeout_s=5)
    await eventually(lambda: heard[-1].leaving, "the leaving one", timeout_s=5)
    assert {p.gateway_id for p in heard} == {gateway.gateway_id}
    assert all(p.lease_ms == 250 for p in heard[:-1])
    assert [p.leaving for p in heard].count(True) == 1


def test_the_presence_interval_must_be_positive() -> None:
    from wsgate.errors import ConfigError

    GatewayConfig(presence_interval_s=0.001)
    with pytest.raises(ConfigError, match="presence_interval_s"):
        GatewayConfig(presence_interval_s=0)


# -- real processes -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_gateways(
    tmp_path_factory: pytest.TempPathFactory, module_backend: Backend
) -> Iterator[Stack]:
    """nats, state (on ``module_backend``'s database), one worker on tests.apps.members,
    and gateways with short leases: two, and a third that the kill test kills. All are
    started here, before any gRPC channel exists in this process: a child forked while one
    does aborts in gRPC's fork handler before it can exec."""
    for stack in stack_context(
        tmp_path_factory.mktemp("members"),
        app="tests.apps.members:app",
        gateway_args=("--presence-interval-s", "0.1"),
        state_args=tuple(module_backend.state_args()),
    ):
        stack.start_gateway("--presence-interval-s", "0.1")
        stack.start_gateway("--presence-interval-s", "0.1")  # VICTIM
        yield stack


#: The gateway that test_members_of_a_killed_gateway_leave kills.
VICTIM = 2


@pytest.fixture
async def state_of(two_gateways: Stack) -> AsyncIterator[StateClient]:
    assert two_gateways.state is not None
    async with StateClient(str(two_gateways.state.info["address"])) as client:
        yield client


async def connect(
    session: aiohttp.ClientSession, stack: Stack, path: str, gateway: int = 0
) -> tuple[aiohttp.ClientWebSocketResponse, str]:
    ws = await session.ws_connect(stack.ws_url(path, gateway=gateway))
    joined = (await ws.receive(timeout=10)).data
    assert joined.startswith("joined "), joined
    return ws, joined.split()[1]


async def test_a_closed_connection_leaves_every_object(
    two_gateways: Stack, state_of: StateClient
) -> None:
    r1, r2 = ObjectMembers(state_of, "room", "c1"), ObjectMembers(state_of, "room", "c2")
    async with aiohttp.ClientSession() as session:
        ws, cid = await connect(session, two_gateways, "/room/c1?also=c2&tags=x")
        other, other_id = await connect(session, two_gateways, "/room/c1", gateway=1)
        assert [m.id for m in await r1.connections(tag="x")] == [cid]
        assert [m.id for m in await r2.connections()] == [cid]
        await ws.close()

        async def left() -> bool:
            return [m.id for m in await r1.connections()] == [other_id] and (
                await r2.connections() == []
            )

        await eventually(left, "the closed connection to leave", timeout_s=10)
        await other.close()


async def test_handlers_list_read_and_replace_attachments(
    two_gateways: Stack, state_of: StateClient
) -> None:
    async with aiohttp.ClientSession() as session:
        ada, ada_id = await connect(session, two_gateways, "/room/att?name=ada&tags=a,b")
        bob, bob_id = await connect(session, two_gateways, "/room/att?name=bob", gateway=1)
        await ada.send_str("who")
        listed = json.loads((await ada.receive(timeout=10)).data.removeprefix("members "))
        assert sorted(map(tuple, [[i, tuple(t), a["name"]] for i, t, a in listed])) == sorted(
            [(ada_id, ("a", "b"), "ada"), (bob_id, (), "bob")]
        )
        await bob.send_str("rename robert")
        assert (await bob.receive(timeout=10)).data == "renamed"
        await bob.send_str("me")
        assert json.loads((await bob.receive(timeout=10)).data[3:]) == {"name": "robert"}
        await bob.send_str("leave")
        assert (await bob.receive(timeout=10)).data == "left true"
        await ada.send_str("who")
        listed = json.loads((await ada.receive(timeout=10)).data.removeprefix("members "))
        assert [entry[0] for entry in listed] == [ada_id]
        await ada.close()
        await bob.close()


async def test_broadcast_reaches_exactly_the_right_clients_over_two_gateways(
    two_gateways: Stack,
) -> None:
    async with aiohttp.ClientSession() as session:
        clients: dict[str, aiohttp.ClientWebSocketResponse] = {}
        tags = {"a": "red", "b": "red,blue", "c": "blue", "d": "red"}
        for i, (name, tag) in enumerate(tags.items()):
            clients[name], _ = await connect(
                session, two_gateways, f"/room/b?tags={tag}", gateway=i % 2
            )

        async def expect(senders_reply: str, sender: str, receivers: set[str], text: str) -> None:
            await clients[sender].send_str(senders_reply)
            for name in sorted(receivers):
                msg = await clients[name].receive(timeout=10)
                assert msg.data == text, (name, msg.data)
            assert (await clients[sender].receive(timeout=10)).data.startswith("sent ")

        await expect("tag red to-red", "c", {"a", "b", "d"}, "to-red")
        await expect("others not-a", "a", {"b", "c", "d"}, "not-a")
        await expect("all everyone", "d", {"a", "b", "c", "d"}, "everyone")
        await clients["b"].send_str("tag blue blue-only")
        assert (await clients["b"].receive(timeout=10)).data == "blue-only"
        assert (await clients["c"].receive(timeout=10)).data == "blue-only"
        assert (await clients["b"].receive(timeout=10)).data == "sent 2 2"
        await clients["a"].send_str("bytes raw")
        for name in "abcd":
            msg = await clients[name].receive(timeout=10)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.BINARY, b"raw"), name
        assert (await clients["a"].receive(timeout=10)).data == "sent 4 2"
        # Nobody got anything else: a final round trip on each socket comes back first.
        for name, ws in clients.items():
            await ws.send_str(f"unknown-{name}")
            assert (await ws.receive(timeout=10)).data == f"unknown unknown-{name}"
            await ws.close()


async def test_members_of_a_killed_gateway_leave(
    two_gateways: Stack, state_of: StateClient
) -> None:
    """``kill -9``: no close events; the gateway's lease (5 x 0.1 s) runs out instead."""
    victim_gateway = two_gateways.gateways[VICTIM]
    r = ObjectMembers(state_of, "room", "k")
    async with aiohttp.ClientSession() as session:
        survivor, survivor_id = await connect(session, two_gateways, "/room/k")
        doomed = [
            await connect(session, two_gateways, f"/room/k?also=k2&n={i}", gateway=VICTIM)
            for i in range(3)
        ]
        doomed_ids = {cid for _, cid in doomed}
        assert {m.id for m in await r.connections()} == doomed_ids | {survivor_id}
        killed_at = time.monotonic()
        two_gateways.kill(victim_gateway)

        async def swept() -> bool:
            return [m.id for m in await r.connections()] == [survivor_id]

        await eventually(swept, "the killed gateway's members to go", timeout_s=10)
        assert await ObjectMembers(state_of, "room", "k2").connections() == []
        metrics_url = f"http://127.0.0.1:{two_gateways.state_info('probe_port')}/metrics"
        # Three connections, each in two objects: six memberships swept, and counted.
        assert await metric(metrics_url, "wsgate_state_members_swept_total") >= 6
        assert await metric(metrics_url, "wsgate_state_gateways_swept_total") >= 1
        took = time.monotonic() - killed_at
        print(f"killed gateway's members gone after {took:.2f} s (lease 0.5 s)")
        await survivor.close()
        for ws, _ in doomed:
            await ws.close()


# -- the scale test -----------------------------------------------------------------------

SCALE = 10_000
#: Handshakes in flight at once (each is a connect request to the worker and a Join).
CONNECT_CONCURRENCY = 256


class Receiver(WSListener):
    """A picows client that counts the broadcasts it receives."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.booms = 0

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            text = frame.get_payload_as_ascii_text()
            if text == "boom":
                self.booms += 1
                self.tally.received(self.booms)
            else:
                self.tally.replies.append(text)
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()


class Tally:
    """Broadcasts received over all clients; ``done`` once every client has one."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.firsts = 0
        self.total = 0
        self.replies: list[str] = []
        self.done = asyncio.get_running_loop().create_future()

    def received(self, count_for_client: int) -> None:
        self.total += 1
        if count_for_client == 1:
            self.firsts += 1
            if self.firsts == self.expected and not self.done.done():
                self.done.set_result(None)


@pytest.fixture(scope="module")
def scale_stack(
    tmp_path_factory: pytest.TempPathFactory, module_backend: Backend
) -> Iterator[Stack]:
    """nats, state (on ``module_backend``'s database), one worker, two gateways; 10,000
    WebSockets will fit (5,000 each)."""
    # Every client is on 127.0.0.1: the per-address limit (256 by default) is off here.
    one_address = ("--max-connections-per-ip", "0")
    for stack in stack_context(
        tmp_path_factory.mktemp("scale"),
        app="tests.apps.members:app",
        state_args=tuple(module_backend.state_args()),
        gateway_args=one_address,
    ):
        stack.start_gateway(*one_address)
        yield stack


@pytest.mark.timeout(120)
async def test_ten_thousand_websockets_one_broadcast_one_command_per_gateway(
    scale_stack: Stack,
) -> None:
    """10,000 real WebSockets over 2 gateways are members of one object; one broadcast is
    exactly one command per gateway, addressing all 10,000, and each client gets it once."""
    raise_nofile_limit()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft >= SCALE + 256, f"RLIMIT_NOFILE {soft} is too low for {SCALE} sockets"
    stack = scale_stack
    tally = Tally(SCALE)
    gateway_ids = [str(g.info["gateway_id"]) for g in stack.gateways]
    commands: list[tuple[str, envelope.GatewayCommand]] = []

    async def on_command(msg: Msg) -> None:
        # The gateways' command subjects also carry the workers' final acks.
        for item in envelope.GatewayBatch.FromString(msg.data).items:
            if item.command.send.text == "boom":
                commands.append((msg.subject.rsplit(".", 1)[1], item.command))

    nc = await nats.connect(stack.nats_url)
    transports: list[WSTransport] = []
    try:
        await nc.subscribe(subjects.gateway_subject(PREFIX, subjects.ANY), cb=on_command)
        await nc.flush()
        slots = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def open_one(i: int) -> tuple[WSTransport, Receiver]:
            async with slots, asyncio.timeout(30):
                transport, receiver = await ws_connect(
                    lambda: Receiver(tally), stack.ws_url("/big", gateway=i % 2)
                )
                return transport, receiver

        started = time.monotonic()
        opened = await asyncio.gather(*(open_one(i) for i in range(SCALE)))
        transports = [t for t, _ in opened]
        connected_s = time.monotonic() - started
        assert stack.state is not None
        async with StateClient(str(stack.state.info["address"])) as state:
            everyone = ObjectMembers(state, "big", "all")
            member_ids = [m.id for m in await everyone.connections()]
            assert len(member_ids) == SCALE  # accepted in on_connect, before the 101

            sent_at = time.monotonic()
            transports[0].send(WSMsgType.TEXT, b"go")
            await asyncio.wait_for(tally.done, timeout=30)
            delivered_s = time.monotonic() - sent_at

            async def replied() -> bool:
                return bool(tally.replies)

            await eventually(replied, "the sender's reply", timeout_s=10)
            assert tally.replies == [f"sent {SCALE} 2"]
            assert tally.total == SCALE  # each client exactly once
            assert len(commands) == 2
            assert sorted(gw for gw, _ in commands) == sorted(gateway_ids)
            addressed = [cid for _, c in commands for cid in c.connection_ids]
            assert sorted(addressed) == sorted(member_ids)
            for gateway_id, command in commands:
                assert {ids.gateway_of(cid) for cid in command.connection_ids} == {gateway_id}

            closing_at = time.monotonic()
            for transport in transports:
                transport.send_close(WSCloseCode.OK)
                transport.disconnect()

            async def all_left() -> bool:
                page = await state.membership.members(
                    pb.MembersRequest(object=pb.ObjectId(namespace="big", name="all"), limit=1)
                )
                return not page.members

            await eventually(all_left, "all 10,000 to leave on close", timeout_s=60)
            left_s = time.monotonic() - closing_at
        print(
            f"\n{SCALE} websockets: opened and joined in {connected_s:.1f} s, broadcast "
            f"delivered to all in {delivered_s:.2f} s, all left after closing in {left_s:.1f} s"
        )
    finally:
        for transport in transports:
            if not transport.is_disconnected:
                transport.disconnect()
        await nc.close()
