"""Work: the hops a forwarded request counts, whether a request may have run before
(redelivered, forwarded, a retried alarm), the key its turn is recorded under, and its
``done`` future."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg

from wsgate import subjects
from wsgate.v1 import envelope_pb2 as pb
from wsgate.worker.work import HOPS_HEADER, MAX_HOPS, Work, WorkKind, hops_of

CONNECTION = "gw-abcdefgh.c1"
PARAMS = {"room": "lobby"}


def msg(headers: dict[str, str] | None = None) -> Msg:
    return Msg(
        _client=None,  # type: ignore[arg-type]
        subject="wsgate.events.chat",
        reply="_INBOX.reply",
        data=b"",
        headers=headers,
    )


def hops(value: str) -> Msg:
    return msg({HOPS_HEADER: value})


def event(*, redelivered: bool = False, sequence: int = 3) -> pb.ConnectionEvent:
    return pb.ConnectionEvent(
        connection_id=CONNECTION,
        sequence=sequence,
        redelivered=redelivered,
        message=pb.Message(text="hi"),
    )


def alarm(*, retry_count: int = 0) -> pb.AlarmEvent:
    return pb.AlarmEvent(
        namespace="room", name="lobby", scheduled_ms=1_000, retry_count=retry_count, firing_id="f-1"
    )


# -- hops_of -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (None, 0),
        ({}, 0),
        ({"Other": "7"}, 0),  # the header is absent
        ({HOPS_HEADER: "0"}, 0),
        ({HOPS_HEADER: "1"}, 1),
        ({HOPS_HEADER: "3", "Other": "x"}, 3),
        ({HOPS_HEADER: str(MAX_HOPS + 5)}, MAX_HOPS + 5),  # counted as is, not capped
        ({HOPS_HEADER: " 2 "}, 2),
        ({HOPS_HEADER: "-3"}, 0),  # never below zero
        ({HOPS_HEADER: "garbage"}, MAX_HOPS),
        ({HOPS_HEADER: ""}, MAX_HOPS),
        ({HOPS_HEADER: "1.5"}, MAX_HOPS),
        ({HOPS_HEADER: "0x2"}, MAX_HOPS),
    ],
)
def test_hops_of(headers: dict[str, str] | None, expected: int) -> None:
    assert hops_of(msg(headers)) == expected


def test_work_kinds_name_their_subject_tokens() -> None:
    assert [kind.value for kind in WorkKind] == ["connect", "events", "alarm", "call", "request"]
    assert {kind.value for kind in WorkKind} == set(subjects.WORKER_SUBJECT_KINDS)


# -- for_call ----------------------------------------------------------------------------


def call(*, retried: bool = False) -> pb.ObjectCall:
    return pb.ObjectCall(
        object=pb.ObjectRef(namespace="Counter", name="a"),
        method="add",
        call_id="c-1",
        retried=retried,
    )


async def test_a_call_is_keyed_by_its_id_and_retried_when_marked_or_forwarded() -> None:
    first = Work.for_call(msg(), call())
    assert (first.kind, first.key, first.sequence, first.retried, first.hops) == (
        WorkKind.CALL,
        "call:c-1",
        0,
        False,
        0,
    )
    assert first.call is not None
    assert first.call.method == "add"
    assert Work.for_call(msg(), call(retried=True)).retried
    forwarded = Work.for_call(hops("1"), call())
    assert forwarded.retried
    assert forwarded.hops == 1


# -- for_event ---------------------------------------------------------------------------


async def test_a_first_delivery_straight_from_the_gateway_is_not_retried() -> None:
    message = msg()
    the_event = event(sequence=7)
    work = Work.for_event(message, the_event, PARAMS)
    assert work.kind is WorkKind.EVENT
    assert work.msg is message
    assert work.key == CONNECTION
    assert work.sequence == 7
    assert (work.retried, work.hops) == (False, 0)
    assert work.params == PARAMS
    assert work.event is the_event
    assert (work.connect, work.alarm) == (None, None)


@pytest.mark.parametrize(
    ("redelivered", "hops_header", "retried", "hop_count"),
    [
        (False, None, False, 0),
        (True, None, True, 0),
        (False, "0", False, 0),
        (False, "1", True, 1),
        (True, "2", True, 2),
        (False, "garbage", True, MAX_HOPS),
    ],
)
async def test_an_event_is_retried_when_redelivered_or_forwarded(
    redelivered: bool, hops_header: str | None, retried: bool, hop_count: int
) -> None:
    message = msg() if hops_header is None else hops(hops_header)
    work = Work.for_event(message, event(redelivered=redelivered), PARAMS)
    assert (work.retried, work.hops) == (retried, hop_count)


# -- for_connect -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hops_header", "retried", "hop_count"),
    [(None, False, 0), ("0", False, 0), ("1", True, 1), ("x", True, MAX_HOPS)],
)
async def test_a_connect_is_retried_only_when_forwarded(
    hops_header: str | None, retried: bool, hop_count: int
) -> None:
    request = pb.ConnectRequest(connection_id=CONNECTION, path="/chat/lobby")
    message = msg() if hops_header is None else hops(hops_header)
    work = Work.for_connect(message, request, PARAMS)
    assert work.kind is WorkKind.CONNECT
    assert work.key == CONNECTION
    assert work.sequence == 0
    assert (work.retried, work.hops) == (retried, hop_count)
    assert work.connect is request
    assert (work.event, work.alarm) == (None, None)
    assert work.params == PARAMS


# -- for_alarm ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_count", "hops_header", "retried", "hop_count"),
    [
        (0, None, False, 0),
        (1, None, True, 0),
        (5, None, True, 0),
        (0, "1", True, 1),
        (2, "3", True, 3),
        (0, "-1", False, 0),
    ],
)
async def test_an_alarm_is_retried_when_retried_or_forwarded(
    retry_count: int, hops_header: str | None, retried: bool, hop_count: int
) -> None:
    the_alarm = alarm(retry_count=retry_count)
    message = msg() if hops_header is None else hops(hops_header)
    work = Work.for_alarm(message, the_alarm)
    assert work.kind is WorkKind.ALARM
    assert work.key == "alarm:f-1"
    assert work.sequence == 0
    assert (work.retried, work.hops) == (retried, hop_count)
    assert work.alarm is the_alarm
    assert work.params == {}
    assert (work.connect, work.event) == (None, None)


# -- done --------------------------------------------------------------------------------


async def test_finish_resolves_done_once() -> None:
    work = Work.for_event(msg(), event(), PARAMS)
    assert not work.done.done()
    work.finish()
    assert work.done.done()
    assert work.done.result() is None
    work.finish()  # idempotent
    await work.done


async def test_each_work_has_its_own_future_and_identity() -> None:
    first = Work.for_event(msg(), event(), PARAMS)
    second = Work.for_event(msg(), event(), PARAMS)
    assert first.done is not second.done
    assert first != second  # compared by identity: two copies of one event are two works
    first.finish()
    assert not second.done.done()


def test_work_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError):
        Work.for_event(msg(), event(), PARAMS)


# -- for_request -------------------------------------------------------------------------


async def test_an_http_request_is_keyed_by_its_id_with_its_route_params() -> None:
    request = pb.HttpRequest(request_id="r-1", method="GET", path="/room/lobby")
    first = Work.for_request(msg(), request, PARAMS)
    assert (first.kind, first.key, first.sequence, first.retried) == (
        WorkKind.REQUEST,
        "request:r-1",
        0,
        False,
    )
    assert first.params == PARAMS
    assert first.http_request is request
    assert Work.for_request(hops("2"), request, PARAMS).retried
