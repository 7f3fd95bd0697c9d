"""A real StateServer on 127.0.0.1, port 0, and a real StateClient: what a worker sees.

The server stores on each database in turn (the ``backend`` fixture: SQLite, PostgreSQL);
tests of the client alone (nothing listening, a silent or stuck peer) need no database."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.backends import Backend
from tests.harness import in_process_state_config, write_results
from wsgate.config import StateConfig
from wsgate.errors import (
    InvalidObjectId,
    InvalidValue,
    KeyTooLarge,
    StateTimeout,
    StateUnavailable,
    ValueTooLarge,
)
from wsgate.limits import MAX_KEY_BYTES, MAX_VALUE_BYTES
from wsgate.service import ServicePhase
from wsgate.state_errors import ERROR_INFO_KEY, Reason
from wsgate.stateservice.server import STATE_SERVICE_NAME, StateServer
from wsgate.v1 import state_pb2 as pb
from wsgate.v1 import state_pb2_grpc
from wsgate.values import encode_value
from wsgate.worker.object_storage import ObjectStorage
from wsgate.worker.state_client import StateClient

#: For a test whose calls never reach the database (refused before it, or not about it):
#: the state service on one backend is enough.
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


def state_config(backend: Backend, nats_url: str) -> StateConfig:
    """An in-process state service's config, on ``backend``'s database."""
    return in_process_state_config(backend.tmp_path, nats_url, **backend.state_settings())


@pytest.fixture
async def server(backend: Backend, nats_url: str) -> AsyncIterator[StateServer]:
    async with StateServer(state_config(backend, nats_url)) as server:
        yield server


@pytest.fixture
async def client(server: StateServer) -> AsyncIterator[StateClient]:
    async with StateClient(server.address) as client:
        yield client


@pytest.fixture
def room(client: StateClient) -> ObjectStorage:
    return client.storage("room", "lobby")


@pytest.fixture
async def stub(server: StateServer) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield state_pb2_grpc.StateStub(channel)


def error_info_of(err: grpc.aio.AioRpcError) -> pb.ErrorInfo:
    for key, value in err.trailing_metadata() or ():
        if key == ERROR_INFO_KEY:
            return pb.ErrorInfo.FromString(value)
    raise AssertionError(f"no {ERROR_INFO_KEY} in {err.trailing_metadata()!r}")


def bytes_encoding_to(size: int) -> bytes:
    """A bytes value whose encoded Value is exactly ``size`` bytes."""
    length = size
    while len(encode_value(b"x" * length)) > size:
        length -= 1
    value = b"x" * length
    assert len(encode_value(value)) == size
    return value


# -- values and operations ----------------------------------------------------------------


#: A value of every type the codec stores, with the edges of each.
VALUES: list[object] = [
    None,
    True,
    False,
    0,
    -(2**63),
    2**63 - 1,
    1.25,
    math.inf,
    "",
    "héllo \U0001f600",
    b"",
    b"\x00\xff",
    [],
    {},
    [1, "a", b"b", None, [2.5]],
    {"nested": {"list": [True, {"deep": b"bytes"}]}},
]


async def test_every_value_type_round_trips(room: ObjectStorage) -> None:
    # Each under a key of its own, all in one test: one state service (and database) for
    # all of them; every value that comes back different is reported.
    for i, value in enumerate(VALUES):
        await room.put(f"v{i}", value)
    wrong = []
    for i, value in enumerate(VALUES):
        stored = await room.get(f"v{i}")
        if stored != value or type(stored) is not type(value):
            wrong.append((value, stored))
    assert wrong == []


async def test_nan_round_trips(room: ObjectStorage) -> None:
    await room.put("key", math.nan)
    assert math.isnan(await room.get("key"))


async def test_get_of_a_missing_key_gives_the_default(room: ObjectStorage) -> None:
    assert await room.get("missing") is None
    assert await room.get("missing", 42) == 42


async def test_put_overwrites(room: ObjectStorage) -> None:
    await room.put("k", 1)
    await room.put("k", [2])
    assert await room.get("k") == [2]


async def test_delete(room: ObjectStorage) -> None:
    await room.put("k", "v")
    assert await room.delete("k") is True
    assert await room.get("k") is None
    assert await room.delete("k") is False


async def test_objects_are_independent(client: StateClient) -> None:
    a, b = client.storage("room", "a"), client.storage("room", "b")
    other_namespace = client.storage("counter", "a")
    await a.put("k", "in a")
    await b.put("k", "in b")
    assert await a.get("k") == "in a"
    assert await other_namespace.get("k") is None
    assert await b.list() == {"k": "in b"}


async def test_list(room: ObjectStorage) -> None:
    for key in ["b", "a", "é", "Z", "user:1", "user:2", "\U0001f600"]:
        await room.put(key, key.upper())
    listed = await room.list()
    assert list(listed) == ["Z", "a", "b", "user:1", "user:2", "é", "\U0001f600"]
    assert listed["é"] == "É"
    assert await room.list(prefix="user:") == {"user:1": "USER:1", "user:2": "USER:2"}
    assert list(await room.list(start="b", end="user:2")) == ["b", "user:1"]
    assert list(await room.list(reverse=True, limit=2)) == ["\U0001f600", "é"]
    assert list(await room.list(limit=1)) == ["Z"]
    assert await room.list(limit=0) == {}
    assert await room.list(start="b", end="b") == {}
    assert list(await room.list(limit=2**40)) == list(listed)


@sqlite_only
async def test_a_negative_limit_is_refused(room: ObjectStorage) -> None:
    with pytest.raises(ValueError, match="limit"):
        await room.list(limit=-1)


async def test_data_survives_a_restart_of_the_service(backend: Backend, nats_url: str) -> None:
    config = state_config(backend, nats_url)
    async with StateServer(config) as first, StateClient(first.address) as client:
        await client.storage("room", "lobby").put("k", {"kept": True})
    async with StateServer(config) as second, StateClient(second.address) as client:
        assert await client.storage("room", "lobby").get("k") == {"kept": True}


# -- limits and refusals -----------------------------------------------------------------


async def test_a_key_at_the_limit_is_accepted(room: ObjectStorage) -> None:
    ascii_key = "k" * MAX_KEY_BYTES
    accented_key = "é" * (MAX_KEY_BYTES // 2)  # two bytes each in UTF-8
    for key in (ascii_key, accented_key):
        await room.put(key, 1)
        assert await room.get(key) == 1
        assert await room.delete(key) is True


@sqlite_only
@pytest.mark.parametrize("key", ["k" * (MAX_KEY_BYTES + 1), "é" * (MAX_KEY_BYTES // 2) + "k"])
async def test_a_key_over_the_limit_is_refused_on_every_call(room: ObjectStorage, key: str) -> None:
    calls = [lambda: room.put(key, 1), lambda: room.get(key), lambda: room.delete(key)]
    for call in calls:
        with pytest.raises(KeyTooLarge) as info:
            await call()
        assert (info.value.size, info.value.limit) == (MAX_KEY_BYTES + 1, MAX_KEY_BYTES)
        assert info.value.key == key[:64]
        assert "2049" in str(info.value)
        assert "2048" in str(info.value)


async def test_a_value_at_the_limit_is_accepted(room: ObjectStorage) -> None:
    value = bytes_encoding_to(MAX_VALUE_BYTES)
    await room.put("big", value)
    assert await room.get("big") == value


@sqlite_only
async def test_a_value_one_byte_over_the_limit_is_refused(room: ObjectStorage) -> None:
    value = bytes_encoding_to(MAX_VALUE_BYTES + 1)
    with pytest.raises(ValueTooLarge) as info:
        await room.put("big", value)
    assert (info.value.size, info.value.limit) == (MAX_VALUE_BYTES + 1, MAX_VALUE_BYTES)
    assert info.value.key == "big"
    assert await room.get("big") is None


@sqlite_only
async def test_a_structured_value_over_the_limit_is_refused(room: ObjectStorage) -> None:
    value = {"items": ["x" * 1000] * 200}
    size = len(encode_value(value))
    with pytest.raises(ValueTooLarge) as info:
        await room.put("big", value)
    assert info.value.size == size


@sqlite_only
async def test_an_empty_namespace_is_refused(client: StateClient) -> None:
    nameless = client.storage("", "lobby")
    calls = [
        lambda: nameless.put("k", 1),
        lambda: nameless.get("k"),
        lambda: nameless.delete("k"),
        lambda: nameless.list(),
    ]
    for call in calls:
        with pytest.raises(InvalidObjectId, match="empty namespace"):
            await call()


async def test_an_unstorable_value_is_refused_before_any_call(
    tmp_path: Path, nats_url: str
) -> None:
    # Nothing listens here, so a call would raise StateUnavailable: InvalidValue proves
    # the client refused first. (The client alone: the server's database does not matter.)
    async with StateServer(in_process_state_config(tmp_path, nats_url)) as server:
        address = server.address
    async with StateClient(address) as client:
        with pytest.raises(InvalidValue) as info:
            await client.storage("room", "lobby").put("k", {"a": [1, 2, {3}]})
    assert info.value.path == "value['a'][2]"


@sqlite_only
async def test_refusals_carry_the_status_details_and_error_info(stub: Any) -> None:
    request = pb.GetRequest(
        object=pb.ObjectId(namespace="room", name="lobby"), keys=["k" * (MAX_KEY_BYTES + 1)]
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Get(request)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2049" in err.details()
    assert "2048" in err.details()
    assert error_info_of(err) == pb.ErrorInfo(
        reason=Reason.KEY_TOO_LARGE, size=2049, limit=2048, key="k" * 64
    )


async def test_a_bad_write_fails_alone_with_its_error_info(stub: Any, room: ObjectStorage) -> None:
    obj = pb.ObjectId(namespace="room", name="lobby")
    request = pb.WriteRequest(
        writes=[
            pb.Write(
                put=pb.PutRequest(object=obj, entries=[pb.Entry(key="a", value=encode_value(1))])
            ),
            pb.Write(put=pb.PutRequest(object=obj, entries=[pb.Entry(key="k" * 2049, value=b"")])),
            pb.Write(),
            pb.Write(delete=pb.DeleteRequest(object=obj, keys=["missing"])),
        ]
    )
    results = await write_results(stub, request)
    assert [r.WhichOneof("outcome") for r in results] == ["count", "failure", "failure", "count"]
    assert results[0].count == 1
    assert results[3].count == 0
    assert results[1].failure.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert results[1].failure.info == pb.ErrorInfo(
        reason=Reason.KEY_TOO_LARGE, size=2049, limit=2048, key="k" * 64
    )
    assert results[2].failure.info.reason == Reason.INVALID_REQUEST
    assert await room.list() == {"a": 1}


@sqlite_only
@pytest.mark.parametrize(
    "garbage", [b"", b"\xff\xff\xff", b"\x2a\x01\xff", b"\x3a\x02\x0a\x00"], ids=repr
)
async def test_a_raw_put_of_garbage_is_refused_and_harms_nothing(
    stub: Any, room: ObjectStorage, garbage: bytes
) -> None:
    await room.put("k", "before")
    await room.put("other", "untouched")
    entry = pb.Entry(key="k", value=garbage)
    put = pb.PutRequest(object=pb.ObjectId(namespace="room", name="lobby"), entries=[entry])
    (result,) = await write_results(stub, pb.WriteRequest(writes=[pb.Write(put=put)]))
    assert result.failure.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert result.failure.info.reason == Reason.INVALID_VALUE
    assert await room.list() == {"k": "before", "other": "untouched"}


# -- hostile requests (found by tests/integration/test_hostile_input.py's probes) ----------


@sqlite_only
@pytest.mark.parametrize(
    ("method", "kind"),
    [
        ("/wsgate.v1.State/Get", "unary"),
        ("/wsgate.v1.State/Write", "server stream"),
        ("/wsgate.v1.State/Transaction", "bidi stream"),
        ("/grpc.health.v1.Health/Check", "unary"),
    ],
)
async def test_a_request_that_does_not_parse_is_invalid_argument_not_internal(
    server: StateServer, room: ObjectStorage, method: str, kind: str
) -> None:
    # gRPC's own answer is INTERNAL, a server fault that clients may retry.
    async def call(channel: grpc.aio.Channel) -> None:
        garbage = b"\xff\xff"
        if kind == "unary":
            await channel.unary_unary(method)(garbage, timeout=5)
        elif kind == "server stream":
            _ = [r async for r in channel.unary_stream(method)(garbage, timeout=5)]
        else:
            _ = [r async for r in channel.stream_stream(method)(iter([garbage]), timeout=5)]

    async with grpc.aio.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(channel)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "does not parse" in (refused.value.details() or "")
    await room.put("k", "still served")
    assert await room.get("k") == "still served"


@pytest.fixture
async def activations(server: StateServer) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield state_pb2_grpc.ActivationsStub(channel)


@sqlite_only
async def test_turn_sequences_over_64_bit_signed_are_refused_not_an_error(
    activations: Any,
) -> None:
    # Sequences are stored as 64-bit signed integers: 2**63 raised OverflowError in the
    # storage thread, and the call ended UNKNOWN.
    obj = pb.ObjectId(namespace="ns", name="seq")
    granted = await activations.Activate(pb.ActivateRequest(object=obj, worker="w-abcdefgh"))

    async def commit(key: str, sequence: int) -> Any:
        turn = pb.Turn(key=key, sequence=sequence, record=True)
        objects = [pb.ObjectTurns(object=obj, epoch=granted.granted.epoch, turns=[turn])]
        response = await activations.CommitTurns(
            pb.CommitTurnsRequest(worker="w-abcdefgh", objects=objects)
        )
        return response.results[0]

    assert (await commit("at-limit", 2**63 - 1)).HasField("committed")
    for over in (2**63, 2**64 - 1):
        refused = (await commit(f"over-{over}", over)).refused
        assert refused.info.reason == Reason.INVALID_REQUEST
        assert not refused.fenced
        assert not refused.duplicate


@sqlite_only
async def test_releasing_an_epoch_no_lease_can_have_is_a_no_op(activations: Any) -> None:
    # Epochs over 2**63-1 cannot be stored: the release raised OverflowError (UNKNOWN).
    obj = pb.ObjectId(namespace="ns", name="epoch")
    granted = await activations.Activate(pb.ActivateRequest(object=obj, worker="w-abcdefgh"))
    for epoch in (2**63, 2**64 - 1):
        lease = pb.Lease(object=obj, epoch=epoch)
        await activations.Release(pb.ReleaseRequest(worker="w-abcdefgh", leases=[lease]))
    other = await activations.Activate(pb.ActivateRequest(object=obj, worker="w-bcdefghi"))
    assert other.held.worker == "w-abcdefgh"
    assert other.held.epoch == granted.granted.epoch


# -- health and lifecycle ----------------------------------------------------------------


@sqlite_only
@pytest.mark.parametrize("service", ["", STATE_SERVICE_NAME])
async def test_health_reports_serving(server: StateServer, service: str) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_turns_not_serving_when_closing(backend: Backend, nats_url: str) -> None:
    server = StateServer(state_config(backend, nats_url))
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=STATE_SERVICE_NAME)
        )
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        closing = asyncio.create_task(server.close())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        # The watch is a call in flight: ending it lets close finish without its grace.
        watch.cancel()
        await closing
    assert server.phase is ServicePhase.CLOSED


@sqlite_only
async def test_address_is_the_bound_port(server: StateServer) -> None:
    host, port = server.address.rsplit(":", 1)
    assert host == "127.0.0.1"
    assert int(port) == server.port > 0


async def test_close_is_idempotent(backend: Backend, nats_url: str) -> None:
    server = StateServer(state_config(backend, nats_url))
    await server.start()
    await asyncio.gather(server.close(), server.close())
    await server.close()
    await server.wait_closed()
    assert server.phase is ServicePhase.CLOSED


@sqlite_only
async def test_start_twice_is_an_error(server: StateServer) -> None:
    with pytest.raises(RuntimeError):
        await server.start()


@sqlite_only
async def test_a_taken_port_fails_start(server: StateServer, tmp_path: Path, nats_url: str) -> None:
    config = StateConfig(
        host="127.0.0.1",
        port=server.port,
        probe_port=0,
        db_path=tmp_path / "other.sqlite3",
        nats_url=nats_url,
    )
    second = StateServer(config)
    with pytest.raises(OSError, match="cannot listen"):
        await second.start()
    assert second.phase is ServicePhase.CLOSED


# -- what the client sees when the service is not there ------------------------------------


async def test_a_closed_port_raises_state_unavailable(tmp_path: Path, nats_url: str) -> None:
    # The client alone, once the server is gone: its database does not matter.
    async with StateServer(in_process_state_config(tmp_path, nats_url)) as server:
        address = server.address
    # Calls wait for the service (a restart) up to their deadline, then give up.
    async with StateClient(address, timeout_s=0.5) as client:
        room = client.storage("room", "lobby")
        with pytest.raises(StateUnavailable, match="unreachable"):
            await room.get("k")
        with pytest.raises(StateUnavailable, match="unreachable"):
            await room.put("k", 1)


async def test_a_listener_that_never_speaks_grpc_is_unreachable() -> None:
    # A TCP listener that never speaks HTTP/2: the channel never gets ready.
    connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections[task] = writer
        await reader.read()

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with StateClient(f"127.0.0.1:{port}", timeout_s=0.2) as client:
            with pytest.raises(StateUnavailable, match="unreachable"):
                await client.storage("room", "lobby").get("k")
    finally:
        listener.close()
        # gRPC may keep its socket after the channel closed; close our end of it.
        for writer in connections.values():
            writer.close()
        await asyncio.gather(*connections)
        await listener.wait_closed()


class _NeverAnswers(state_pb2_grpc.StateServicer):
    def __init__(self) -> None:
        self.called = asyncio.Event()

    async def Get(self, request: pb.GetRequest, context: Any) -> pb.GetResponse:
        self.called.set()
        await asyncio.Event().wait()  # until the call is cancelled by its deadline
        raise AssertionError("unreachable")


async def test_a_service_that_does_not_answer_raises_state_timeout() -> None:
    server = grpc.aio.server()
    servicer = _NeverAnswers()
    state_pb2_grpc.add_StateServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with StateClient(f"127.0.0.1:{port}", timeout_s=0.3) as client:
            with pytest.raises(StateTimeout, match="in time"):
                await client.storage("room", "lobby").get("k")
        assert servicer.called.is_set()
    finally:
        await server.stop(0)


@sqlite_only
async def test_calls_after_close_are_an_error(server: StateServer) -> None:
    client = StateClient(server.address)
    await client.start()
    await client.close()
    await client.close()
    with pytest.raises(RuntimeError, match="closed"):
        await client.storage("room", "lobby").get("k")


def test_round_trip_under_uvloop(backend: Backend, nats_url: str) -> None:
    # The CLI may run the state role (and workers) on uvloop; grpc.aio must work there too.
    uvloop = pytest.importorskip("uvloop")

    async def round_trip() -> tuple[object, str]:
        async with (
            StateServer(state_config(backend, nats_url)) as server,
            StateClient(server.address) as client,
        ):
            room = client.storage("room", "lobby")
            await room.put("k", {"v": [1, b"2", "3"]})
            with pytest.raises(KeyTooLarge):
                await room.put("k" * (MAX_KEY_BYTES + 1), 1)
            return await room.get("k"), type(asyncio.get_running_loop()).__module__

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        value, loop_module = runner.run(round_trip())
    assert value == {"v": [1, b"2", "3"]}
    assert loop_module.startswith("uvloop")


async def test_http_probes_and_storage_metrics(server: StateServer, room: ObjectStorage) -> None:
    import aiohttp

    from tests.harness import metric

    base = f"http://127.0.0.1:{server.probe_port}"
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/readyz"):
            async with session.get(base + path) as response:
                assert response.status == 200, path
    commits = await metric(f"{base}/metrics", "wsgate_state_commits_total")
    writes = await metric(f"{base}/metrics", "wsgate_state_writes_total")
    await asyncio.gather(*(room.put(f"k{i}", i) for i in range(50)))
    assert await metric(f"{base}/metrics", "wsgate_state_writes_total") == writes + 50
    assert commits < await metric(f"{base}/metrics", "wsgate_state_commits_total") <= commits + 50
