"""The gateway's per-connection policy (gateway/session.py), driven with no sockets, no bus
and no clock: every input gets ``now``, every output is an action to check."""

from __future__ import annotations

import pytest

from wsgate.closecodes import CloseCode
from wsgate.gateway.session import (
    AUTO_RESPONSE,
    MESSAGE_IN,
    MESSAGE_OUT,
    RATE_LIMITED,
    SLOW_CONSUMER,
    STALE,
    UNKNOWN_CONNECTION,
    Action,
    Close,
    Count,
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
    max_message_bytes=16,
    max_outbound_bytes=64,
    idle_timeout_s=10.0,
    ack_timeout_s=5.0,
    delivery_timeout_s=30.0,
    auto_responses={"ping": "pong"},
)


def _session(limits: SessionLimits = LIMITS, now: float = 0.0, worker: str = "") -> Session:
    session = Session("node-abcdefgh_1", "/chat/x", limits)
    assert session.opened(now, worker=worker) == []
    return session


def _publish(actions: list[Action]) -> Event:
    published = [a for a in actions if isinstance(a, Publish)]
    assert len(published) == 1, actions
    return published[0].event


def _closes(actions: list[Action]) -> list[Close]:
    return [a for a in actions if isinstance(a, Close)]


def _closed_event(session: Session, now: float = 0.0) -> pb.Closed:
    actions = session.transport_closed(now)
    if session.busy and not any(isinstance(a, Publish) for a in actions):
        pytest.fail("the Closed event waits behind an event in flight")
    event = _publish(actions)
    assert event.kind == "closed"
    return event.closed


# -- events and the window -------------------------------------------------------------


def test_events_are_numbered_from_one_carry_the_path_and_wait_for_the_window() -> None:
    session = _session()
    first = _publish(session.client_frame("a", 1.0))
    assert (first.sequence, first.path, first.message.text) == (1, "/chat/x", "a")
    assert first.ack_wait_ms == 5000
    assert not first.redelivered
    # The window is taken: the next ones wait, in order, and go one at a time.
    assert session.client_frame(b"b", 1.1) == [MESSAGE_IN]
    assert session.client_frame("c", 1.2) == [MESSAGE_IN]
    actions = session.reply(Reply.ACKED, 2.0)
    assert isinstance(actions[0], Delivered)
    assert actions[0].round_trip_s == pytest.approx(1.0)
    second = _publish(actions)
    assert (second.sequence, second.message.binary) == (2, b"b")
    third = _publish(session.reply(Reply.ACKED, 2.5))
    assert (third.sequence, third.message.text) == (3, "c")
    assert [type(a) for a in session.reply(Reply.ACKED, 3.0)] == [Delivered]
    assert not session.busy
    assert session.acked_through == 3


def test_the_closed_event_comes_once_and_last_behind_the_event_in_flight() -> None:
    session = _session()
    session.client_frame("a", 0.0)
    actions = session.transport_closed(0.5)
    assert actions == [Count("closes", "transport")]  # queued behind event 1
    assert session.state is State.CLOSED
    closed = _publish(session.reply(Reply.ACKED, 1.0))
    assert closed.sequence == 2
    assert (closed.closed.code, closed.closed.initiator) == (
        CloseCode.ABNORMAL,
        pb.CLOSE_INITIATOR_UNSPECIFIED,
    )
    assert session.transport_closed(2.0) == []
    assert session.client_frame("late", 2.0) == []


def test_a_connection_that_never_opened_still_reports_its_close() -> None:
    session = Session("node-abcdefgh_2", "/p", LIMITS)
    actions = session.abort(CloseCode.GOING_AWAY, 3.0)
    assert len(actions) == 1  # and not counted among the closes of open connections
    event = _publish(actions)
    assert event.sequence == 1
    assert (event.closed.code, event.closed.initiator) == (
        CloseCode.GOING_AWAY,
        pb.CLOSE_INITIATOR_GATEWAY,
    )
    assert session.state is State.CLOSED


def test_inputs_in_the_wrong_state_are_the_wirings_bugs() -> None:
    session = Session("node-abcdefgh_3", "/p", LIMITS)
    with pytest.raises(RuntimeError):
        session.client_frame("early", 0.0)
    session.opened(0.0)
    with pytest.raises(RuntimeError):
        session.opened(0.0)
    with pytest.raises(RuntimeError):
        session.reply(Reply.ACKED, 0.0)


def test_the_session_has_slots_and_makes_its_queue_only_when_needed() -> None:
    session = _session()
    assert not hasattr(session, "__dict__")
    assert session._queue is None
    assert session._early is None
    session.client_frame("a", 0.0)
    session.client_frame("b", 0.0)
    assert session._queue is not None
    session.reply(Reply.ACKED, 0.0)
    assert session._queue is None  # emptied: dropped


# -- close codes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "replied", "reported"),
    [
        (1000, 1000, 1000),
        (1001, 1001, 1001),
        (4321, 4321, 4321),
        (3000, 3000, 3000),
        (0, CloseCode.NORMAL, CloseCode.NO_STATUS),  # an empty close frame
    ],
)
def test_a_client_close_is_echoed_and_reported(sent: int, replied: int, reported: int) -> None:
    session = _session()
    assert session.client_close(sent, "bye", 1.0) == [Close(replied, "")]
    assert session.state is State.CLOSING
    closed = _closed_event(session)
    assert (closed.code, closed.initiator) == (reported, pb.CLOSE_INITIATOR_CLIENT)
    assert closed.reason == "bye"


@pytest.mark.parametrize("code", [999, 1004, 1005, 1006, 1015, 1016, 2999, 5000])
def test_a_close_code_no_endpoint_may_send_is_a_protocol_error(code: int) -> None:
    session = _session()
    assert session.client_close(code, "", 1.0) == [
        Close(CloseCode.PROTOCOL_ERROR, "invalid close code")
    ]
    closed = _closed_event(session)
    assert (closed.code, closed.initiator) == (CloseCode.PROTOCOL_ERROR, pb.CLOSE_INITIATOR_GATEWAY)


def test_only_the_first_request_to_close_counts() -> None:
    session = _session()
    assert session.close(CloseCode.GOING_AWAY, "going away") == [
        Close(CloseCode.GOING_AWAY, "going away")
    ]
    assert session.client_close(1000, "", 1.0) == []
    assert session.close(CloseCode.GOING_AWAY, "again") == []
    closed = _closed_event(session)
    assert (closed.code, closed.reason) == (CloseCode.GOING_AWAY, "going away")


@pytest.mark.parametrize(
    "code", [CloseCode.PROTOCOL_ERROR, CloseCode.INVALID_PAYLOAD, CloseCode.MESSAGE_TOO_BIG]
)
def test_a_protocol_violation_the_transport_closed_is_reported_with_its_code(code: int) -> None:
    session = _session()
    assert session.transport_error(code, "bad frame") == []  # aiohttp wrote the close frame
    closed = _closed_event(session)
    assert (closed.code, closed.initiator) == (code, pb.CLOSE_INITIATOR_GATEWAY)


# -- limits ----------------------------------------------------------------------------


def test_message_size_at_the_limit_and_one_over() -> None:
    session = _session()
    assert _publish(session.client_frame(b"x" * 16, 0.0)).message.binary == b"x" * 16
    session.reply(Reply.ACKED, 0.0)
    assert session.client_frame("y" * 17, 0.0) == [
        Close(CloseCode.MESSAGE_TOO_BIG, "message too big")
    ]
    assert session.last_sequence == 1


def test_message_rate_at_the_burst_and_one_over() -> None:
    limits = SessionLimits(message_rate=1.0, message_burst=2)
    session = _session(limits, now=100.0)
    for i in range(2):
        _publish(session.client_frame(str(i), 100.0))
        session.reply(Reply.ACKED, 100.0)
    reason = "message rate exceeded (1/s, burst 2)"
    assert session.client_frame("over", 100.5) == [
        RATE_LIMITED,
        Close(CloseCode.POLICY_VIOLATION, reason),
    ]
    assert session.client_frame("again", 100.5) == []  # counted once, dropped while closing
    assert _closed_event(session).code == CloseCode.POLICY_VIOLATION


def test_the_bucket_refills_with_the_time_passed_in() -> None:
    session = _session(SessionLimits(message_rate=2.0, message_burst=1), now=0.0)
    _publish(session.client_frame("a", 0.0))
    session.reply(Reply.ACKED, 0.0)
    _publish(session.client_frame("b", 0.5))  # half a second: one token at 2/s


def test_auto_responses_answer_without_the_app() -> None:
    session = _session()
    assert session.client_frame("ping", 0.0) == [AUTO_RESPONSE, Write("pong")]
    assert session.last_sequence == 0


def test_idle_timeout_at_the_deadline_not_before_and_never_while_in_flight() -> None:
    session = _session(now=0.0)
    assert session.read_timeout(4.0) == pytest.approx(6.0)
    assert session.tick(9.999) == []
    session.client_frame("a", 9.999)
    assert session.tick(30.0)[:1] != [Close(CloseCode.GOING_AWAY, "idle timeout")]
    session.reply(Reply.ACKED, 30.0)  # the idle clock runs from when reading resumes
    assert session.tick(39.9) == []
    assert session.tick(40.0) == [Close(CloseCode.GOING_AWAY, "idle timeout")]
    assert session.read_timeout(41.0) == 10.0  # closing: a whole period for the handshake
    assert _closed_event(session).code == CloseCode.GOING_AWAY


def test_no_idle_limit_when_it_is_off() -> None:
    session = _session(SessionLimits(idle_timeout_s=0.0))
    assert session.read_timeout(0.0) is None
    assert session.tick(1e9) == []


# -- commands --------------------------------------------------------------------------


def _send(text: str, in_reply_to: int = 0) -> pb.GatewayCommand:
    return pb.GatewayCommand(send=pb.Message(text=text), in_reply_to=in_reply_to)


def test_commands_send_close_and_are_fenced() -> None:
    session = _session()
    assert session.command(_send("hi")) == [Write("hi"), MESSAGE_OUT]
    _publish(session.client_frame("a", 0.0))
    assert session.command(_send("reply", in_reply_to=1)) == [Write("reply"), MESSAGE_OUT]
    assert session.command(_send("from the future", in_reply_to=2)) == [Count("garbage", "command")]
    session.reply(Reply.ACKED, 1.0)
    assert session.command(_send("late copy", in_reply_to=1)) == [STALE]
    assert session.command(pb.GatewayCommand(send=pb.Message())) == [Count("garbage", "command")]
    close = pb.GatewayCommand(close=pb.CloseConnection(code=4000, reason="done"))
    assert session.command(close) == [Close(4000, "done")]
    assert session.command(_send("after")) == [UNKNOWN_CONNECTION]
    closed = _closed_event(session)
    assert (closed.code, closed.reason, closed.initiator) == (4000, "done", pb.CLOSE_INITIATOR_APP)
    assert session.command(_send("gone")) == [UNKNOWN_CONNECTION]


def test_messages_riding_an_ack_are_written_while_open_only() -> None:
    session = _session()
    messages = [pb.Message(text="a"), pb.Message(binary=b"b")]
    assert session.ack_messages(messages) == [Write("a"), MESSAGE_OUT, Write(b"b"), MESSAGE_OUT]
    session.close(CloseCode.GOING_AWAY, "")
    assert session.ack_messages(messages) == [Count("drops", "unknown_connection", 2)]


def test_empty_messages_keep_their_kind_and_a_message_of_no_kind_is_garbage() -> None:
    # A non-empty text is taken without asking the oneof; an empty one must still be a
    # text frame, an empty binary a binary one, and neither set no frame at all.
    session = _session()
    messages = [pb.Message(text=""), pb.Message(binary=b""), pb.Message(), pb.Message(text="t")]
    assert session.ack_messages(messages) == [
        Write(""),
        MESSAGE_OUT,
        Write(b""),
        MESSAGE_OUT,
        Count("garbage", "acks"),
        Write("t"),
        MESSAGE_OUT,
    ]
    assert [type(a.frame) for a in session.ack_messages(messages) if isinstance(a, Write)] == [
        str,
        bytes,
        str,
    ]


def test_commands_for_a_connection_still_upgrading_follow_the_decisions_messages() -> None:
    session = Session("node-abcdefgh_4", "/p", LIMITS)
    assert session.command(_send("broadcast 1")) == []
    assert session.command(_send("broadcast 2")) == []
    actions = session.opened(0.0, messages=[pb.Message(text="welcome")])
    assert [a for a in actions if isinstance(a, Write)] == [
        Write("welcome"),
        Write("broadcast 1"),
        Write("broadcast 2"),
    ]


def test_commands_kept_while_upgrading_at_the_bound_and_one_byte_over() -> None:
    command = _send("x" * 20)
    size = command.ByteSize()
    fits = Session("node-abcdefgh_5", "/p", SessionLimits(max_outbound_bytes=3 * size))
    over = Session("node-abcdefgh_6", "/p", SessionLimits(max_outbound_bytes=3 * size - 1))
    for _ in range(3):
        fits.command(command)
    results = [over.command(command) for _ in range(3)]
    assert results == [[], [], [SLOW_CONSUMER]]
    assert len([a for a in fits.opened(0.0) if isinstance(a, Write)]) == 3
    actions = over.opened(0.0)
    assert not any(isinstance(a, Write) for a in actions)
    assert Close(CloseCode.POLICY_VIOLATION, "slow consumer", True) in actions


def test_slow_consumer_and_shed_close_at_once() -> None:
    session = _session()
    assert session.slow_consumer() == [
        SLOW_CONSUMER,
        Close(CloseCode.POLICY_VIOLATION, "slow consumer", True),
    ]
    assert session.slow_consumer() == [SLOW_CONSUMER]
    # Shed even while closing: its queue is what holds the memory.
    assert session.shed("budget") == [Close(CloseCode.TRY_AGAIN_LATER, "budget", True)]
    assert _closed_event(session).code == CloseCode.POLICY_VIOLATION
    assert session.shed("budget") == []


# -- delivery policy -------------------------------------------------------------------


def test_redelivery_after_the_ack_deadline_with_the_same_sequence_marked() -> None:
    session = _session()
    first = _publish(session.client_frame("a", 0.0))
    assert session.ack_deadline == 5.0
    assert session.tick(4.999) == []
    again = _publish(session.tick(5.0))
    assert again is first
    assert (again.sequence, again.redelivered) == (1, True)
    assert session.ack_deadline == 10.0


def test_progress_acks_keep_a_slow_handler_alive() -> None:
    session = _session()
    _publish(session.client_frame("a", 0.0))
    for t in range(4, 60, 4):
        assert session.reply(Reply.PROGRESS, float(t)) == []
        assert session.tick(float(t) + 4.9) == []
    assert isinstance(session.reply(Reply.ACKED, 61.0)[0], Delivered)


def test_no_responders_backs_off_doubling_to_one_second() -> None:
    session = _session()
    _publish(session.client_frame("a", 0.0))
    now, waits = 0.0, []
    for _ in range(7):
        assert session.reply(Reply.NO_RESPONDERS, now) == []
        retry_at = session.retry_at
        assert retry_at is not None
        waits.append(round(retry_at - now, 3))
        assert session.tick(retry_at - 0.001) == []
        now = retry_at
        assert _publish(session.tick(now)).redelivered
    assert waits == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_given_up_after_the_delivery_timeout_closes_with_1013() -> None:
    session = _session()
    event = _publish(session.client_frame("a", 0.0))
    now = 0.0
    while True:
        now += 5.0
        actions = session.tick(now)
        if not any(isinstance(a, Publish) for a in actions):
            break
    assert now == 30.0
    assert actions == [
        GaveUp(event),
        Close(CloseCode.TRY_AGAIN_LATER, "no worker acknowledged the message"),
    ]
    assert not session.busy
    # The Closed event is still owed to the app, and gets its own delivery.
    closed = _publish(session.transport_closed(now))
    assert closed.closed.code == CloseCode.TRY_AGAIN_LATER


def test_a_given_up_closed_event_closes_nothing() -> None:
    session = _session()
    closed = _publish(session.transport_closed(0.0))
    assert session.give_up(1.0) == [GaveUp(closed)]


def test_the_object_host_first_then_the_queue_at_once() -> None:
    session = _session(worker="w-abcdefgh")
    actions = session.client_frame("a", 0.0)
    assert actions[-1] == Publish(actions[-1].event, "w-abcdefgh")  # type: ignore[union-attr]
    # The host did not take it (moved): to the queue, at once, marked.
    again = session.reply(Reply.RETRY, 0.1)
    assert [(p.worker, p.event.redelivered) for p in again] == [("", True)]  # type: ignore[union-attr]
    assert session.worker == ""
    # An ack names the host: the next event goes there.
    session.reply(Reply.ACKED, 0.2, worker="w-ijklmnop")
    assert session.client_frame("b", 0.3)[-1].worker == "w-ijklmnop"  # type: ignore[union-attr]
    # No ack in time from the host: to the queue at once, too.
    assert _publish(session.tick(5.3)).redelivered
    assert session.worker == ""
