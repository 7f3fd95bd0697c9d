"""A worker takes an EventBatch (wsgate/event_batch.py) as it takes lone events: each event
checked, handled and acknowledged on its own. The test is the gateway: it publishes on
the app's events subject under a gateway id of its own and reads its command subject.

(Gateways send batches whenever two or more events leave in one turn of their event loop:
every end-to-end test with concurrent clients goes through them too.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from tests.harness import Stack, eventually, metric, stack_context
from wsgate import event_batch, subjects
from wsgate.config import DEFAULT_APP_NAME, DEFAULT_PREFIX
from wsgate.v1 import envelope_pb2 as pb

GATEWAY = "batcher-abcdefgh"
OTHER_GATEWAY = "other-abcdefgh"
EVENTS = subjects.events_subject(DEFAULT_PREFIX, DEFAULT_APP_NAME, GATEWAY)


@pytest.fixture(scope="module")
def worker_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """nats-server, the state service and one worker on the example app; no gateway."""
    yield from stack_context(tmp_path_factory.mktemp("batches"), gateway=False)


class FakeGateway:
    """Publishes events as GATEWAY and collects the final acks on its command subject."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.acks: dict[tuple[str, int], pb.EventAck] = {}
        self.arrived = asyncio.Event()

    async def on_command(self, msg: Msg) -> None:
        for item in pb.GatewayBatch.FromString(msg.data).items:
            if item.HasField("ack"):
                self.acks[item.ack.connection_id, item.ack.sequence] = item.ack
        self.arrived.set()

    async def acked(self, keys: set[tuple[str, int]]) -> dict[tuple[str, int], pb.EventAck]:
        async with asyncio.timeout(20):
            while not keys <= self.acks.keys():
                self.arrived.clear()
                await self.arrived.wait()
        return {key: self.acks[key] for key in keys}


@pytest.fixture
async def gateway(worker_stack: Stack) -> AsyncIterator[FakeGateway]:
    nc = NatsClient()
    await nc.connect(worker_stack.nats_url)
    fake = FakeGateway(nc)
    await nc.subscribe(subjects.gateway_subject(DEFAULT_PREFIX, GATEWAY), cb=fake.on_command)
    await nc.flush()
    try:
        yield fake
    finally:
        await nc.close()


def _event(connection_id: str, text: str, sequence: int = 1) -> bytes:
    return pb.ConnectionEvent(
        connection_id=connection_id,
        sequence=sequence,
        path="/echo",
        message=pb.Message(text=text),
    ).SerializeToString()


def _batch_reply(number: int, gateway_id: str = GATEWAY) -> str:
    return subjects.batch_reply_subject(DEFAULT_PREFIX, gateway_id, number)


async def test_each_event_of_a_batch_is_handled_and_acked_on_its_own(
    gateway: FakeGateway,
) -> None:
    connections = [f"{GATEWAY}_b{n}" for n in range(5)]
    payload = event_batch.join([_event(c, f"hi {c}") for c in connections])
    await gateway.nc.publish(EVENTS, payload, reply=_batch_reply(1))
    # A lone event beside it, as a gateway sends one.
    lone = f"{GATEWAY}_lone"
    await gateway.nc.publish(
        EVENTS, _event(lone, "alone"), reply=subjects.ack_subject(DEFAULT_PREFIX, GATEWAY, lone, 1)
    )
    acks = await gateway.acked({(c, 1) for c in [*connections, lone]})
    for connection_id in connections:
        (message,) = acks[connection_id, 1].messages
        assert message.text == f"hi {connection_id}"
    assert [m.text for m in acks[lone, 1].messages] == ["alone"]


async def test_a_batch_that_is_no_batch_is_counted_as_garbage_and_nothing_of_it_runs(
    worker_stack: Stack, gateway: FakeGateway
) -> None:
    url = worker_stack.worker_metrics_url()
    before = await metric(url, "wsgate_worker_garbage_total", {"subject": "events"})
    good = _event(f"{GATEWAY}_g1", "never")
    # A whole event, then a length that runs past the end.
    await gateway.nc.publish(EVENTS, event_batch.join([good]) + b"\x7a\x09x", reply=_batch_reply(2))
    await gateway.nc.flush()

    async def counted() -> bool:
        now = await metric(url, "wsgate_worker_garbage_total", {"subject": "events"})
        return now == before + 1

    await eventually(counted, "the broken batch counted once")
    # A later event of the same connection is answered, and the broken batch's never was.
    later = f"{GATEWAY}_g2"
    await gateway.nc.publish(
        EVENTS, event_batch.join([_event(later, "x"), _event(later, "y", 2)]), reply=_batch_reply(3)
    )
    await gateway.acked({(later, 1), (later, 2)})
    assert (f"{GATEWAY}_g1", 1) not in gateway.acks


async def test_events_of_a_batch_that_do_not_name_its_gateway_are_dropped_as_impostors(
    worker_stack: Stack, gateway: FakeGateway
) -> None:
    url = worker_stack.worker_metrics_url()
    before = await metric(url, "wsgate_worker_impostor_requests_total")
    own, foreign = f"{GATEWAY}_i1", f"{OTHER_GATEWAY}_i1"
    # One event of another gateway inside GATEWAY's batch; and a batch whose reply subject
    # is another gateway's.
    await gateway.nc.publish(
        EVENTS,
        event_batch.join([_event(own, "mine"), _event(foreign, "theirs")]),
        reply=_batch_reply(4),
    )
    stranger = f"{GATEWAY}_i2"
    await gateway.nc.publish(
        EVENTS,
        event_batch.join([_event(stranger, "a"), _event(stranger, "b", 2)]),
        reply=_batch_reply(5, OTHER_GATEWAY),
    )
    await gateway.nc.flush()

    async def counted() -> bool:
        return await metric(url, "wsgate_worker_impostor_requests_total") == before + 3

    await eventually(counted, "three impostors counted")
    acks = await gateway.acked({(own, 1)})
    assert [m.text for m in acks[own, 1].messages] == ["mine"]
    assert (stranger, 1) not in gateway.acks
