"""At-least-once delivery and per-connection order, with workers that stall or die."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import aiohttp
import pytest

from tests.harness import Stack, eventually, metric, stack_context

pytestmark = pytest.mark.timeout(90)


def _collapse(items: list[str]) -> list[str]:
    """Drop repeats that follow each other: what at-least-once may add, order kept."""
    out: list[str] = []
    for item in items:
        if not out or out[-1] != item:
            out.append(item)
    return out


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_context(
        tmp_path_factory.mktemp("stall"),
        app="tests.apps.probe:app",
        workers=2,
        gateway_args=("--ack-timeout-s", "0.5"),
    )


async def test_a_stalled_worker_events_go_elsewhere_and_its_late_work_is_fenced(
    two_workers: Stack,
) -> None:
    stack = two_workers
    stalled, alive = stack.workers
    metrics_url = f"{stack.url}/metrics"
    redelivered_before = await metric(metrics_url, "wsgate_gateway_redeliveries_total")
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(stack.ws_url("/tagged"))
        os.kill(stalled.pid, signal.SIGSTOP)  # frozen: no acks, no progress, still subscribed
        try:
            async with ws:
                for i in range(20):
                    await ws.send_str(f"m{i}")
                replies = [(await ws.receive(timeout=30)).data.split("|") for _ in range(20)]
                assert [text for _, _, text in replies] == [f"m{i}" for i in range(20)]
                assert {int(pid) for pid, _, _ in replies} == {alive.pid}
                assert any(flag == "r" for _, flag, _ in replies), "nothing was redelivered"

                os.kill(stalled.pid, signal.SIGCONT)
                # The stalled worker now runs its copies of events that were acknowledged
                # meanwhile; what they send must be dropped, not interleaved.
                await eventually(
                    lambda: metric(metrics_url, "wsgate_gateway_drops_total", {"reason": "stale"}),
                    "a stale command to be fenced",
                )
                for i in range(20, 25):
                    await ws.send_str(f"m{i}")
                later = [(await ws.receive(timeout=30)).data.split("|")[2] for _ in range(5)]
                assert later == [f"m{i}" for i in range(20, 25)]
        finally:
            os.kill(stalled.pid, signal.SIGCONT)
    assert await metric(metrics_url, "wsgate_gateway_redeliveries_total") > redelivered_before


@pytest.fixture
def many(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """1 NATS, 2 gateways, 3 workers, the state service: all separate processes."""
    for stack in stack_context(
        tmp_path_factory.mktemp("many"),
        app="tests.apps.probe:app",
        workers=3,
        gateway_args=("--ack-timeout-s", "1"),
    ):
        stack.start_gateway("--ack-timeout-s", "1")
        yield stack


async def test_many_gateways_and_workers_lose_nothing_when_a_worker_is_killed(
    many: Stack,
) -> None:
    clients, per_client = 8, 40
    expected = {f"c{c}": [f"c{c}:{k}" for k in range(per_client)] for c in range(clients)}
    async with aiohttp.ClientSession() as session:
        sockets = []
        for c in range(clients):  # half on each gateway
            ws = await session.ws_connect(many.ws_url("/relay/room-1", gateway=c % 2))
            assert (await ws.receive(timeout=10)).data.startswith("joined ")
            sockets.append(ws)
        received: list[list[str]] = [[] for _ in sockets]

        async def read(i: int) -> None:
            total = clients * per_client
            while len(set(received[i])) < total:
                received[i].append((await sockets[i].receive(timeout=30)).data)

        async def write(c: int) -> None:
            for k in range(per_client):
                await sockets[c].send_str(f"c{c}:{k}")

        readers = [asyncio.create_task(read(i)) for i in range(clients)]
        await asyncio.gather(*(write(c) for c in range(clients)))
        while min(len(r) for r in received) < clients * per_client // 4:
            await asyncio.wait(readers, timeout=0.05)
        many.kill(many.workers[0])  # kill -9 in the middle of the stream
        await asyncio.gather(*readers)
        for ws in sockets:
            await ws.close()

    for i, got in enumerate(received):
        for sender, sent in expected.items():
            from_sender = [m for m in got if m.split(":")[0] == sender]
            assert _collapse(from_sender) == sent, f"client {i} from {sender}: {from_sender}"


async def test_one_message_to_many_is_one_command_per_gateway(many: Stack) -> None:
    async def commands() -> float:
        total = 0.0
        for i in range(len(many.workers)):
            total += await metric(many.worker_metrics_url(i), "wsgate_worker_commands_total")
        return total

    async with aiohttp.ClientSession() as session:
        members = []
        for c in range(4):
            ws = await session.ws_connect(many.ws_url("/relay/fanout", gateway=c % 2))
            assert (await ws.receive(timeout=10)).data.startswith("joined ")
            members.append(ws)
        before = await commands()
        await members[0].send_str("to everyone")
        for ws in members:
            assert (await ws.receive(timeout=10)).data == "to everyone"
        assert await commands() - before == 2  # 4 members on 2 gateways
        for ws in members:
            await ws.close()
