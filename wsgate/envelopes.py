"""Reading the envelopes taken from NATS, defensively.

Anything may arrive on a subject: bytes that are no protobuf at all, a protobuf of another
type that happens to parse (most short byte strings parse as *some* message, the empty
string as every one), fields out of range. Each ``read_*`` function returns the envelope
when it keeps its contract (``proto/wsgate/v1/envelope.proto``) and raises
:class:`~wsgate.errors.InvalidEnvelope` otherwise; the role that took the message counts
it in its ``garbage`` metric, labelled by the kind of subject, and drops it. A request
that expects an answer gets the protocol's error answer where it has one (a connect
request a 400 rejection, an alarm a failed result).

What is checked is what a role could be hurt by or could never have been sent by a
well-behaved peer: ids that are not ids, sequence numbers outside 1..2**63-1 (the storage
keeps them as 64-bit signed integers), close codes outside 1000-4999, messages with
neither text nor binary, reply headers that would break the HTTP response, leases and
timeouts that are zero or beyond any configuration. A well-formed envelope is taken as it
is: who may publish on which subject is NATS' permissions' business, not this module's.

Pure functions, no I/O, cheap enough for every message.
"""

from __future__ import annotations

import re
from typing import TypeVar

from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage

from wsgate import ids
from wsgate.calls import MAX_CALL_DEPTH, MAX_METHOD_CHARS
from wsgate.closecodes import MAX_REASON_BYTES, is_sendable
from wsgate.config import MAX_REPLICA_TIMEOUT_S, is_host_port, is_replica_id
from wsgate.errors import InvalidConnectionId, InvalidEnvelope
from wsgate.v1 import envelope_pb2 as pb

M = TypeVar("M", bound=ProtoMessage)

#: The largest sequence number: storage keeps (connection, sequence) keys as signed 64-bit
#: integers. A gateway starts at 1 and adds one per event, so it never comes close.
MAX_SEQUENCE = 2**63 - 1
#: The longest request path an envelope may carry: the gateway's HTTP parser takes request
#: lines of at most 8190 bytes, so no real upgrade has a longer one.
MAX_PATH_CHARS = 8192
#: Close codes a ``Closed`` event may report: those sent (1000-1014, 3000-4999) and those
#: only reported (1005, 1006, 1015).
MIN_CLOSE_CODE = 1000
MAX_CLOSE_CODE = 4999
#: The longest alarm firing id (the state service draws 32 hex digits).
MAX_FIRING_ID_CHARS = 128
#: A call's or an HTTP request's id (a caller makes 32 hex digits).
MAX_CALL_ID_CHARS = 128
#: An HTTP method's name (the longest standard one has 7 letters).
MAX_METHOD_NAME_CHARS = 32
#: The longest gateway lease a presence announcement may carry: an hour (a gateway's
#: presence interval is at most MAX_PRESENCE_INTERVAL_S, 720 s, its lease 5 intervals).
#: Without a bound, one announcement of 49 days would stretch the grace lease of every
#: gateway not yet heard from to 49 days (the grace is the longest lease heard).
MAX_PRESENCE_LEASE_MS = 3_600_000
#: The longest timeout a state replica's announcement may carry (the most
#: ``WSGATE_STATE_REPLICA_TIMEOUT_S`` takes).
MAX_REPLICA_TIMEOUT_MS = round(MAX_REPLICA_TIMEOUT_S * 1000)
#: The longest replica address (host:port; a DNS name is at most 253 characters).
MAX_ADDRESS_CHARS = 300

#: An HTTP header name (RFC 9110 5.1: a token) ...
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: ... and what its value must not hold (a CR or LF would split the response: RFC 9110 5.5).
_HEADER_VALUE_FORBIDDEN = re.compile(r"[\r\n\x00]")


def parse(cls: type[M], data: bytes) -> M:
    """``cls`` parsed from ``data``; raises InvalidEnvelope if it does not parse."""
    try:
        return cls.FromString(data)
    except DecodeError as exc:
        raise InvalidEnvelope(cls.DESCRIPTOR.name, f"does not parse ({len(data)} bytes)") from exc


def check_sequence(envelope: str, sequence: int) -> None:
    """Raise InvalidEnvelope unless ``1 <= sequence <= MAX_SEQUENCE``."""
    if not 1 <= sequence <= MAX_SEQUENCE:
        raise InvalidEnvelope(envelope, f"sequence {sequence} is outside 1..2**63-1")


def check_connection_id(envelope: str, connection_id: str) -> str:
    """The gateway of ``connection_id``; raises InvalidEnvelope for a malformed id."""
    try:
        return ids.gateway_of(connection_id)
    except InvalidConnectionId as exc:
        raise InvalidEnvelope(envelope, str(exc)) from exc


def check_message(envelope: str, message: pb.Message) -> None:
    """Raise InvalidEnvelope unless ``message`` is text or binary."""
    if message.WhichOneof("data") is None:
        raise InvalidEnvelope(envelope, "a message with neither text nor binary")


def _check_path(envelope: str, path: str) -> None:
    if len(path) > MAX_PATH_CHARS:
        raise InvalidEnvelope(envelope, f"a path of {len(path)} characters")


# -- what workers take ------------------------------------------------------------------


def read_connect_request(data: bytes) -> pb.ConnectRequest:
    """A gateway's ConnectRequest (worker: connect subjects)."""
    request = parse(pb.ConnectRequest, data)
    check_connection_id("ConnectRequest", request.connection_id)
    _check_path("ConnectRequest", request.path)
    return request


def read_event(data: bytes) -> pb.ConnectionEvent:
    """A gateway's ConnectionEvent (worker: events subjects)."""
    return read_event_and_gateway(data)[0]


def read_event_and_gateway(data: bytes) -> tuple[pb.ConnectionEvent, str]:
    """:func:`read_event`, and the id of the gateway its connection id names (checked
    here already: the worker needs it for every event, and need not parse it again)."""
    event = parse(pb.ConnectionEvent, data)
    gateway_id = check_connection_id("ConnectionEvent", event.connection_id)
    check_sequence("ConnectionEvent", event.sequence)
    _check_path("ConnectionEvent", event.path)
    kind = event.WhichOneof("kind")
    if kind == "message":
        check_message("ConnectionEvent", event.message)
    elif kind == "closed":
        if not MIN_CLOSE_CODE <= event.closed.code <= MAX_CLOSE_CODE:
            raise InvalidEnvelope("ConnectionEvent", f"close code {event.closed.code}")
    else:
        raise InvalidEnvelope("ConnectionEvent", "neither a message nor a close")
    return event, gateway_id


def read_alarm_event(data: bytes) -> pb.AlarmEvent:
    """The state service's AlarmEvent (worker: alarm subjects)."""
    event = parse(pb.AlarmEvent, data)
    if not event.namespace:
        raise InvalidEnvelope("AlarmEvent", "no namespace")
    if not 0 < len(event.firing_id) <= MAX_FIRING_ID_CHARS:
        raise InvalidEnvelope("AlarmEvent", f"a firing id of {len(event.firing_id)} characters")
    return event


def read_object_call(data: bytes) -> pb.ObjectCall:
    """A call of a durable object's method (worker: call subjects). Its arguments are read
    by the object's host (:func:`wsgate.calls.decode_arguments`)."""
    call = parse(pb.ObjectCall, data)
    if not call.object.namespace:
        raise InvalidEnvelope("ObjectCall", "no namespace")
    if not 0 < len(call.call_id) <= MAX_CALL_ID_CHARS:
        raise InvalidEnvelope("ObjectCall", f"a call id of {len(call.call_id)} characters")
    if len(call.chain) > MAX_CALL_DEPTH:
        raise InvalidEnvelope("ObjectCall", f"a chain of {len(call.chain)} calls")
    if not call.method or len(call.method) > MAX_METHOD_CHARS:
        raise InvalidEnvelope("ObjectCall", f"a method name of {len(call.method)} characters")
    return call


def read_http_request(data: bytes) -> pb.HttpRequest:
    """A gateway's plain HTTP request (worker: request subjects)."""
    request = parse(pb.HttpRequest, data)
    if not 0 < len(request.request_id) <= MAX_CALL_ID_CHARS:
        raise InvalidEnvelope(
            "HttpRequest", f"a request id of {len(request.request_id)} characters"
        )
    if not request.method or len(request.method) > MAX_METHOD_NAME_CHARS:
        raise InvalidEnvelope("HttpRequest", f"a method of {len(request.method)} characters")
    _check_path("HttpRequest", request.path)
    return request


def read_http_response(data: bytes) -> pb.HttpResponse:
    """A worker's answer to an HttpRequest (gateway: the request's reply inbox)."""
    response = parse(pb.HttpResponse, data)
    if not 100 <= response.status <= 599:
        raise InvalidEnvelope("HttpResponse", f"status {response.status}")
    return response


def read_replica(data: bytes) -> pb.StateReplica:
    """A state replica's announcement (workers and replicas: the replicas subject)."""
    replica = parse(pb.StateReplica, data)
    if not is_replica_id(replica.replica_id):
        raise InvalidEnvelope("StateReplica", f"replica id {replica.replica_id[:80]!r}")
    if len(replica.address) > MAX_ADDRESS_CHARS or not is_host_port(replica.address):
        raise InvalidEnvelope("StateReplica", f"address {replica.address[:80]!r}")
    if not 0 < replica.timeout_ms <= MAX_REPLICA_TIMEOUT_MS:
        raise InvalidEnvelope("StateReplica", f"timeout of {replica.timeout_ms} ms")
    return replica


# -- what gateways take -----------------------------------------------------------------


def read_connect_decision(data: bytes) -> pb.ConnectDecision:
    """A worker's answer to a ConnectRequest (gateway: the request's reply inbox)."""
    decision = parse(pb.ConnectDecision, data)
    outcome = decision.WhichOneof("outcome")
    if outcome == "accept":
        for message in decision.accept.messages:
            check_message("ConnectDecision", message)
    elif outcome == "reject":
        reject = decision.reject
        if not 400 <= reject.status <= 599:
            raise InvalidEnvelope("ConnectDecision", f"a rejection with status {reject.status}")
        for header in reject.headers:
            if not _HEADER_NAME.fullmatch(header.name) or _HEADER_VALUE_FORBIDDEN.search(
                header.value
            ):
                raise InvalidEnvelope("ConnectDecision", f"header {header.name[:80]!r}")
    else:
        raise InvalidEnvelope("ConnectDecision", "neither accept nor reject")
    return decision


def read_event_ack(data: bytes, sequence: int) -> pb.EventAck:
    """A worker's EventAck on the reply subject of event ``sequence`` (gateway: its ack
    subjects): a progress ack or a retry. (A final ack comes in a GatewayBatch; one found
    here, from no current worker, is taken as one all the same.)"""
    ack = parse(pb.EventAck, data)
    if ack.sequence != sequence:
        raise InvalidEnvelope("EventAck", f"sequence {ack.sequence} on the subject of {sequence}")
    if ack.in_progress and ack.retry:
        raise InvalidEnvelope("EventAck", "both in progress and retry")
    return ack


def read_gateway_batch(data: bytes) -> pb.GatewayBatch:
    """A GatewayBatch of final acks and commands (gateway: its command subject). Its items
    are checked one by one as the gateway takes them, so that one bad item costs only
    itself: a command by :func:`check_command`; a final ack only if it matches no event the
    gateway waits for (:func:`final_ack_problem`), so the common case costs a dictionary
    lookup and no more."""
    batch = parse(pb.GatewayBatch, data)
    if not batch.items:
        raise InvalidEnvelope("GatewayBatch", "no items")
    return batch


def final_ack_problem(ack: pb.EventAck) -> str | None:
    """What makes ``ack`` (a GatewayBatch's) garbage rather than merely late, or None."""
    if ack.in_progress or ack.retry:
        return "a progress or retry ack among final acks"
    if not 1 <= ack.sequence <= MAX_SEQUENCE:
        return f"sequence {ack.sequence}"
    try:
        ids.gateway_of(ack.connection_id)
    except InvalidConnectionId:
        return "a malformed connection id"
    return None


def check_command(command: pb.GatewayCommand) -> pb.GatewayCommand:
    """``command`` (a GatewayBatch's item) if it can be carried out; raises InvalidEnvelope."""
    if not command.connection_ids:
        raise InvalidEnvelope("GatewayCommand", "no connection ids")
    action = command.WhichOneof("action")
    if action == "send":
        check_message("GatewayCommand", command.send)
    elif action == "close":
        close = command.close
        # The worker SDK refuses these before sending; so does the gateway, on the wire.
        if not is_sendable(close.code):
            raise InvalidEnvelope("GatewayCommand", f"close code {close.code}")
        if len(close.reason.encode("utf-8")) > MAX_REASON_BYTES:
            raise InvalidEnvelope("GatewayCommand", "a close reason over 123 bytes")
    else:
        raise InvalidEnvelope("GatewayCommand", "no action")
    return command


# -- what state services take -------------------------------------------------------------


def read_presence(data: bytes) -> pb.GatewayPresence:
    """A gateway's presence announcement (state service: the presence subject)."""
    presence = parse(pb.GatewayPresence, data)
    if not ids.is_gateway_id(presence.gateway_id):
        raise InvalidEnvelope("GatewayPresence", f"gateway id {presence.gateway_id[:80]!r}")
    if not presence.leaving and not 0 < presence.lease_ms <= MAX_PRESENCE_LEASE_MS:
        raise InvalidEnvelope("GatewayPresence", f"a lease of {presence.lease_ms} ms")
    return presence


def read_alarm_result(data: bytes) -> pb.AlarmResult:
    """A worker's answer to an AlarmEvent (state service: the request's reply inbox)."""
    return parse(pb.AlarmResult, data)
