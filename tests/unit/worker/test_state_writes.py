"""The write pipeline keeps each object's writes in the order they were called, across
calls in flight at once (the service handles each call on its own, so two calls' writes to
one object could apply in either order)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from wsgate.v1 import state_pb2 as pb
from wsgate.worker.state_writes import WritePipeline


class HeldCall:
    """A Write call whose results the test hands out."""

    def __init__(self, request: pb.WriteRequest) -> None:
        self.request = request
        self.results: asyncio.Queue[pb.WriteResponse | None] = asyncio.Queue()

    def answer_all(self) -> None:
        results = [pb.WriteResult(index=i, count=1) for i in range(len(self.request.writes))]
        self.results.put_nowait(pb.WriteResponse(results=results))
        self.results.put_nowait(None)


class FakeEndpoint:
    address = "replica-1:7070"

    def __init__(self) -> None:
        self.calls: list[HeldCall] = []
        self.made = asyncio.Event()

    def write_call(
        self, request: pb.WriteRequest, *, timeout_s: float, wait_for_ready: bool
    ) -> HeldCall:
        call = HeldCall(request)
        self.calls.append(call)
        self.made.set()
        return call

    async def tracked(self, call: HeldCall) -> AsyncIterator[pb.WriteResponse]:
        while (response := await call.results.get()) is not None:
            yield response


class FakeClient:
    timeout_s = 10.0
    waits_for_ready = False
    on_write_call = None

    def check_open(self) -> None:
        pass


def _put(name: str, key: str) -> pb.Write:
    obj = pb.ObjectId(namespace="room", name=name)
    return pb.Write(put=pb.PutRequest(object=obj, entries=[pb.Entry(key=key)]))


def _keys(call: HeldCall) -> list[tuple[str, str]]:
    return [(w.put.object.name, w.put.entries[0].key) for w in call.request.writes]


async def _next_call(endpoint: FakeEndpoint, count: int) -> HeldCall:
    async with asyncio.timeout(5):
        while len(endpoint.calls) < count:
            endpoint.made.clear()
            await endpoint.made.wait()
    return endpoint.calls[count - 1]


async def test_a_write_waits_for_an_earlier_call_to_its_object_and_others_pass() -> None:
    endpoint = FakeEndpoint()
    pipeline = WritePipeline(FakeClient(), endpoint)  # type: ignore[arg-type]
    first = pipeline.submit(_put("a", "1"))
    call_1 = await _next_call(endpoint, 1)
    assert _keys(call_1) == [("a", "1")]
    # Started while call 1 is in flight: a second write to "a" and one to "b".
    second = pipeline.submit(_put("a", "2"))
    other = pipeline.submit(_put("b", "1"))
    call_2 = await _next_call(endpoint, 2)
    assert _keys(call_2) == [("b", "1")]  # "a" waits behind call 1
    call_2.answer_all()
    assert (await other).count == 1
    assert not second.done()
    assert len(endpoint.calls) == 2
    call_1.answer_all()
    assert (await first).count == 1
    call_3 = await _next_call(endpoint, 3)
    assert _keys(call_3) == [("a", "2")]
    call_3.answer_all()
    assert (await second).count == 1


async def test_writes_to_one_object_called_in_one_turn_share_a_call() -> None:
    endpoint = FakeEndpoint()
    pipeline = WritePipeline(FakeClient(), endpoint)  # type: ignore[arg-type]
    futures = [pipeline.submit(_put("a", str(i))) for i in range(3)]
    call = await _next_call(endpoint, 1)
    assert _keys(call) == [("a", "0"), ("a", "1"), ("a", "2")]
    call.answer_all()
    assert [(await f).count for f in futures] == [1, 1, 1]
