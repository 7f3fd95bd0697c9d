"""One turn of an activation: what the handler of one event did and produced.

While a durable object's handler runs, everything it does to its object lands in the
running :class:`Turn` (reachable through :data:`current_turn`, which the handler's Task
carries in its context): storage writes, membership changes, the alarm change, and what it
sends, in order. When the handler is done the turn is *ended*; the activation commits it
(fenced by its lease's epoch) and only then releases what it sends: the output gate.

A task the handler started and did not await keeps the turn in its context; once the turn
has ended, writes and sends from it raise :class:`~wsgate.worker.errors.TurnOver`.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from wsgate import ids
from wsgate.v1 import envelope_pb2 as envelope
from wsgate.v1 import state_pb2 as pb
from wsgate.worker.errors import TurnOver

if TYPE_CHECKING:
    from wsgate.worker.activation import Activation


class TurnKind(enum.Enum):
    """Which handler a turn runs."""

    CONNECT = "connect"
    MESSAGE = "message"
    CLOSE = "close"
    ALARM = "alarm"
    CALL = "call"
    REQUEST = "request"


class Turn:
    """The effects and output of one handler run of an activation."""

    __slots__ = (
        "activation",
        "alarm",
        "alarm_masked",
        "call_chain",
        "ended",
        "failed",
        "key",
        "kind",
        "members",
        "number",
        "outputs",
        "pending",
        "replies",
        "sequence",
        "writes",
    )

    def __init__(
        self, activation: Activation, number: int, kind: TurnKind, key: str, sequence: int
    ) -> None:
        self.activation = activation
        #: The activation's count of turns, from 1: the order of commits.
        self.number = number
        self.kind = kind
        self.key = key
        self.sequence = sequence
        self.writes: list[pb.Write] = []
        self.members: list[pb.MemberChange] = []
        self.alarm: pb.AlarmChange | None = None
        #: In an alarm turn the alarm that is running is not reported (as on Cloudflare).
        self.alarm_masked = kind is TurnKind.ALARM
        self.outputs: list[pb.TurnOutput] = []
        #: What a connect handler sends to its own connection (written after the 101).
        self.replies: list[envelope.Message] = []
        #: Work the handler started and did not await (transactions): the turn waits for it.
        self.pending: list[asyncio.Future[Any]] = []
        self.ended = False
        self.failed = False
        #: For a call's turn: the objects whose turns wait for it (its ObjectCall's chain).
        self.call_chain: Sequence[envelope.ObjectRef] = ()

    def check_open(self) -> None:
        """Raise TurnOver once the turn has ended."""
        if self.ended:
            raise TurnOver(
                f"the turn of {self.key}#{self.sequence} is over: await the storage calls and "
                "sends of a handler (or of the tasks it starts) before it returns"
            )

    # -- what handlers do -----------------------------------------------------------------

    def write(self, write: pb.Write) -> None:
        """A storage write, in order."""
        self.check_open()
        self.writes.append(write)

    def member(self, change: pb.MemberChange) -> None:
        """A membership change, in order."""
        self.check_open()
        self.members.append(change)

    def set_alarm(self, change: pb.AlarmChange) -> None:
        """The object's alarm is set or deleted (the last change of the turn counts)."""
        self.check_open()
        self.alarm = change
        self.alarm_masked = False

    def reply(self, message: envelope.Message) -> None:
        """A message to the connection whose event this turn handles."""
        self.check_open()
        if self.kind is TurnKind.CONNECT:
            self.replies.append(message)
        else:
            self.outputs.append(pb.TurnOutput(reply=message))

    def close(self, code: int, reason: str) -> None:
        """Close the connection whose event this turn handles."""
        self.check_open()
        self.outputs.append(pb.TurnOutput(close=envelope.CloseConnection(code=code, reason=reason)))

    def send_to(self, connection_ids: list[str], message: envelope.Message) -> int:
        """``message`` to other connections: one command per gateway. Returns how many."""
        self.check_open()
        by_gateway: dict[str, list[str]] = {}
        for connection_id in connection_ids:
            by_gateway.setdefault(ids.gateway_of(connection_id), []).append(connection_id)
        for members in by_gateway.values():
            self.command(envelope.GatewayCommand(connection_ids=members, send=message))
        return len(by_gateway)

    def command(self, command: envelope.GatewayCommand) -> None:
        """A command for one gateway (its connections all belong to it)."""
        self.check_open()
        self.outputs.append(pb.TurnOutput(command=command))

    def hold(self, future: asyncio.Future[Any]) -> None:
        """The turn ends only once ``future`` is done (a transaction not awaited)."""
        self.pending.append(future)

    def end(self) -> None:
        """The handler is done: nothing more can be added."""
        self.ended = True

    def to_proto(
        self,
        *,
        decision: envelope.ConnectDecision | None,
        answer: bytes | None = None,
    ) -> pb.Turn:
        """The turn as committed: effects, outcome (a connect's decision, a call's result
        or an HTTP response, serialized: ``answer``), and whether to record it (a failed
        alarm turn is not: its firing is retried, and must run again)."""
        outcome = pb.TurnOutcome(outputs=self.outputs, failed=self.failed)
        if decision is not None:
            outcome.decision.CopyFrom(decision)
        if answer is not None:
            outcome.answer = answer
        turn = pb.Turn(
            key=self.key,
            sequence=self.sequence,
            writes=self.writes,
            members=self.members,
            outcome=outcome,
            record=not (self.kind is TurnKind.ALARM and self.failed),
        )
        if self.alarm is not None:
            turn.alarm.CopyFrom(self.alarm)
        return turn


#: The turn whose handler runs in this context (None outside activations).
current_turn: contextvars.ContextVar[Turn | None] = contextvars.ContextVar(
    "wsgate_current_turn", default=None
)
