"""The session's events are encoded by hand (gateway/session.py, Event.encode): byte for
byte what protobuf's own SerializeToString makes of the same ConnectionEvent, for any
field values, drawn by hypothesis from the message's descriptor."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.protobuf_strategies import messages
from wsgate.gateway.session import Event, Reply, Session, SessionLimits
from wsgate.v1 import envelope_pb2 as pb

_STRINGS = st.text(max_size=40) | st.sampled_from(["", "edge-1-abcd1234_1", "/room/a", "é\u2028"])


def _event(proto: pb.ConnectionEvent) -> Event:
    """``proto``'s fields in an Event (each connection's encoded fields made here, not
    taken from a session)."""
    kind = proto.WhichOneof("kind")
    if kind == "closed":
        event = Event(proto.connection_id, proto.sequence, proto.path, closed=proto.closed)
    else:
        message = proto.message
        data: str | bytes = (
            message.binary if message.WhichOneof("data") == "binary" else message.text
        )
        event = Event(proto.connection_id, proto.sequence, proto.path, data=data)
    event.redelivered = proto.redelivered
    event.ack_wait_ms = proto.ack_wait_ms
    return event


@st.composite
def _connection_events(draw: st.DrawFn) -> pb.ConnectionEvent:
    proto = draw(messages(pb.ConnectionEvent.DESCRIPTOR, _STRINGS))
    assert isinstance(proto, pb.ConnectionEvent)
    if proto.WhichOneof("kind") is None:
        proto.message.text = ""  # an event is a message or a close: one of the two is set
    elif proto.WhichOneof("kind") == "message" and proto.message.WhichOneof("data") is None:
        proto.message.binary = b""  # and a message is text or binary
    return proto


@settings(max_examples=300, deadline=None)
@given(_connection_events())
def test_an_event_encodes_as_protobuf_encodes_it(proto: pb.ConnectionEvent) -> None:
    event = _event(proto)
    assert event.to_proto() == proto
    assert event.encode() == proto.SerializeToString()


@settings(max_examples=100, deadline=None)
@given(
    st.text(min_size=1, max_size=30),
    st.text(max_size=30),
    st.lists(st.text(max_size=300) | st.binary(max_size=300), min_size=1, max_size=4),
)
def test_a_sessions_events_encode_as_protobuf_encodes_them(
    connection_id: str, path: str, frames: list[str | bytes]
) -> None:
    # The connection's fields are encoded once, at its first event, and reused.
    session = Session(connection_id, path, SessionLimits(ack_timeout_s=2.5))
    session.opened(0.0)
    for sequence, frame in enumerate(frames, 1):
        session.client_frame(frame, 0.0)
        event = session.in_flight
        assert event is not None
        expected = pb.ConnectionEvent(
            connection_id=connection_id, sequence=sequence, path=path, ack_wait_ms=2500
        )
        if isinstance(frame, str):
            expected.message.text = frame
        else:
            expected.message.binary = frame
        assert event.encode() == expected.SerializeToString()
        if sequence == 1:
            event.redelivered = True
            expected.redelivered = True
            assert event.encode() == expected.SerializeToString()
        session.reply(Reply.ACKED, 0.0)
    session.transport_closed(0.0)
    closed = session.in_flight
    assert closed is not None
    assert closed.encode() == closed.to_proto().SerializeToString()
    assert pb.ConnectionEvent.FromString(closed.encode()).closed.code == 1006
