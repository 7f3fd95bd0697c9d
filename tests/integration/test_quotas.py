"""The state service's quotas from outside: object names at the limit and one byte over on
every service that names an object, quota refusals typed at the client and counted in
/metrics, the free-disk threshold measured on the real filesystem, and, through a whole
stack, the refusals reaching handler code (tests/apps/quotas.py).

Storage at each quota on both databases is tests/unit/stateservice/test_quotas_storage.py;
here the state service runs on SQLite.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from tests.harness import Stack, eventually, in_process_state_config, metric, stack_context
from wsgate.client import UpgradeRefused, connect
from wsgate.errors import (
    ObjectNameTooLong,
    ObjectTooLarge,
    StorageFull,
    TooManyMembers,
    TooManyObjectKeys,
)
from wsgate.state_errors import ERROR_INFO_KEY, Reason
from wsgate.stateservice.disk import DiskGuard
from wsgate.stateservice.server import StateServer
from wsgate.v1 import state_pb2 as pb
from wsgate.v1 import state_pb2_grpc
from wsgate.worker.membership import ObjectMembers
from wsgate.worker.state_client import StateClient

pytestmark = pytest.mark.timeout(90)

#: The quotas of the in-process state service: tiny, so tests reach them in a few writes.
NAME_BYTES, KEYS, BYTES, MEMBERS = 16, 3, 64, 2
#: A gateway id, for connection ids of members.
GATEWAY = "gw-aaaaaaaa"


@pytest.fixture
async def server(tmp_path: Path, nats_url: str) -> AsyncIterator[StateServer]:
    config = in_process_state_config(
        tmp_path,
        nats_url,
        max_object_name_bytes=NAME_BYTES,
        max_keys_per_object=KEYS,
        max_object_bytes=BYTES,
        max_members_per_object=MEMBERS,
    )
    async with StateServer(config) as server:
        yield server


def refusal(err: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
    for key, value in err.trailing_metadata() or ():
        if key == ERROR_INFO_KEY:
            return err.code(), pb.ErrorInfo.FromString(value).reason
    return err.code(), ""


async def test_object_names_at_the_limit_pass_and_one_byte_longer_are_refused(
    server: StateServer,
) -> None:
    """Every service that names an object: storage, membership, alarms, leases, commits.
    The limit is in bytes of UTF-8 (é is two), for the namespace and the name each."""
    at_limit = "é" * (NAME_BYTES // 2)
    over = at_limit + "x"
    async with grpc.aio.insecure_channel(server.address) as channel:
        state = state_pb2_grpc.StateStub(channel)
        members = state_pb2_grpc.MembershipStub(channel)
        alarms = state_pb2_grpc.AlarmsStub(channel)
        activations = state_pb2_grpc.ActivationsStub(channel)
        calls: dict[str, Any] = {
            "get": lambda o: state.Get(pb.GetRequest(object=o, keys=["k"])),
            "usage": lambda o: state.Usage(pb.UsageRequest(object=o)),
            "join": lambda o: members.Join(pb.JoinRequest(object=o, connection_id=f"{GATEWAY}_1")),
            "alarm": lambda o: alarms.SetAlarm(pb.SetAlarmRequest(object=o, at_ms=2**40)),
            "activate": lambda o: activations.Activate(pb.ActivateRequest(object=o, worker="w")),
        }
        for what, call in calls.items():
            await call(pb.ObjectId(namespace=what, name=at_limit))
            await call(pb.ObjectId(namespace=at_limit, name=what))
            for namespace, name in ((what, over), (over, what)):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call(pb.ObjectId(namespace=namespace, name=name))
                assert refusal(refused.value) == (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    Reason.OBJECT_NAME_TOO_LONG,
                ), what
        # Writes and commits answer per write and per object.
        put = pb.Write(
            put=pb.PutRequest(
                object=pb.ObjectId(namespace="w", name=over),
                entries=[pb.Entry(key="k", value=b"\x08\x01")],
            )
        )
        (response,) = [r async for r in state.Write(pb.WriteRequest(writes=[put]))]
        assert response.results[0].failure.info.reason == Reason.OBJECT_NAME_TOO_LONG
        commit = pb.CommitTurnsRequest(
            worker="w", objects=[pb.ObjectTurns(object=pb.ObjectId(namespace="c", name=over))]
        )
        result = (await activations.CommitTurns(commit)).results[0]
        assert result.refused.info.reason == Reason.OBJECT_NAME_TOO_LONG
    # The client raises the typed exception.
    async with StateClient(server.address) as client:
        with pytest.raises(ObjectNameTooLong) as typed:
            await client.storage("ns", over).get("k")
    assert (typed.value.size, typed.value.limit) == (NAME_BYTES + 1, NAME_BYTES)
    probe = f"http://127.0.0.1:{server.probe_port}/metrics"
    counted = await metric(probe, "wsgate_state_quota_refusals_total", {"quota": "object_name"})
    assert counted == 2 * len(calls) + 3


async def test_quota_refusals_reach_the_client_typed_and_are_counted(server: StateServer) -> None:
    async with StateClient(server.address) as client:
        room = client.storage("quota", "keys")
        await room.put_many({f"k{i}": i for i in range(KEYS)})
        with pytest.raises(TooManyObjectKeys) as keys:
            await room.put("one-more", 1)
        assert (keys.value.size, keys.value.limit) == (KEYS + 1, KEYS)
        await room.delete("k0")  # deletes always pass, and free a key
        await room.put("one-more", 1)

        big = client.storage("quota", "bytes")
        await big.put("k", "v" * 40)

        async def grow(txn: Any) -> None:
            txn.put("j", "v" * 40)

        with pytest.raises(ObjectTooLarge):
            await big.transaction(grow)
        assert await big.list() == {"k": "v" * 40}  # the transaction applied nothing

        members = ObjectMembers(client, "quota", "members")
        for i in range(MEMBERS):
            await members.accept(f"{GATEWAY}_{i}")
        with pytest.raises(TooManyMembers) as full:
            await members.accept(f"{GATEWAY}_9")
        assert (full.value.size, full.value.limit, full.value.key) == (3, 2, f"{GATEWAY}_9")
        usage = await client.kv.usage(
            pb.UsageRequest(object=pb.ObjectId(namespace="quota", name="keys"))
        )
        assert (usage.usage.keys, usage.usage.members) == (KEYS, 0)
    probe = f"http://127.0.0.1:{server.probe_port}/metrics"
    for quota in ("keys", "bytes", "members"):
        assert await metric(probe, "wsgate_state_quota_refusals_total", {"quota": quota}) == 1


# -- the disk threshold -----------------------------------------------------------------------

#: How far from the measured free space the threshold is set, and the fill moves it: far
#: above what other processes write meanwhile, each side re-measured to prove it.
MARGIN = 64 * 1024 * 1024


def fill(path: Path, size: int) -> None:
    """Take ``size`` bytes of the filesystem at once (allocated, nothing written)."""
    with open(path, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, size)


async def test_below_the_disk_threshold_writes_are_refused_and_not_ready_until_space_returns(
    tmp_path: Path, nats_url: str
) -> None:
    guard = DiskGuard(tmp_path / "state.sqlite3", 1)
    threshold = guard.free_bytes() - MARGIN  # just below the free space: writes pass
    config = in_process_state_config(tmp_path, nats_url, min_free_disk_bytes=threshold)
    filler = tmp_path / "filler"
    async with (
        StateServer(config) as server,
        StateClient(server.address) as client,
        aiohttp.ClientSession() as http,
    ):
        probe = f"http://127.0.0.1:{server.probe_port}"
        room = client.storage("disk", "room")

        async def readyz() -> tuple[int, str]:
            async with http.get(f"{probe}/readyz") as resp:
                return resp.status, await resp.text()

        await room.put("before", 1)
        assert (await readyz())[0] == 200
        assert guard.free_bytes() >= threshold, "the free space moved past the margin"

        # Take the free space to just under the threshold (the SQLite file's filesystem).
        fill(filler, guard.free_bytes() - threshold + MARGIN)
        assert guard.free_bytes() < threshold, "the free space moved past the margin"
        with pytest.raises(StorageFull) as refused:
            await room.put("during", 1)
        assert refused.value.threshold_bytes == threshold
        assert refused.value.free_bytes < threshold
        status, body = await readyz()
        assert (status, "disk low" in body) == (503, True), body
        # Reads are served; deletes pass (they free space).
        assert await room.get("before") == 1
        assert await room.delete("before") is True
        assert (
            await metric(f"{probe}/metrics", "wsgate_state_quota_refusals_total", {"quota": "disk"})
            == 1
        )
        assert 0 < await metric(f"{probe}/metrics", "wsgate_state_disk_free_bytes") < threshold
        assert guard.free_bytes() < threshold, "the free space moved past the margin"

        # Space returns: writes pass again, ready again, with nothing to do.
        filler.unlink()
        assert guard.free_bytes() >= threshold, "the free space moved past the margin"
        await room.put("after", 1)
        assert (await readyz())[0] == 200
    assert threshold > 0


# -- through a worker: what handlers see -----------------------------------------------------

STACK_QUOTAS = (
    "--max-object-name-bytes", "64",
    "--max-keys-per-object", "5",
    "--max-object-bytes", "400",
    "--max-members-per-object", "2",
)  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_context(
        tmp_path_factory.mktemp("quotas"), app="tests.apps.quotas:app", state_args=STACK_QUOTAS
    )


async def ask(stack: Stack, path: str, *messages: str) -> list[str]:
    answers = []
    async with connect(stack.ws_url(path)) as ws:
        for message in messages:
            await ws.send(message)
            answer = await ws.receive()
            assert isinstance(answer, str)
            answers.append(answer)
    return answers


async def test_a_durable_object_that_puts_until_the_quota_sees_it_raised(stack: Stack) -> None:
    # 5 keys of 17 bytes fit the key quota; the 6th key is refused, nothing else stored,
    # and the object's next turn goes on.
    assert await ask(stack, "/fill/keys", "fill 10", "count") == [
        "5|TooManyObjectKeys|6|5",
        "5",
    ]
    # Values of ~100 bytes reach the byte quota first: 3 fit in 400 bytes, the 4th not.
    (answer,) = await ask(stack, "/fill/bytes", "fill 100")
    put, name, size, limit = answer.split("|")
    assert (put, name, limit) == ("3", "ObjectTooLarge", "400")
    assert int(size) > 400
    # A function route writing through the state service gets the same typed refusal.
    assert await ask(stack, "/remote/r", "10") == ["5|TooManyObjectKeys|6|5"]
    refusals = "wsgate_worker_quota_refusals_total"
    assert await metric(stack.worker_metrics_url(), refusals, {"quota": "bytes"}) >= 1


async def test_a_fresh_activation_counts_exactly_near_the_quota(stack: Stack) -> None:
    """Keys stored before the object's activation are unknown to its memory: at the quota,
    overwriting one is allowed (the count is settled with the state service), a new key is
    refused."""
    async with StateClient(str(stack.state_info("address"))) as client:
        await client.storage("Filler", "settled").put_many({f"k{i:04}": "v" for i in range(5)})
    assert await ask(stack, "/fill/settled", "overwrite", "fill 10", "count") == [
        "ok",
        "5|TooManyObjectKeys|6|5",
        "5",
    ]


async def test_an_uncaught_refusal_fails_only_its_turn(stack: Stack) -> None:
    async with connect(stack.ws_url("/fill/uncaught")) as ws:
        await ws.send("over 500")
        assert await ws.receive() == "sent before the refusal"
        # As any exception in a handler: the connection ends with 1011; nothing stored.
        closed = await ws.wait_closed()
        assert closed.code == 1011
    assert await ask(stack, "/fill/uncaught", "count") == ["0"]


async def test_connects_beyond_the_member_quota_are_refused_with_503(stack: Stack) -> None:
    first = await connect(stack.ws_url("/fill/room"))
    second = await connect(stack.ws_url("/fill/room"))
    with pytest.raises(UpgradeRefused) as refused:
        await connect(stack.ws_url("/fill/room"))
    assert refused.value.status == 503
    assert "connection count is 3 connections, over the limit of 2" in refused.value.body
    await first.close()

    async def admitted() -> Any:
        try:
            return await connect(stack.ws_url("/fill/room"))
        except UpgradeRefused:
            return None  # the close has not reached the object yet

    third = await eventually(admitted, "a place freed by a close")
    for ws in (second, third):
        await ws.close()


async def test_an_object_name_over_the_limit_is_refused_at_the_upgrade(stack: Stack) -> None:
    assert await ask(stack, f"/fill/{'n' * 64}", "count") == ["0"]
    with pytest.raises(UpgradeRefused) as refused:
        await connect(stack.ws_url(f"/fill/{'n' * 65}"))
    assert refused.value.status == 414
    assert "65 bytes, over the limit of 64" in refused.value.body
    refusals = "wsgate_worker_quota_refusals_total"
    assert await metric(stack.worker_metrics_url(), refusals, {"quota": "object_name"}) == 1
