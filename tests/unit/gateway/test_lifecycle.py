"""The gateway's per-connection bookkeeping, driven with no sockets."""

from __future__ import annotations

import pytest

from wsgate.closecodes import CloseCode
from wsgate.gateway.lifecycle import ConnectionLifecycle, Phase
from wsgate.v1 import envelope_pb2 as pb


def _lifecycle() -> ConnectionLifecycle:
    return ConnectionLifecycle("node-abcdefgh_1", "/chat/x")


def test_events_are_numbered_from_one_and_carry_the_path() -> None:
    life = _lifecycle()
    events = [life.message_event(pb.Message(text=str(i))) for i in range(3)]
    assert [e.sequence for e in events] == [1, 2, 3]
    assert {e.path for e in events} == {"/chat/x"}
    assert {e.WhichOneof("kind") for e in events} == {"message"}
    assert not any(e.redelivered for e in events)


def test_closed_comes_once_and_last() -> None:
    life = _lifecycle()
    life.message_event(pb.Message(binary=b"x"))
    closed = life.closed_event()
    assert closed is not None
    assert closed.sequence == 2
    assert closed.WhichOneof("kind") == "closed"
    assert life.closed_event() is None
    with pytest.raises(RuntimeError):
        life.message_event(pb.Message(text="late"))


def test_first_close_request_wins() -> None:
    life = _lifecycle()
    assert life.request_close(pb.CLOSE_INITIATOR_APP, 4000, "kicked")
    assert life.phase is Phase.CLOSING
    assert not life.request_close(pb.CLOSE_INITIATOR_CLIENT, 1000, "bye")
    closed = life.closed_event()
    assert closed is not None
    assert (closed.closed.code, closed.closed.reason) == (4000, "kicked")
    assert closed.closed.initiator == pb.CLOSE_INITIATOR_APP


def test_a_broken_transport_reports_1006_with_no_initiator() -> None:
    closed = _lifecycle().closed_event()
    assert closed is not None
    assert closed.closed.code == CloseCode.ABNORMAL
    assert closed.closed.initiator == pb.CLOSE_INITIATOR_UNSPECIFIED


def test_no_close_request_after_closed() -> None:
    life = _lifecycle()
    life.closed_event()
    assert not life.request_close(pb.CLOSE_INITIATOR_CLIENT, 1000)
