"""A hypothesis state machine over every input of the gateway's Session.

Hypothesis feeds random sequences of frames, client closes, commands, acks of every kind,
clock ticks, transport errors and the end of the socket (derandomized, bounded), and
checks after each input what the session's actions must never break:

- at most one event in flight per connection;
- events published for the first time in client order, with consecutive sequences;
- an event published again only after its ack deadline or backoff (or at once, to the
  queue, when the worker it was sent to did not take it), same sequence, marked
  ``redelivered``;
- exactly one ``Closed`` event, last, once the socket is gone and the window is free;
- nothing written after CLOSED; every close code sent is one an endpoint may send, and
  every code reported to the app is a valid one (RFC 6455 7.4).
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from wsgate.closecodes import CloseCode, is_sendable
from wsgate.gateway.session import (
    MESSAGE_IN,
    Action,
    Close,
    Delivered,
    Event,
    GaveUp,
    Publish,
    Reply,
    Session,
    SessionLimits,
    State,
    Write,
)
from wsgate.v1 import envelope_pb2 as pb

LIMITS = SessionLimits(
    max_message_bytes=8,
    max_outbound_bytes=200,
    message_rate=5.0,
    message_burst=3,
    idle_timeout_s=20.0,
    ack_timeout_s=5.0,
    delivery_timeout_s=30.0,
    auto_responses={"ping": "pong"},
)
WORKER = "w-abcdefgh"
#: Codes the app may see: what can be sent, plus the two that are only ever reported.
REPORTABLE = {CloseCode.NO_STATUS, CloseCode.ABNORMAL}
#: Mostly messages within the limit; an auto-response; one over the limit each way.
FRAMES = st.sampled_from(
    ["a", "bb", "x" * 8, b"", b"\x00\xff", b"z" * 8, "ping", "y" * 9, b"z" * 9]
)


class SessionModel(RuleBasedStateMachine):
    @initialize(worker=st.sampled_from(["", WORKER]), early=st.integers(0, 3))
    def start(self, worker: str, early: int) -> None:
        self.now = 0.0
        self.session = Session("node-abcdefgh_1", "/room/x", LIMITS)
        for i in range(early):
            self.feed(self.session.command(_send(f"early {i}")))
        self.in_flight: Event | None = None
        #: When a copy of the event in flight may be published again (None: at once is
        #: allowed only on a reply, see ``ack``).
        self.earliest_again: float | None = None
        self.copy_worker = ""
        self.last_sequence = 0
        self.sent: list[str | bytes] = []  # frames the session took as events, in order
        self.published: list[str | bytes] = []  # their data, first publish of each
        self.closed_events = 0
        self.socket_gone = False
        self.feed(self.session.opened(self.now, worker=worker))

    # -- inputs ----------------------------------------------------------------------

    @rule(frames=st.lists(FRAMES, min_size=1, max_size=3))
    def client_frames(self, frames: list[str | bytes]) -> None:
        """One frame, or several read while an event is in flight (a queue forms)."""
        for data in frames:
            actions = self.session.client_frame(data, self.now)
            if MESSAGE_IN in actions:
                self.sent.append(data)
            self.feed(actions)

    @rule(
        # Close frames (0: an empty one); negative: the transport closed it (protocol
        # violation, no pong).
        code=st.sampled_from(
            [0, 1000, 1001, 1005, 1006, 1011, 2000, 3000, 4999, 5000, -1002, -1007, -1009, -1006]
        )
    )
    def client_closes(self, code: int) -> None:
        if code < 0:
            assert self.session.transport_error(-code, "transport") == []
        else:
            self.feed(self.session.client_close(code, "bye", self.now))

    @rule(
        text=st.sampled_from(["hi", "there", ""]),
        back=st.integers(0, 2),
        close=st.sampled_from([0, 0, 1000, 4999]),
    )
    def command(self, text: str, back: int, close: int) -> None:
        if close:
            command = pb.GatewayCommand(close=pb.CloseConnection(code=close, reason="app"))
        else:
            command = _send(text, max(self.session.last_sequence + 1 - back, 0))
        self.feed(self.session.command(command))

    @rule(worker=st.sampled_from(["", WORKER]), messages=st.integers(0, 2))
    def final_ack(self, worker: str, messages: int) -> None:
        self.ack(Reply.ACKED, worker, messages)

    @rule(
        outcome=st.sampled_from([Reply.PROGRESS, Reply.NO_RESPONDERS, Reply.RETRY]),
        worker=st.sampled_from(["", WORKER]),
    )
    def other_reply(self, outcome: Reply, worker: str) -> None:
        self.ack(outcome, worker, 0)

    def ack(self, outcome: Reply, worker: str, messages: int) -> None:
        if not self.session.busy or self.session.ack_deadline is None:
            return  # nothing published waits for a reply
        if outcome is Reply.ACKED and messages:
            self.feed(self.session.ack_messages([pb.Message(text="m")] * messages))
        hinted = self.copy_worker != ""
        before = self.published_count
        actions = self.session.reply(outcome, self.now, worker=worker)
        self.feed(actions, replied=outcome)
        if outcome is Reply.PROGRESS:
            self.earliest_again = self.now + LIMITS.ack_timeout_s
        if outcome in (Reply.NO_RESPONDERS, Reply.RETRY) and self.published_count > before:
            assert hinted, "published again at once, though no worker was hinted"

    @rule(dt=st.sampled_from([0.0, 0.01, 0.05, 1.0, 4.99, 5.0, 10.0, 25.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.feed(self.session.tick(self.now))

    @rule(what=st.sampled_from(["drain", "slow_consumer", "shed", "bus_gone"]))
    def gateway(self, what: str) -> None:
        session = self.session
        if what == "drain":
            self.feed(session.close(CloseCode.GOING_AWAY, "going away"))
        elif what == "slow_consumer":
            self.feed(session.slow_consumer())
        elif what == "shed":
            self.feed(session.shed("budget"))
        elif session.busy:
            self.feed(session.give_up(self.now))

    @rule()
    def transport_closed(self) -> None:
        self.socket_gone = True
        self.feed(self.session.transport_closed(self.now))

    # -- what comes out --------------------------------------------------------------

    published_count = 0

    def feed(self, actions: list[Action], replied: Reply | None = None) -> None:
        state_before_writes = self.session.state
        for action in actions:
            if isinstance(action, (Write, Close)):
                assert not (self.socket_gone and state_before_writes is State.CLOSED), (
                    f"{action} after CLOSED"
                )
            if isinstance(action, Close):
                assert is_sendable(action.code), action
            elif isinstance(action, (Delivered, GaveUp)):
                assert self.in_flight is not None
                assert action.event is self.in_flight
                self.in_flight = None
            elif isinstance(action, Publish):
                self.published_count += 1
                self.on_publish(action, replied)

    def on_publish(self, publish: Publish, replied: Reply | None) -> None:
        event = publish.event
        self.copy_worker = publish.worker
        if self.in_flight is not None:
            # A copy of the event in flight: the same one, marked, and only when due.
            assert event is self.in_flight, "a second event while one is in flight"
            assert event.redelivered
            if replied is None:  # from tick: past the ack deadline or the backoff
                assert self.earliest_again is not None
                assert self.now >= self.earliest_again
            self.earliest_again = self.now + LIMITS.ack_timeout_s
            return
        assert event.sequence == self.last_sequence + 1, "sequences are consecutive"
        assert not event.redelivered
        assert self.closed_events == 0, "nothing after the Closed event"
        self.last_sequence = event.sequence
        self.in_flight = event
        self.earliest_again = self.now + LIMITS.ack_timeout_s
        if event.kind == "closed":
            self.closed_events += 1
            closed = event.closed
            assert is_sendable(closed.code) or closed.code in REPORTABLE, closed
        else:
            message = event.message
            self.published.append(
                message.text if message.WhichOneof("data") == "text" else message.binary
            )

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def one_event_in_flight_at_most(self) -> None:
        assert self.session.busy == (self.in_flight is not None)

    @invariant()
    def backoff_is_tracked(self) -> None:
        retry_at = self.session.retry_at
        if retry_at is not None:
            # The next copy may go at the retry time, no earlier.
            self.earliest_again = retry_at

    @invariant()
    def events_in_client_order(self) -> None:
        assert self.published == self.sent[: len(self.published)]

    @invariant()
    def exactly_one_close_reported(self) -> None:
        assert self.closed_events <= 1
        if self.socket_gone and not self.session.busy:
            assert self.closed_events == 1
            assert self.published == self.sent, "every message went before the close"


def _send(text: str, in_reply_to: int = 0) -> pb.GatewayCommand:
    return pb.GatewayCommand(send=pb.Message(text=text), in_reply_to=in_reply_to)


SessionModel.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, derandomize=True, deadline=None
)
TestSessionModel = SessionModel.TestCase
