"""Durable objects' activations on real processes: one activation per object, turns in
order, fenced and exactly once (tests/apps/objects.py).

The naive counter is Cloudflare's: ``get``, then ``put``, no transaction. Clients check
what they see: every value answered once, the counter ending at exactly the number of
increments answered, no socket closed, whatever happens to the worker or the state service
underneath.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest

from tests.harness import Stack, eventually, metric, stack_context
from wsgate import ids, subjects
from wsgate.client import ClientClosed, connect
from wsgate.config import DEFAULT_APP_NAME, DEFAULT_PREFIX
from wsgate.procs import Child
from wsgate.v1 import envelope_pb2 as envelope

pytestmark = pytest.mark.timeout(120)

APP = "tests.apps.objects:app"
#: Short enough that failover fits in a test, long enough for 2 cores under load.
LEASE = ("--lease-s", "2")
ACK = ("--ack-timeout-s", "1")


@dataclass
class Run:
    """What the clients of a run saw: each answer with when it arrived (monotonic), and
    each client's values in the order it got them."""

    answers: list[tuple[float, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    per_client: list[list[int]] = field(default_factory=list)

    @property
    def values(self) -> list[int]:
        return [int(text.split("|")[0]) for _, text in self.answers]


async def increments(url: str, count: int, run: Run, message: str = "inc") -> None:
    """One client: ``count`` increments, each answered before the next is sent."""
    mine: list[int] = []
    run.per_client.append(mine)
    try:
        async with connect(url) as ws:
            for _ in range(count):
                await ws.send(message)
                answer = await ws.receive()
                assert isinstance(answer, str)
                run.answers.append((time.monotonic(), answer))
                mine.append(int(answer.split("|")[0]))
    except (ClientClosed, OSError, AssertionError) as exc:
        run.errors.append(repr(exc))


def load(stack: Stack, path: str, clients: int, each: int, run: Run) -> list[asyncio.Task[None]]:
    """``clients`` clients spread over the stack's gateways, ``each`` increments each."""
    gateways = len(stack.gateways)
    return [
        asyncio.create_task(increments(stack.ws_url(path, i % gateways), each, run))
        for i in range(clients)
    ]


async def answered(run: Run, at_least: int, timeout_s: float = 60) -> None:
    async def enough() -> bool:
        return len(run.answers) >= at_least

    await eventually(enough, f"{at_least} answers", timeout_s=timeout_s)


async def read_counter(stack: Stack, path: str) -> int:
    async with connect(stack.ws_url(path)) as ws:
        await ws.send("read")
        return int(await ws.receive())


def at_least(
    url: str, name: str, value: float, labels: dict[str, str] | None = None
) -> Callable[[], Awaitable[bool]]:
    """A condition for wait_until: the metric ``name`` at ``url`` reached ``value``."""

    async def reached() -> bool:
        return await metric(url, name, labels) >= value

    return reached


def at_most(url: str, name: str, value: float) -> Callable[[], Awaitable[bool]]:
    """A condition for wait_until: the metric ``name`` at ``url`` is down to ``value``."""

    async def reached() -> bool:
        return await metric(url, name) <= value

    return reached


def worker_of(stack: Stack, pid: int) -> Child:
    (child,) = [w for w in stack.workers if w.pid == pid]
    return child


def assert_exact(run: Run, total: int, final: int | None = None) -> None:
    """Every increment answered once, with a value nobody else got, each client's values
    growing (its increments ran in the order it sent them), and all counted."""
    assert run.errors == []
    assert sorted(run.values) == list(range(1, total + 1))
    for mine in run.per_client:
        assert mine == sorted(mine)
    if final is not None:
        assert final == total


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """nats, state, three workers (turns limited to 1 s) and two gateways."""
    for stack in stack_context(
        tmp_path_factory.mktemp("cluster"),
        app=APP,
        workers=3,
        gateway_args=ACK,
        state_args=LEASE,
        worker_args=("--turn-timeout-s", "1"),
    ):
        stack.start_gateway(*ACK)
        yield stack


def failover_stack(tmp_path: Path, *worker_args: str) -> Iterator[Stack]:
    """A stack of its own (the test kills or stops its workers): three workers, two
    gateways, short leases and ack waits."""
    stack = Stack(tmp_path)
    try:
        stack.start_nats()
        stack.start_state(None, *LEASE)
        for _ in range(3):
            stack.start_worker(APP, *worker_args)
        stack.start_gateway(*ACK)
        stack.start_gateway(*ACK)
        yield stack
    finally:
        stack.stop()
        stack.dump_logs()


# -- one activation, turns in order ----------------------------------------------------------


async def test_the_naive_counter_is_exact_across_gateways_and_workers(cluster: Stack) -> None:
    run = Run()
    await asyncio.gather(*load(cluster, "/naive/exact", 64, 100, run))
    assert_exact(run, 6400, await read_counter(cluster, "/naive/exact"))
    # One activation served them all: the other workers forwarded to it, or were skipped.
    activations = [await metric(cluster.worker_metrics_url(i), "wsgate_worker_activations")
                   for i in range(3)]  # fmt: skip
    assert sorted(activations)[-1] >= 1
    assert sum(a > 0 for a in activations) == 1
    # Group commit: the turns that ended while a commit was in flight went in the next one.
    calls = turns = 0.0
    for i in range(3):
        calls += await metric(cluster.worker_metrics_url(i), "wsgate_worker_commit_calls_total")
        turns += await metric(cluster.worker_metrics_url(i), "wsgate_worker_turns_committed_total")
    assert turns >= 6400
    assert turns / calls > 2


async def test_an_alarm_is_a_turn_between_the_increments(cluster: Stack) -> None:
    async with connect(cluster.ws_url("/store/alarmed")) as ws:
        await ws.send("alarm-in 50")
        assert await ws.receive() == "set"

        async def ran() -> bool:
            await ws.send("get alarm-ran")
            return await ws.receive() == "True"

        await eventually(ran, "the alarm's turn", timeout_s=20)


async def test_an_alarm_and_increments_do_not_lose_each_other(cluster: Stack) -> None:
    run = Run()
    tasks = load(cluster, "/naive/alarm-race", 8, 50, run)
    await answered(run, 100)
    async with connect(cluster.ws_url("/naive/alarm-race")) as ws:
        await ws.send("alarm")  # its turn increments once, between two others
        assert await ws.receive() == "alarm"
    await asyncio.gather(*tasks)
    assert run.errors == []
    assert len(set(run.values)) == 400

    async def counted() -> bool:
        return await read_counter(cluster, "/naive/alarm-race") == 401

    await eventually(counted, "400 increments and the alarm's", timeout_s=20)


async def test_writes_from_outside_an_active_object_are_refused(cluster: Stack) -> None:
    from wsgate.errors import ObjectActive
    from wsgate.worker.state_client import StateClient

    run = Run()
    await increments(cluster.ws_url("/naive/outside"), 3, run)
    async with StateClient(str(cluster.state_info("address"))) as state:
        storage = state.storage("Naive", "outside")
        assert await storage.get("count") == 3  # reads see what it committed
        with pytest.raises(ObjectActive) as refused:
            await storage.put("count", 0)
        assert refused.value.holder  # names the worker that holds it
    assert await read_counter(cluster, "/naive/outside") == 3


# -- failover -----------------------------------------------------------------------------


async def test_kill_9_of_the_activations_worker_loses_nothing(tmp_path: Path) -> None:
    for stack in failover_stack(tmp_path):
        run = Run()
        tasks = load(stack, "/tagged/killed", 64, 100, run)
        await answered(run, 1500)
        victim = worker_of(stack, int(run.answers[-1][1].split("|")[1]))
        stack.kill(victim)
        await asyncio.gather(*tasks)
        assert_exact(run, 6400)
        taken_over = {text.split("|")[1] for _, text in run.answers[-100:]}
        assert str(victim.pid) not in taken_over


async def test_a_stopped_worker_is_fenced_and_none_of_its_frames_arrive(tmp_path: Path) -> None:
    for stack in failover_stack(tmp_path):
        run = Run()
        tasks = load(stack, "/tagged/stopped", 64, 100, run)
        await answered(run, 1500)
        victim = worker_of(stack, int(run.answers[-1][1].split("|")[1]))
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            # Another worker takes the object over once the stopped one's lease runs out.
            await answered(run, len(run.answers) + 500)
        finally:
            os.kill(victim.pid, signal.SIGCONT)
        fenced = at_least(
            f"http://127.0.0.1:{victim.info['probe_port']}/metrics",
            "wsgate_worker_activations_fenced_total",
            1,
        )
        await eventually(fenced, "the stopped worker to learn it was fenced", timeout_s=20)
        await asyncio.gather(*tasks)
        # Woken up, it committed nothing (its epoch is stale) and released nothing: a frame
        # of its would carry a value another turn also computed (answered twice), or one
        # out of its client's order. Turns it committed before it stopped are answered
        # once, from their records, by the new host.
        assert_exact(run, 6400)


# -- exactly-once turns -------------------------------------------------------------------


async def test_a_turn_that_committed_is_replayed_not_run_again(tmp_path: Path) -> None:
    for stack in failover_stack(tmp_path, "--failpoints", "kill-after-commit=die-after-commit"):
        async with connect(stack.ws_url("/tagged/once")) as ws:
            await ws.send("inc")
            first = await ws.receive()
            assert isinstance(first, str)
            value, pid = first.split("|")
            assert value == "1"
            # Its holder commits the increment, then dies before anything leaves.
            await ws.send("die-after-commit")
            second = await ws.receive()
            assert isinstance(second, str)
            assert second == f"2|{pid}"  # the outcome recorded with the commit: its frame
            await ws.send("inc")
            third = await ws.receive()
            assert isinstance(third, str)
            assert third.split("|")[0] == "3"  # the increment happened once
            assert third.split("|")[1] != pid
        assert worker_of_gone(stack, int(pid))
        replays = [
            await metric(stack.worker_metrics_url(i), "wsgate_worker_turn_replays_total")
            for i in range(len(stack.workers))
        ]
        assert sum(replays) == 1


def worker_of_gone(stack: Stack, pid: int) -> bool:
    """The worker ``pid`` died (its failpoint killed it)."""
    for child in list(stack.workers):
        if child.pid == pid:
            assert child.process.wait(timeout=10) == -signal.SIGKILL
            stack.forget(child)
            return True
    return False


async def test_a_turn_that_did_not_commit_runs_again(tmp_path: Path) -> None:
    for stack in failover_stack(tmp_path):
        async with connect(stack.ws_url("/slow/again")) as ws:
            await ws.send("inc")
            # The turn holds its increment in memory and waits 2 s before it ends: kill
            # the worker running it, so that it never commits.
            stack.kill(await running_turn(stack))
            answer = await ws.receive(timeout=30)
        assert answer == "1"  # run again on the committed state, where the counter was 0


async def running_turn(stack: Stack) -> Child:
    """The worker with a request in flight (a turn running)."""
    found: list[Child] = []

    async def one_runs() -> bool:
        found.clear()
        for i, child in enumerate(stack.workers):
            if await metric(stack.worker_metrics_url(i), "wsgate_worker_in_flight") >= 1:
                found.append(child)
        return len(found) == 1

    await eventually(one_runs, "a worker running the turn", timeout_s=10)
    return found[0]


async def test_a_copy_of_a_released_turn_is_acked_and_sends_nothing_again(tmp_path: Path) -> None:
    """A gateway that gave up waiting for an ack resends the event; when the copy reaches
    the activation after the first one's turn was released, it gets the ack again, but
    what the turn sent to other connections is not sent twice."""
    for stack in stack_context(tmp_path, app="tests.apps.sdk:app"):
        nc = await nats.connect(stack.nats_url)
        try:
            async with (
                connect(stack.ws_url("/room/copies")) as poker,
                connect(stack.ws_url("/room/copies")) as peer,
            ):
                await poker.send("state")
                poker_id = json.loads(await poker.receive())["joined"]
                await peer.send("state")
                peer_id = json.loads(await peer.receive())["joined"]
                # Every final ack of the gateway, the first poke's and its copy's.
                acks = await nc.subscribe(
                    subjects.gateway_subject(DEFAULT_PREFIX, ids.gateway_of(poker_id))
                )
                await nc.flush()
                await poker.send("poke")  # the poker's event #2
                assert await poker.receive() == "poked"
                assert await peer.receive() == f"poked by {poker_id}"
                copy = envelope.ConnectionEvent(
                    connection_id=poker_id,
                    sequence=2,
                    path="/room/copies",
                    message=envelope.Message(text="poke"),
                    redelivered=True,
                )
                # As the gateway sends it: on its events subject, with its ack subject.
                gateway_id = ids.gateway_of(poker_id)
                await nc.publish(
                    subjects.events_subject(DEFAULT_PREFIX, DEFAULT_APP_NAME, gateway_id),
                    copy.SerializeToString(),
                    reply=subjects.ack_subject(DEFAULT_PREFIX, gateway_id, poker_id, 2),
                )
                seen = 0
                while seen < 2:
                    batch = envelope.GatewayBatch.FromString((await acks.next_msg(timeout=20)).data)
                    seen += sum(
                        1
                        for item in batch.items
                        if (item.ack.connection_id, item.ack.sequence) == (poker_id, 2)
                    )
                # A second "poked by" would have left before the copy's ack, so it would
                # come before the answer to this.
                await peer.send("state")
                assert await peer.receive() == json.dumps({"joined": peer_id})
                await poker.send("state")
                assert await poker.receive() == json.dumps({"joined": poker_id})
        finally:
            await nc.close()


# -- a state service restart -----------------------------------------------------------


async def test_a_state_service_restart_under_load_closes_no_socket(tmp_path: Path) -> None:
    for stack in stack_context(tmp_path, app=APP, workers=2):
        run = Run()
        tasks = load(stack, "/naive/restarted", 32, 100, run)
        await answered(run, 800)
        address = str(stack.state_info("address"))
        stack.kill(stack.state_child())
        # Within the gateways' delivery timeout (30 s): events wait, kept alive by the
        # workers' progress acks, and their turns commit once the service is back.
        stack.restart_state(address)
        await asyncio.gather(*tasks)
        assert_exact(run, 3200, await read_counter(stack, "/naive/restarted"))


# -- turns: the limit, and the output gate ---------------------------------------------------


async def test_a_turn_past_the_limit_is_cancelled_and_the_object_goes_on(cluster: Stack) -> None:
    async with (
        connect(cluster.ws_url("/where/limit")) as hung,
        connect(cluster.ws_url("/where/limit", gateway=1)) as next_one,
    ):
        await hung.send("hang")
        await next_one.send("after")  # queued behind the hung turn, on the same object
        with pytest.raises(ClientClosed) as closed:
            await hung.receive(timeout=20)
        assert closed.value.code == 1011
        answer = await next_one.receive(timeout=20)
        assert isinstance(answer, str)
        assert answer.endswith("|after")
    timeouts = [
        await metric(cluster.worker_metrics_url(i), "wsgate_worker_turn_timeouts_total")
        for i in range(3)
    ]
    assert sum(timeouts) >= 1


async def test_reads_see_the_turns_own_writes(cluster: Stack) -> None:
    async with connect(cluster.ws_url("/store/own")) as ws:
        for command, expected in (
            ("put k v", "v"),
            ("put-list p/ p/a p/b", "p/a,p/b"),
            ("delete-list p/ p/a", "True:p/b"),
            ("delete-list p/ p/a", "False:p/b"),
            ("get k", "v"),
        ):
            await ws.send(command)
            assert await ws.receive() == expected, command


async def test_delete_all_counts_what_the_object_held(cluster: Stack) -> None:
    from wsgate.worker.state_client import StateClient

    async with StateClient(str(cluster.state_info("address"))) as state:
        # Written before any activation: its cache knows none of these.
        await state.storage("Store", "cleared").put_many({"a": 1, "b": 2, "c": 3})
    async with connect(cluster.ws_url("/store/cleared")) as ws:
        for command, expected in (
            ("put d 4", "4"),
            ("clear", "4"),
            ("clear", "0"),
            ("get a", "-"),
            ("put-list p/ p/x", "p/x"),
        ):
            await ws.send(command)
            assert await ws.receive() == expected, command


async def test_reads_come_from_memory_after_the_first(cluster: Stack) -> None:
    async def reads(source: str) -> float:
        return sum(
            [
                await metric(cluster.worker_metrics_url(i), "wsgate_worker_storage_reads_total",
                             {"source": source})
                for i in range(3)
            ]
        )  # fmt: skip

    async with connect(cluster.ws_url("/store/memory")) as ws:
        await ws.send("get x")
        assert await ws.receive() == "-"
        before = (await reads("state"), await reads("memory"))
        for _ in range(5):
            await ws.send("get x")
            assert await ws.receive() == "-"  # known not to exist: not asked again
        assert await reads("state") == before[0]
        assert await reads("memory") == before[1] + 5


async def test_a_value_at_the_limit_is_stored_and_one_byte_over_is_refused(
    cluster: Stack,
) -> None:
    from wsgate.limits import MAX_VALUE_BYTES
    from wsgate.values import encode_value

    # The longest string whose encoded Value is exactly the limit (its length prefix grows).
    fits = next(
        n for n in range(MAX_VALUE_BYTES, 0, -1) if len(encode_value("x" * n)) <= MAX_VALUE_BYTES
    )
    assert len(encode_value("x" * fits)) == MAX_VALUE_BYTES
    async with connect(cluster.ws_url("/store/limits")) as ws:
        await ws.send(f"big {fits}")
        assert await ws.receive() == "stored"
        await ws.send(f"big {fits + 1}")
        assert await ws.receive() == "ValueTooLarge"


async def test_frames_wait_for_the_commit_but_the_next_turn_does_not(cluster: Stack) -> None:
    url = cluster.ws_url("/store/gated")
    async with connect(url) as writer, connect(url) as reader:
        await writer.send("put w 0")  # the object is active, its first commit done
        assert await writer.receive() == "0"
        ran = sum(
            [await metric(cluster.worker_metrics_url(i), "wsgate_worker_turns_total",
                          {"kind": "message", "outcome": "ok"})
             for i in range(3)]
        )  # fmt: skip
        state = cluster.state_child()
        os.kill(state.pid, signal.SIGSTOP)
        try:
            await writer.send("put w 1")
            await reader.send("get w")

            async def both_ran() -> bool:
                total = sum(
                    [await metric(cluster.worker_metrics_url(i), "wsgate_worker_turns_total",
                                  {"kind": "message", "outcome": "ok"})
                     for i in range(3)]
                )  # fmt: skip
                return total >= ran + 2

            # Both turns ran (the reader's saw the writer's write, in memory), though the
            # writer's commit cannot reach the stopped state service ...
            await eventually(both_ran, "both turns to run", timeout_s=10)
            # ... and neither frame left: they wait for their turns' commits.
            for ws in (writer, reader):
                with pytest.raises(TimeoutError):
                    await ws.receive(timeout=0.3)
        finally:
            os.kill(state.pid, signal.SIGCONT)
        assert await writer.receive(timeout=20) == "1"
        assert await reader.receive(timeout=20) == "1"


# -- hibernation ---------------------------------------------------------------------------


async def test_activations_are_bounded_and_evicted_when_idle(tmp_path: Path) -> None:
    args = ("--max-activations", "2", "--activation-idle-s", "1")
    for stack in stack_context(tmp_path, app=APP, worker_args=args):
        url = stack.worker_metrics_url(0)
        clients = [connect(stack.ws_url(f"/naive/h{i}")) for i in range(5)]
        sockets = [await client.__aenter__() for client in clients]
        try:
            for expected in ("1", "2"):
                for ws in sockets:
                    await ws.send("inc")
                    assert await ws.receive() == expected
                    assert await metric(url, "wsgate_worker_activations") <= 2
            evicted = {"reason": "capacity"}
            assert await metric(url, "wsgate_worker_activations_evicted_total", evicted) >= 8

            all_evicted = at_most(url, "wsgate_worker_activations", 0)
            await eventually(all_evicted, "idle activations to be evicted", timeout_s=15)
            # Their connections stayed open; the next event activates each object again.
            for ws in sockets:
                await ws.send("inc")
                assert await ws.receive() == "3"
        finally:
            for client in clients:
                await client.__aexit__(None, None, None)
