"""Reading envelopes from NATS defensively (wsgate/envelopes.py): every genuine envelope is
taken, every one that breaks its contract is an InvalidEnvelope (never another exception),
and each bound is tested at its limit and just over it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsgate import envelopes, ids
from wsgate.config import MAX_PRESENCE_INTERVAL_S
from wsgate.errors import InvalidEnvelope
from wsgate.gateway.presence import lease_ms
from wsgate.v1 import envelope_pb2 as pb

GW = "node-abcdefgh"
CONN = f"{GW}_1"


def _event(**fields: Any) -> pb.ConnectionEvent:
    return pb.ConnectionEvent(**{"connection_id": CONN, "sequence": 1, "path": "/echo", **fields})


def _refused(read: Callable[..., object], message: Any, *args: Any) -> None:
    data = message if isinstance(message, bytes) else message.SerializeToString()
    with pytest.raises(InvalidEnvelope):
        read(data, *args)


#: Every reader, with the extra argument it takes (the ack's sequence).
READERS: list[tuple[Callable[..., object], tuple[Any, ...]]] = [
    (envelopes.read_connect_request, ()),
    (envelopes.read_event, ()),
    (envelopes.read_alarm_event, ()),
    (envelopes.read_replica, ()),
    (envelopes.read_connect_decision, ()),
    (envelopes.read_event_ack, (1,)),
    (envelopes.read_gateway_batch, ()),
    (envelopes.read_presence, ()),
    (envelopes.read_alarm_result, ()),
]


# 150 examples: about a second; derandomized, so CI runs the same ones every time.
@settings(max_examples=150, deadline=None, derandomize=True)
@given(data=st.binary(max_size=64), reader=st.sampled_from(READERS))
def test_any_bytes_are_an_envelope_or_invalid_never_another_error(
    data: bytes, reader: tuple[Callable[..., object], tuple[Any, ...]]
) -> None:
    read, args = reader
    with contextlib.suppress(InvalidEnvelope):
        read(data, *args)


@pytest.mark.parametrize(("read", "args"), READERS)
def test_the_empty_payload_is_refused_where_it_would_mean_anything(
    read: Callable[..., object], args: tuple[Any, ...]
) -> None:
    # b"" parses as every message type with every field at its default.
    if read is envelopes.read_alarm_result:
        assert read(b"") == pb.AlarmResult()  # ok=False: a failed alarm, which is safe
        return
    with pytest.raises(InvalidEnvelope):
        read(b"", *args)


def test_a_message_of_the_wrong_type_that_parses_is_refused() -> None:
    presence = pb.GatewayPresence(gateway_id=GW, lease_ms=10_000).SerializeToString()
    for read, args in READERS:
        if read in (envelopes.read_presence, envelopes.read_alarm_result):
            continue
        with pytest.raises(InvalidEnvelope):
            read(presence, *args)


# -- connection events ------------------------------------------------------------------


def test_a_genuine_event_is_taken() -> None:
    event = _event(message=pb.Message(text="hi"))
    assert envelopes.read_event(event.SerializeToString()) == event
    closed = _event(closed=pb.Closed(code=1006))
    assert envelopes.read_event(closed.SerializeToString()) == closed
    assert envelopes.read_event_and_gateway(closed.SerializeToString()) == (
        closed,
        ids.gateway_of(closed.connection_id),
    )


@pytest.mark.parametrize("sequence", [1, envelopes.MAX_SEQUENCE])
def test_event_sequences_at_their_limits_are_taken(sequence: int) -> None:
    envelopes.read_event(
        _event(sequence=sequence, message=pb.Message(binary=b"")).SerializeToString()
    )


@pytest.mark.parametrize("sequence", [0, envelopes.MAX_SEQUENCE + 1, 2**64 - 1])
def test_event_sequences_beyond_their_limits_are_refused(sequence: int) -> None:
    _refused(envelopes.read_event, _event(sequence=sequence, message=pb.Message(text="x")))


@pytest.mark.parametrize(
    "connection_id", ["", "x", f"{CONN}\n", f"{CONN} ", f"{GW}\n_1", "a" * 100_000, f"{GW}_1.x"]
)
def test_events_of_malformed_connection_ids_are_refused(connection_id: str) -> None:
    _refused(
        envelopes.read_event, _event(connection_id=connection_id, message=pb.Message(text="x"))
    )


def test_an_event_with_neither_message_nor_close_is_refused() -> None:
    _refused(envelopes.read_event, _event())
    _refused(envelopes.read_event, _event(message=pb.Message()))


@pytest.mark.parametrize(("code", "ok"), [(999, False), (1000, True), (4999, True), (5000, False)])
def test_close_codes_of_events_at_and_beyond_their_range(code: int, ok: bool) -> None:
    event = _event(closed=pb.Closed(code=code))
    if ok:
        envelopes.read_event(event.SerializeToString())
    else:
        _refused(envelopes.read_event, event)


def test_paths_at_and_over_their_limit() -> None:
    at_limit = "/" * envelopes.MAX_PATH_CHARS
    envelopes.read_event(_event(path=at_limit, message=pb.Message(text="x")).SerializeToString())
    envelopes.read_connect_request(
        pb.ConnectRequest(connection_id=CONN, path=at_limit).SerializeToString()
    )
    _refused(envelopes.read_event, _event(path=at_limit + "/", message=pb.Message(text="x")))
    _refused(
        envelopes.read_connect_request, pb.ConnectRequest(connection_id=CONN, path=at_limit + "/")
    )


# -- alarms, replicas, presence ------------------------------------------------------------


def test_alarm_events_need_a_namespace_and_a_firing_id_of_at_most_128_characters() -> None:
    def alarm(**fields: Any) -> pb.AlarmEvent:
        return pb.AlarmEvent(**{"namespace": "ns", "name": "n", "firing_id": "f", **fields})

    envelopes.read_alarm_event(alarm(firing_id="f" * 128).SerializeToString())
    _refused(envelopes.read_alarm_event, alarm(firing_id="f" * 129))
    _refused(envelopes.read_alarm_event, alarm(firing_id=""))
    _refused(envelopes.read_alarm_event, alarm(namespace=""))


def _replica(**fields: Any) -> pb.StateReplica:
    return pb.StateReplica(
        **{
            "replica_id": "state-0123456789ab",
            "address": "10.0.0.1:7070",
            "timeout_ms": 3000,
            **fields,
        }
    )


def test_a_genuine_replica_announcement_is_taken() -> None:
    for replica in (
        _replica(),
        _replica(address="[::1]:7070", leaving=True),
        _replica(replica_id="a" * 128),
    ):
        assert envelopes.read_replica(replica.SerializeToString()) == replica


@pytest.mark.parametrize(
    "fields",
    [
        {"replica_id": ""},
        {"replica_id": "state-1\n"},
        {"replica_id": "a" * 129},
        {"replica_id": "-a"},
        {"address": ""},
        {"address": "10.0.0.1"},
        {"address": "10.0.0.1:7070\n"},
        {"address": "10.0.0.1:7070 x"},
        {"address": "a" * 300 + ":1"},
        {"timeout_ms": 0},
        {"timeout_ms": envelopes.MAX_REPLICA_TIMEOUT_MS + 1},
    ],
    ids=repr,
)
def test_replica_announcements_out_of_their_contract_are_refused(fields: dict[str, Any]) -> None:
    _refused(envelopes.read_replica, _replica(**fields))


def test_the_longest_replica_timeout_is_taken() -> None:
    envelopes.read_replica(
        _replica(timeout_ms=envelopes.MAX_REPLICA_TIMEOUT_MS).SerializeToString()
    )


def test_presence_leases_at_and_over_their_limit() -> None:
    longest = pb.GatewayPresence(gateway_id=GW, lease_ms=envelopes.MAX_PRESENCE_LEASE_MS)
    assert envelopes.read_presence(longest.SerializeToString()) == longest
    # The longest presence interval a gateway takes announces exactly the longest lease.
    assert lease_ms(MAX_PRESENCE_INTERVAL_S) == envelopes.MAX_PRESENCE_LEASE_MS
    _refused(
        envelopes.read_presence,
        pb.GatewayPresence(gateway_id=GW, lease_ms=envelopes.MAX_PRESENCE_LEASE_MS + 1),
    )
    _refused(envelopes.read_presence, pb.GatewayPresence(gateway_id=GW, lease_ms=0))
    envelopes.read_presence(pb.GatewayPresence(gateway_id=GW, leaving=True).SerializeToString())
    _refused(envelopes.read_presence, pb.GatewayPresence(gateway_id=GW + "\n", lease_ms=1))


# -- what gateways take --------------------------------------------------------------------


def test_genuine_decisions_are_taken() -> None:
    accept = pb.ConnectDecision(accept=pb.Accept(messages=[pb.Message(text="hi")]))
    assert envelopes.read_connect_decision(accept.SerializeToString()) == accept
    reject = pb.ConnectDecision(
        reject=pb.Reject(status=401, headers=[pb.Header(name="WWW-Authenticate", value="Bearer")])
    )
    assert envelopes.read_connect_decision(reject.SerializeToString()) == reject


@pytest.mark.parametrize(
    "decision",
    [
        pb.ConnectDecision(reject=pb.Reject(status=399)),
        pb.ConnectDecision(reject=pb.Reject(status=600)),
        pb.ConnectDecision(reject=pb.Reject(status=0)),
        pb.ConnectDecision(
            reject=pb.Reject(status=400, headers=[pb.Header(name="X", value="a\r\nSet-Cookie: x")])
        ),
        pb.ConnectDecision(
            reject=pb.Reject(status=400, headers=[pb.Header(name="X\n", value="a")])
        ),
        pb.ConnectDecision(reject=pb.Reject(status=400, headers=[pb.Header(name="", value="a")])),
        pb.ConnectDecision(
            reject=pb.Reject(status=400, headers=[pb.Header(name="X: y", value="a")])
        ),
        pb.ConnectDecision(accept=pb.Accept(messages=[pb.Message()])),
    ],
    ids=str,
)
def test_decisions_out_of_their_contract_are_refused(decision: pb.ConnectDecision) -> None:
    _refused(envelopes.read_connect_decision, decision)


def test_reject_statuses_at_their_limits_are_taken() -> None:
    for status in (400, 599):
        envelopes.read_connect_decision(
            pb.ConnectDecision(reject=pb.Reject(status=status)).SerializeToString()
        )


def test_progress_and_retry_acks_must_name_their_subjects_sequence() -> None:
    progress = pb.EventAck(sequence=7, in_progress=True)
    assert envelopes.read_event_ack(progress.SerializeToString(), 7) == progress
    _refused(envelopes.read_event_ack, progress, 8)
    _refused(envelopes.read_event_ack, pb.EventAck(sequence=7, in_progress=True, retry=True), 7)


def test_final_acks_that_no_worker_sends_are_told_from_late_ones() -> None:
    assert envelopes.final_ack_problem(pb.EventAck(connection_id=CONN, sequence=3)) is None
    for ack in (
        pb.EventAck(connection_id=CONN, sequence=0),
        pb.EventAck(connection_id=CONN, sequence=2**63),
        pb.EventAck(connection_id=CONN + "\n", sequence=1),
        pb.EventAck(connection_id=CONN, sequence=1, in_progress=True),
        pb.EventAck(connection_id=CONN, sequence=1, retry=True),
    ):
        assert envelopes.final_ack_problem(ack) is not None


def test_commands_need_connections_and_an_action_that_can_be_carried_out() -> None:
    send = pb.GatewayCommand(connection_ids=[CONN], send=pb.Message(text="x"))
    assert envelopes.check_command(send) == send
    close = pb.GatewayCommand(
        connection_ids=[CONN], close=pb.CloseConnection(code=4999, reason="r" * 123)
    )
    assert envelopes.check_command(close) == close
    for bad in (
        pb.GatewayCommand(connection_ids=[CONN]),
        pb.GatewayCommand(send=pb.Message(text="x")),
        pb.GatewayCommand(connection_ids=[CONN], send=pb.Message()),
        pb.GatewayCommand(connection_ids=[CONN], close=pb.CloseConnection(code=1006)),
        pb.GatewayCommand(connection_ids=[CONN], close=pb.CloseConnection(code=5000)),
        pb.GatewayCommand(
            connection_ids=[CONN], close=pb.CloseConnection(code=1000, reason="r" * 124)
        ),
    ):
        with pytest.raises(InvalidEnvelope):
            envelopes.check_command(bad)


def test_a_gateway_batch_holds_at_least_one_item() -> None:
    item = pb.GatewayItem(ack=pb.EventAck(connection_id=CONN, sequence=1))
    batch = pb.GatewayBatch(items=[item])
    assert envelopes.read_gateway_batch(batch.SerializeToString()) == batch
    _refused(envelopes.read_gateway_batch, pb.GatewayBatch())
    _refused(envelopes.read_gateway_batch, b"\xff\x00 not a batch")
