"""Listing a namespace's objects across the state tier: 10,000 objects written through
their owners among three PostgreSQL replicas, listed whole and in order from any replica,
by ``wsgate objects list`` and by gRPC pages, with their usage; and the listing's errors."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.harness import Stack, eventually, metric
from wsgate.pgserver import PostgresServer
from wsgate.placement import Replica, object_key, owner_of
from wsgate.state_errors import exception_from_rpc_error
from wsgate.v1 import state_pb2 as pb
from wsgate.v1 import state_pb2_grpc
from wsgate.values import encode_value

pytestmark = pytest.mark.timeout(240)

NAMESPACE = "rooms"
OBJECTS = 10_000
REPLICAS = 3
_schemas = itertools.count(1)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer
) -> Iterator[Stack]:
    dsn = postgres_server.new_database_schema(f"listing{next(_schemas)}_{os.getpid()}")
    stack = Stack(tmp_path_factory.mktemp("listing"))
    try:
        stack.start_nats()
        for _ in range(REPLICAS):
            stack.start_replica(dsn)
        yield stack
    finally:
        stack.stop()
        stack.dump_logs()


def replicas(stack: Stack) -> list[Replica]:
    return [Replica(str(r.info["replica_id"]), str(r.info["address"])) for r in stack.replicas]


def name_of(n: int) -> str:
    return f"room-{n:05d}"


def value_of(n: int) -> bytes:
    """The stored (encoded) value of object ``n``'s one key: sizes vary."""
    return encode_value("v" * (n % 7))


async def write_through_owners(stack: Stack) -> None:
    """Every object gets one key, written by the replica that owns it (the others would
    refuse it with NOT_OWNER): 500 writes a call, the calls of each replica in parallel."""
    live = replicas(stack)

    async def agreed() -> bool:
        for child in stack.replicas:
            url = f"http://127.0.0.1:{child.info['probe_port']}/metrics"
            if await metric(url, "wsgate_state_replicas") != REPLICAS:
                return False
        return True

    await eventually(agreed, "every replica to see the others", timeout_s=20)
    by_owner: dict[str, list[pb.Write]] = {r.address: [] for r in live}
    for n in range(OBJECTS):
        owner = owner_of(object_key(NAMESPACE, name_of(n)), live)
        assert owner is not None
        by_owner[owner.address].append(
            pb.Write(
                put=pb.PutRequest(
                    object=pb.ObjectId(namespace=NAMESPACE, name=name_of(n)),
                    entries=[pb.Entry(key="k", value=value_of(n))],
                )
            )
        )
    assert all(by_owner.values()), "every replica owns some of the objects"

    async def write_at(address: str, writes: list[pb.Write]) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = state_pb2_grpc.StateStub(channel)
            for start in range(0, len(writes), 500):
                request = pb.WriteRequest(writes=writes[start : start + 500])
                async for response in stub.Write(request, timeout=60):
                    for result in response.results:
                        assert result.WhichOneof("outcome") == "count", result

    await asyncio.gather(*(write_at(a, w) for a, w in by_owner.items()))


def cli(stack: Stack, replica: int, *args: str) -> subprocess.CompletedProcess[str]:
    address = str(stack.replicas[replica].info["address"])
    return subprocess.run(
        [sys.executable, "-m", "wsgate", "objects", "list", *args, "--state-address", address],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_ten_thousand_objects_over_three_replicas_list_whole_from_any(
    stack: Stack,
) -> None:
    await write_through_owners(stack)
    expected = [name_of(n) for n in range(OBJECTS)]
    # The command, from one replica: every object once, in order, with its usage.
    listed = cli(stack, 0, NAMESPACE, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [row["name"] for row in rows] == expected
    for n, row in enumerate(rows):
        size = len("k") + len(value_of(n))
        assert (row["keys"], row["bytes"], row["members"]) == (1, size, 0), row
    # Plain lines, by prefix, from another replica.
    listed = cli(stack, 1, NAMESPACE, "--prefix", "room-012")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [name_of(n) for n in range(1200, 1300)]
    assert lines[0] == f"{name_of(1200)}\t0\t{1 + len(value_of(1200))}\t1"
    # gRPC pages of the largest size from the third: the same names, page after page.
    async with grpc.aio.insecure_channel(str(stack.replicas[2].info["address"])) as channel:
        stub = state_pb2_grpc.StateStub(channel)
        paged: list[str] = []
        after = ""
        while True:
            page = await stub.ListObjects(
                pb.ListObjectsRequest(namespace=NAMESPACE, after=after, limit=1000), timeout=30
            )
            paged += [summary.name for summary in page.objects]
            if not page.more:
                break
            after = paged[-1]
        assert paged == expected


async def test_a_listing_refuses_what_names_no_page(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(str(stack.replicas[0].info["address"])) as channel:
        stub = state_pb2_grpc.StateStub(channel)
        ok = await stub.ListObjects(pb.ListObjectsRequest(namespace="empty", limit=1000))
        assert (list(ok.objects), ok.more) == ([], False)
        for bad in (
            pb.ListObjectsRequest(namespace=""),
            pb.ListObjectsRequest(namespace=NAMESPACE, limit=1001),
            pb.ListObjectsRequest(namespace=NAMESPACE, prefix="x" * 100_000),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListObjects(bad, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad.limit
            assert exception_from_rpc_error(refused.value, "ListObjects") is not None


def test_the_command_says_why_it_fails(tmp_path: Path) -> None:
    """No state service at the address: exit status 1 and the reason, not a traceback."""
    done = subprocess.run(
        [
            sys.executable, "-m", "wsgate", "objects", "list", NAMESPACE,
            "--state-address", "127.0.0.1:9", "--state-timeout-s", "1",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("wsgate objects list: state service"), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "wsgate", "objects", "list"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert missing.returncode == 2
