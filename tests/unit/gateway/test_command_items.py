"""The items of a GatewayBatch, each taken on its own: the gateway picks out a final ack
by its connection id before asking the item's oneof, so items that are no final ack of a
connection (no member set, an ack without a connection id, a progress ack among the final
ones) must still count as garbage, and must not stop the final ack behind them.

A real :class:`~wsgate.gateway.server.Gateway` and a real WebSocket client, on the
in-memory bus of tests/unit/gateway/reordering_bus.py (one publisher: nothing reorders).
"""

from __future__ import annotations

import asyncio
import random

import aiohttp

from tests.unit.gateway.reordering_bus import ReorderingBus, connect_to, gateway_config
from wsgate import ids, subjects
from wsgate.gateway.server import Gateway
from wsgate.v1 import envelope_pb2 as pb

PREFIX = "wsgate"
TIMEOUT_S = 20.0


async def test_items_that_are_no_final_ack_are_garbage_and_the_ack_behind_them_counts() -> None:
    bus: ReorderingBus | None = None

    async def decide(subject: str, payload: bytes) -> bytes:
        return pb.ConnectDecision(accept=pb.Accept()).SerializeToString()

    def on_publish(subject: str, payload: bytes, reply: str) -> None:
        if ".events." not in subject:
            return  # presence
        event = pb.ConnectionEvent.FromString(payload)
        if event.WhichOneof("kind") != "message":
            return
        conn, seq = event.connection_id, event.sequence
        batch = pb.GatewayBatch(
            items=[
                pb.GatewayItem(),  # no member set
                pb.GatewayItem(ack=pb.EventAck(sequence=seq)),  # no connection id
                pb.GatewayItem(ack=pb.EventAck(connection_id=conn, sequence=seq, retry=True)),
                pb.GatewayItem(
                    ack=pb.EventAck(
                        connection_id=conn,
                        sequence=seq,
                        messages=[pb.Message(text=f"echo {event.message.text}")],
                    )
                ),
            ]
        )
        subject = subjects.gateway_subject(PREFIX, ids.gateway_of(conn))
        assert bus is not None
        bus.publish_as("worker-1", subject, batch.SerializeToString())

    bus = ReorderingBus(random.Random(0), on_publish=on_publish, on_request=decide)
    config = gateway_config(PREFIX, TIMEOUT_S)
    bus.start()
    try:
        async with Gateway(config, connect=connect_to(bus)) as gw:
            async with aiohttp.ClientSession() as session, session.ws_connect(gw.url) as ws:
                async with asyncio.timeout(TIMEOUT_S):
                    for text in ("one", "two"):
                        await ws.send_str(text)
                        # Each answer needs the final ack: the event before it settled.
                        assert (await ws.receive_str()) == f"echo {text}"
            garbage = gw.metrics.registry.get_sample_value(
                "wsgate_gateway_garbage_total", {"subject": "command"}
            )
    finally:
        await bus.close()
    assert garbage == 3 * 2
