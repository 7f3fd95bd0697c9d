"""Per-connection order at the gateway rests on NATS' one promise, each publisher's order.

A real :class:`~wsgate.gateway.server.Gateway` (aiohttp on 127.0.0.1, real WebSocket
clients) runs on a :class:`~tests.unit.gateway.reordering_bus.ReorderingBus`: what two fake
workers and a fake state service publish reaches the gateway in random interleavings that
keep each publisher's own order, and the gateway's subscriptions are woken in random
order. Each worker's handler sends frames as commands and as messages riding on its final
ack, and closes the connection with a command; the state service broadcasts to every
connection now and then. For every seed, each client must see its handler frames exactly
in the order the handlers produced them (none dropped as stale, none overtaking another),
then the app's close code; broadcasts in their own order.

Run against the former design (final acks in an AckBatch on ``<prefix>.acks.<gw>``, a
second subscription beside the commands'), every seed failed: frames of an ack written
before the commands that preceded it, commands dropped as stale, the close lost. Seed 1
also found a race on the reply subject, now fixed (tests/unit/gateway/
test_delivery_replies.py).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import aiohttp
import pytest

from tests.unit.gateway.reordering_bus import ReorderingBus, connect_to, gateway_config
from wsgate import ids, subjects
from wsgate.batches import BatchWriter, ack_entry, command_entry
from wsgate.gateway.server import Gateway
from wsgate.v1 import envelope_pb2 as pb

PREFIX = "wsgate"
WORKERS = ("worker-1", "worker-2")
STATE = "state"
#: Messages each client sends before it asks to be closed.
MESSAGES = 12
CLIENTS = 3
SEEDS = range(30)
#: Bounds on waits for what the bus delivers (generous: a loaded CI machine).
TIMEOUT_S = 20.0
CLOSE_CODE = 4000

Item = tuple[str, pb.GatewayCommand | pb.EventAck]


@dataclass
class FakeApp:
    """Two workers and a state service, as publishers on the bus."""

    rng: random.Random
    bus: ReorderingBus | None = None
    gateway_id: str = ""
    #: The frames each connection's handlers produced, in the order they produced them.
    produced: dict[str, list[str]] = field(default_factory=dict)
    members: list[str] = field(default_factory=list)
    broadcasts: int = 0
    progress_acks: int = 0
    closed: set[str] = field(default_factory=set)
    #: Set once every client's close event reached the app.
    all_closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def decide(self, subject: str, payload: bytes) -> bytes:
        request = pb.ConnectRequest.FromString(payload)
        connection_id = request.connection_id
        self.gateway_id = ids.gateway_of(connection_id)
        self.produced[connection_id] = ["hello"]
        self.members.append(connection_id)
        if self.rng.random() < 0.5:
            self.broadcast()  # may reach the gateway before the socket opens
        accept = pb.Accept(messages=[pb.Message(text="hello")])
        return pb.ConnectDecision(accept=accept).SerializeToString()

    def on_publish(self, subject: str, payload: bytes, reply: str) -> None:
        if ".events." not in subject:
            return  # presence
        event = pb.ConnectionEvent.FromString(payload)
        assert not event.redelivered, "nothing may be redelivered here"
        worker = self.rng.choice(WORKERS)
        assert self.bus is not None
        if self.rng.random() < 0.3:
            # Before its output, on the event's reply subject (another subscription).
            progress = pb.EventAck(sequence=event.sequence, in_progress=True)
            self.bus.publish_as(worker, reply, progress.SerializeToString())
            self.progress_acks += 1
        self.emit(worker, self.handle(event))
        if self.rng.random() < 0.3:
            self.broadcast()

    def handle(self, event: pb.ConnectionEvent) -> list[Item]:
        """What a handler of ``event`` produces, in order: commands, then its final ack."""
        conn, seq = event.connection_id, event.sequence
        produced = self.produced[conn]
        ack = pb.EventAck(sequence=seq, connection_id=conn)
        items: list[Item] = []

        def send(text: str) -> None:
            produced.append(text)
            command = pb.GatewayCommand(
                connection_ids=[conn], send=pb.Message(text=text), in_reply_to=seq
            )
            items.append(("command", command))

        if event.WhichOneof("kind") == "closed":
            self.closed.add(conn)
            self.members.remove(conn)
            if len(self.closed) == CLIENTS:
                self.all_closed.set()
        elif event.message.text == "bye":
            send("bye")
            close = pb.CloseConnection(code=CLOSE_CODE, reason="done")
            items.append(
                ("command", pb.GatewayCommand(connection_ids=[conn], close=close, in_reply_to=seq))
            )
        else:
            text = event.message.text
            for part in "ab"[: self.rng.randint(0, 2)]:
                send(f"{text}.{part}")  # streamed as commands while the handler runs
            for part in "cd"[: self.rng.randint(0, 2)]:
                produced.append(f"{text}.{part}")  # still buffered: they ride on the ack
                ack.messages.append(pb.Message(text=f"{text}.{part}"))
        items.append(("ack", ack))
        return items

    def broadcast(self) -> None:
        if not self.members:
            return
        assert self.bus is not None
        command = pb.GatewayCommand(
            connection_ids=list(self.members), send=pb.Message(text=f"s{self.broadcasts:04d}")
        )
        self.broadcasts += 1
        self.emit(STATE, [("command", command)])

    def emit(self, publisher: str, items: list[Item]) -> None:
        """Publish ``items`` in order on the gateway's command subject, as GatewayBatch
        envelopes: split at random into consecutive batches (a real worker's turn may end
        between a handler's commands and its ack)."""
        assert self.bus is not None
        subject = subjects.gateway_subject(PREFIX, self.gateway_id)
        writer = BatchWriter(max_bytes=1 << 20)
        for kind, item in items:
            if kind == "command":
                assert isinstance(item, pb.GatewayCommand)
                writer.add(command_entry(item))
            else:
                assert isinstance(item, pb.EventAck)
                writer.add(ack_entry(item))
            if self.rng.random() < 0.3:
                for payload in writer.payloads():
                    self.bus.publish_as(publisher, subject, payload)
        for payload in writer.payloads():
            self.bus.publish_as(publisher, subject, payload)


@dataclass
class Seen:
    frames: list[str]
    close_code: int | None


async def client(url: str, name: str) -> Seen:
    frames: list[str] = []
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        for k in range(1, MESSAGES + 1):
            await ws.send_str(f"{name}m{k:02d}")
        await ws.send_str("bye")
        try:
            async with asyncio.timeout(TIMEOUT_S):
                async for msg in ws:
                    assert msg.type is aiohttp.WSMsgType.TEXT, msg
                    frames.append(msg.data)
        except TimeoutError:
            return Seen(frames, None)  # the close never came (a lost command)
        return Seen(frames, ws.close_code)


@pytest.mark.parametrize("seed", SEEDS)
async def test_frames_and_close_keep_the_handlers_order_whatever_the_interleaving(
    seed: int,
) -> None:
    rng = random.Random(seed)
    app = FakeApp(rng)
    bus = ReorderingBus(rng, on_publish=app.on_publish, on_request=app.decide)
    app.bus = bus
    config = gateway_config(PREFIX, TIMEOUT_S)
    bus.start()
    try:
        async with Gateway(config, connect=connect_to(bus)) as gw:
            seen = await asyncio.gather(
                *(client(f"{gw.url}/room", f"c{i}") for i in range(CLIENTS))
            )
            async with asyncio.timeout(TIMEOUT_S):
                await app.all_closed.wait()  # every close event reached the app
            stale = (
                gw.metrics.registry.get_sample_value(
                    "wsgate_gateway_drops_total", {"reason": "stale"}
                )
                or 0.0
            )
    finally:
        await bus.close()
    assert len(app.produced) == CLIENTS
    for result in seen:
        handler_frames = [f for f in result.frames if not f.startswith("s")]
        broadcast_frames = [f for f in result.frames if f.startswith("s")]
        assert handler_frames in app.produced.values(), (
            f"seed {seed}: frames out of order or lost: {result.frames}"
        )
        assert broadcast_frames == sorted(broadcast_frames), f"seed {seed}: {result.frames}"
        assert result.close_code == CLOSE_CODE, f"seed {seed}: closed with {result.close_code}"
    # Only progress acks that came after their final ack may be stale; no command was.
    assert stale <= app.progress_acks
    assert bus.switches > 1
    # Events went in EventBatches too, each event still taken alone and in order.
    assert bus.batches > 0
