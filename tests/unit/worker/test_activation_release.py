"""An activation releases each committed turn's commands at most once (worker/activation.py),
whatever copies of its event come later and whenever the activation stops; with a host
that records what the activation sends instead of a worker, NATS and a state service."""

from __future__ import annotations

import asyncio
from typing import Any

from google.protobuf.message import Message
from nats.aio.msg import Msg

from wsgate import ids
from wsgate.v1 import envelope_pb2 as envelope
from wsgate.v1 import state_pb2 as pb
from wsgate.worker import state_methods as methods
from wsgate.worker.activation import Activation
from wsgate.worker.durable import DurableObject
from wsgate.worker.failpoints import Failpoints
from wsgate.worker.metrics import WorkerMetrics
from wsgate.worker.turn import current_turn
from wsgate.worker.work import Work, WorkKind

GATEWAY = ids.new_gateway_id("test")
POSTER = f"{GATEWAY}_1"
PEER = f"{GATEWAY}_2"


class Poster(DurableObject):
    """Sends every message to PEER (a command to another connection); "hold" first waits
    for the test to let it go."""

    namespace = "poster"
    held: asyncio.Future[None] | None = None

    async def on_message(self, conn: Any, message: str | bytes) -> None:
        if message == "hold":
            assert Poster.held is not None
            await Poster.held
        turn = current_turn.get()
        assert turn is not None
        turn.send_to([PEER], envelope.Message(text=str(message)))


class _State:
    async def call(self, method: methods.Rpc, request: Message, **_: float) -> Message:
        assert method is methods.GET_ATTACHMENT, method
        return pb.GetAttachmentResponse()


class Host:
    """The ActivationHost: commits succeed; what leaves is recorded."""

    worker_id = ids.new_worker_id("test")
    turn_timeout_s = 10.0
    payload_budget = 1 << 20

    def __init__(self) -> None:
        self.state: Any = _State()
        self.env: Any = None
        self.metrics = WorkerMetrics()
        self.failpoints = Failpoints()
        self.commands: list[str] = []
        self.acks: list[int] = []
        self.handed_back_works: list[Work] = []
        #: While set and not done, publishing waits for it (a release under way).
        self.publishing: asyncio.Future[None] | None = None
        self.publish_started: asyncio.Future[None] | None = None

    async def commit(self, turns: pb.ObjectTurns) -> pb.ObjectTurnsResult:
        return pb.ObjectTurnsResult(committed=pb.TurnsCommitted())

    async def lease_confirmed(self, activation: Activation) -> bool:
        return True

    async def publish_command(self, command: envelope.GatewayCommand) -> None:
        if self.publish_started is not None and not self.publish_started.done():
            self.publish_started.set_result(None)
        if self.publishing is not None:
            await asyncio.shield(self.publishing)
        self.commands.append(command.send.text)

    def queue_ack(self, gateway_id: str, ack: envelope.EventAck) -> None:
        self.acks.append(ack.sequence)

    async def respond(self, msg: Msg, payload: bytes) -> None:
        raise AssertionError("no requests here")

    async def connection_closed(self, connection_id: str) -> None:
        raise AssertionError("no closes here")

    def handed_back(self, activation: Activation, works: list[Work]) -> None:
        self.handed_back_works.extend(works)


def event(sequence: int, text: str, *, redelivered: bool = False) -> Work:
    message = envelope.ConnectionEvent(
        connection_id=POSTER,
        sequence=sequence,
        path="/poster/p",
        message=envelope.Message(text=text),
        redelivered=redelivered,
    )
    no_client: Any = None
    msg = Msg(_client=no_client, subject="events", reply="reply", data=message.SerializeToString())
    return Work(WorkKind.EVENT, msg, POSTER, sequence, redelivered, 0, {"name": "p"}, event=message)


async def test_a_copy_of_a_released_turn_gets_its_ack_and_no_command_again() -> None:
    host = Host()
    activation = Activation(host, Poster, "p", epoch=1, lease_s=10)
    first = event(1, "post")
    activation.enqueue(first)
    await first.done
    copy = event(1, "post", redelivered=True)
    activation.enqueue(copy)
    await copy.done
    assert host.commands == ["post"]
    assert host.acks == [1, 1]
    activation.stop("the test is over", quiet=True)


async def test_a_stop_answers_queued_copies_of_released_turns_and_hands_back_the_rest() -> None:
    host = Host()
    activation = Activation(host, Poster, "p", epoch=1, lease_s=10)
    first = event(1, "post")
    activation.enqueue(first)
    await first.done
    Poster.held = asyncio.get_running_loop().create_future()
    running = event(2, "hold")
    activation.enqueue(running)
    copy = event(1, "post", redelivered=True)
    activation.enqueue(copy)  # queued behind the turn that runs
    activation.stop("commit failed")
    assert host.handed_back_works == [running]
    assert copy.done.done()
    assert host.commands == ["post"]
    assert host.acks == [1, 1]


async def test_a_release_under_way_is_finished_when_the_activation_stops() -> None:
    host = Host()
    activation = Activation(host, Poster, "p", epoch=1, lease_s=10)
    loop = asyncio.get_running_loop()
    host.publishing = loop.create_future()
    host.publish_started = loop.create_future()
    first = event(1, "post")
    activation.enqueue(first)
    await host.publish_started  # committed, its command leaving
    copy = event(1, "post", redelivered=True)
    activation.enqueue(copy)
    activation.stop("its lease was lost")
    host.publishing.set_result(None)
    await first.done
    await copy.done
    assert host.handed_back_works == []
    assert host.commands == ["post"]
    assert host.acks == [1, 1]  # the copy answered at the stop, its turn by the release
