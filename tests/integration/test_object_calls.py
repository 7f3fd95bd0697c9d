"""Calls of durable objects' methods (RPC) on real processes (tests/apps/calls.py): each
call one turn of the object's activation, in order with its other events, with its
storage; typed errors; cycles refused, never a deadlock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import nats
import pytest
import pytest_asyncio

from tests.harness import Stack, eventually, stack_context
from wsgate import (
    CallFailed,
    CallTimeout,
    CallTooLarge,
    CallUnavailable,
    InvalidCall,
    NoSuchMethod,
    ObjectNamespace,
)
from wsgate.calls import MAX_CALL_BYTES, MAX_CALL_DEPTH, encode_arguments, value_result
from wsgate.client import connect
from wsgate.config import DEFAULT_PREFIX
from wsgate.values import encode_value
from wsgate.worker.object_calls import ObjectCalls

pytestmark = pytest.mark.timeout(120)

APP = "tests.apps.calls:app"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """nats, state, two workers (turns limited to 3 s) and one gateway."""
    yield from stack_context(
        tmp_path_factory.mktemp("calls"),
        app=APP,
        workers=2,
        worker_args=("--turn-timeout-s", "3"),
    )


@pytest_asyncio.fixture
async def calls(stack: Stack) -> AsyncIterator[ObjectCalls]:
    """A caller of its own on the stack's NATS (as the server API is)."""
    nc = await nats.connect(stack.nats_url)
    try:
        yield ObjectCalls(nc, DEFAULT_PREFIX, timeout_s=20)
    finally:
        await nc.close()


async def test_concurrent_get_then_put_calls_lose_no_update(calls: ObjectCalls) -> None:
    """The naive counter, called 200 times at once through two workers: every call one
    turn, none interleaved, so every value is answered exactly once."""
    room = ObjectNamespace(calls, "Counter").get("concurrent")
    values = await asyncio.gather(*(room.call("add") for _ in range(200)))
    assert sorted(values) == list(range(1, 201))  # type: ignore[type-var]
    assert await room.call("read") == 200


async def test_arguments_and_results_travel_as_values(calls: ObjectCalls) -> None:
    room = ObjectNamespace(calls, "Counter").get("values")
    got = await room.echo(1, "two", b"\x00three", [4.5, None], flag=True, nested={"a": [1]})
    assert got == {
        "args": [1, "two", b"\x00three", [4.5, None]],
        "kwargs": {"flag": True, "nested": {"a": [1]}},
    }
    assert await room.call("add", n=5) == 5


async def test_calls_and_connection_events_are_turns_in_one_order(
    stack: Stack, calls: ObjectCalls
) -> None:
    """A connection's increments and calls' increments of one object: one sequence."""
    room = ObjectNamespace(calls, "Counter").get("mixed")
    seen: list[int] = []

    async def by_socket() -> None:
        async with connect(stack.ws_url("/counter/mixed")) as ws:
            for _ in range(50):
                await ws.send("add")
                seen.append(int(await ws.receive()))

    async def by_calls() -> None:
        for _ in range(50):
            seen.append(int(await room.call("add")))  # type: ignore[arg-type]

    await asyncio.gather(by_socket(), by_calls(), by_calls())
    assert sorted(seen) == list(range(1, 151))


async def test_a_function_route_calls_an_object(stack: Stack, calls: ObjectCalls) -> None:
    async with connect(stack.ws_url("/call/from-route")) as ws:
        await ws.send("abc")
        assert await ws.receive() == "3"
        await ws.send("abcd")
        assert await ws.receive() == "7"
    assert await ObjectNamespace(calls, "Counter").get("from-route").call("read") == 7


async def test_an_alarm_calls_an_object(calls: ObjectCalls) -> None:
    """An object's alarm (a turn of its own) calls another object's method."""
    await ObjectNamespace(calls, "Counter").get("alarmed").call("call_at_alarm", "by-alarm")
    target = ObjectNamespace(calls, "Counter").get("by-alarm")

    async def added() -> bool:
        return await target.call("read") == 10

    await eventually(added, "the alarm's call", timeout_s=20)


async def test_an_object_calls_another(calls: ObjectCalls) -> None:
    a = ObjectNamespace(calls, "Counter").get("caller")
    assert await a.call("call", "Counter", "callee", "add", 2) == 2
    assert await ObjectNamespace(calls, "Counter").get("callee").call("read") == 2
    relay = ObjectNamespace(calls, "Relay").get("r1")
    assert await relay.call("relay", [["Relay", "r2"], ["Relay", "r3"]]) == "end at r3"


async def test_a_cycle_is_refused_at_once_not_a_deadlock(calls: ObjectCalls) -> None:
    """r1 -> r2 -> r1 would wait for itself: refused (CallCycle) well within the turn limit
    of 3 s, at the object that would have made it; the objects go on serving."""
    relay = ObjectNamespace(calls, "Relay").get("c1")
    started = time.monotonic()
    with pytest.raises(CallFailed) as raised:
        await relay.call("relay", [["Relay", "c2"], ["Relay", "c1"]], timeout_s=10)
    # c2's relay raised CallCycle; c1 got it as CallFailed from c2 (its own exception).
    assert raised.value.remote_type == "CallFailed"
    assert "CallCycle" in str(raised.value)
    assert time.monotonic() - started < 3
    caught = await relay.call("relay_catching", [["Relay", "c2"], ["Relay", "c1"]])
    assert caught == "CallFailed"
    # c2 sees the cycle itself: a call to c1 from c1's own chain.
    assert await ObjectNamespace(calls, "Relay").get("c3").call(
        "relay_catching", [["Relay", "c3"]]
    ) == ("CallCycle")
    assert await relay.call("relay", []) == "end at c1"


async def test_a_chain_at_the_depth_limit_and_past_it(calls: ObjectCalls) -> None:
    """A chain of MAX_CALL_DEPTH objects answers; one more is refused (InvalidCall)."""
    names = [["Relay", f"deep{i}"] for i in range(MAX_CALL_DEPTH)]
    first = ObjectNamespace(calls, "Relay").get("deep-start")
    # deep-start is the first waiting turn: it plus MAX_CALL_DEPTH - 1 more reach the limit.
    assert (
        await first.call("relay", names[: MAX_CALL_DEPTH - 1]) == f"end at deep{MAX_CALL_DEPTH - 2}"
    )
    assert await first.call("relay_catching", names[:MAX_CALL_DEPTH]) == "CallFailed"


async def test_a_missing_method_is_a_typed_error(calls: ObjectCalls) -> None:
    room = ObjectNamespace(calls, "Counter").get("errors")
    for method in ("no_such", "on_message", "broadcast", "storage", "not_a_method"):
        with pytest.raises(NoSuchMethod) as raised:
            await room.call(method)
        assert raised.value.method == method
    with pytest.raises(InvalidCall):
        await room.call("_private")


async def test_a_method_that_raises_is_callfailed_and_keeps_its_writes(calls: ObjectCalls) -> None:
    room = ObjectNamespace(calls, "Counter").get("failing")
    with pytest.raises(CallFailed) as raised:
        await room.call("fail", "boom")
    assert raised.value.remote_type == "ValueError"
    assert "boom" in str(raised.value)
    assert (raised.value.namespace, raised.value.name, raised.value.method) == (
        "Counter",
        "failing",
        "fail",
    )
    assert await room.call("echo") == {"args": [], "kwargs": {}}  # the object goes on


async def test_arguments_at_the_limit_and_over_it(calls: ObjectCalls) -> None:
    room = ObjectNamespace(calls, "Counter").get("big-arguments")
    # The encoding's overhead grows with the length's varints: the largest blob that fits.
    size = MAX_CALL_BYTES
    while len(encode_value([[b"y" * size], {}])) > MAX_CALL_BYTES:
        size -= 1
    at_limit = b"y" * size
    assert len(encode_arguments([at_limit], {})) == MAX_CALL_BYTES
    assert await room.call("nothing", at_limit) == len(at_limit)
    with pytest.raises(CallTooLarge):
        await room.call("nothing", at_limit + b"y")


async def test_a_result_at_the_limit_and_over_it(calls: ObjectCalls) -> None:
    room = ObjectNamespace(calls, "Counter").get("big-result")
    size = MAX_CALL_BYTES - 4  # bytes field tag, a 3-byte length
    assert len(value_result(b"x" * size).value) == MAX_CALL_BYTES
    assert await room.call("blob", size) == b"x" * size
    with pytest.raises(CallTooLarge):
        await room.call("blob", size + 1)


async def test_bad_arguments_are_refused_before_sending(calls: ObjectCalls) -> None:
    room = ObjectNamespace(calls, "Counter").get("bad")
    with pytest.raises(InvalidCall):
        await room.call("echo", object())
    with pytest.raises(InvalidCall):
        await room.call("not an identifier")
    with pytest.raises(CallFailed) as raised:
        await room.call("add", "not a number")  # the method's own TypeError
    assert raised.value.remote_type == "TypeError"


async def test_a_method_past_the_turn_limit_fails_and_the_object_goes_on(
    calls: ObjectCalls,
) -> None:
    room = ObjectNamespace(calls, "Counter").get("slow")
    with pytest.raises(CallFailed) as raised:
        await room.call("sleep", 10)
    assert raised.value.remote_type == "TimeoutError"
    assert await room.call("sleep", 0) == "slept"


async def test_a_caller_that_waits_less_than_the_method_times_out(calls: ObjectCalls) -> None:
    room = ObjectNamespace(calls, "Counter").get("impatient")
    with pytest.raises(CallTimeout):
        await room.call("sleep", 1.5, timeout_s=0.3)


async def test_a_namespace_no_worker_serves_is_unavailable(calls: ObjectCalls) -> None:
    with pytest.raises(CallUnavailable):
        await ObjectNamespace(calls, "Nobody").get("x").call("anything", timeout_s=0.5)


async def test_a_broadcast_of_a_call_reaches_the_objects_connections(
    stack: Stack, calls: ObjectCalls
) -> None:
    room = ObjectNamespace(calls, "Counter").get("shouting")
    async with connect(stack.ws_url("/counter/shouting")) as ws:
        await ws.send("read")  # joined once this is answered
        assert await ws.receive() == "0"
        assert await room.call("shout", "hello") == 1
        assert await ws.receive() == "shout: hello"


async def test_a_retried_call_that_committed_is_answered_from_its_record(
    stack: Stack, calls: ObjectCalls
) -> None:
    """The same call (same id) sent again as a retry: answered with the recorded value,
    not run again."""
    from wsgate import subjects
    from wsgate.calls import object_ref
    from wsgate.v1 import envelope_pb2 as pb

    nc = await nats.connect(stack.nats_url)
    try:
        request = pb.ObjectCall(
            object=object_ref("Counter", "retried"),
            method="add",
            arguments=encode_arguments([], {}),
            call_id="retried-call-1",
        )
        subject = subjects.call_subject(DEFAULT_PREFIX, "Counter")
        first = pb.CallResult.FromString(
            (await nc.request(subject, request.SerializeToString(), 10)).data
        )
        request.retried = True
        again = pb.CallResult.FromString(
            (await nc.request(subject, request.SerializeToString(), 10)).data
        )
        assert first == again
        garbage = await nc.request(subject, b"\xff\xff", 10)
        assert pb.CallResult.FromString(garbage.data).error.kind == pb.CallError.INVALID
    finally:
        await nc.close()
    assert await ObjectNamespace(calls, "Counter").get("retried").call("read") == 1
