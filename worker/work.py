"""One request for a durable object, as it travels to the object's activation.

A connect request, a connection event, an alarm, a call of one of its methods or a plain
HTTP request to one of its routes, with the NATS message it came in (its reply subject is
where the answer goes, whichever worker answers). The worker that took it from NATS waits
on :attr:`Work.done` (and keeps the gateway's ack wait alive with progress acks
meanwhile); whoever finishes with it (the activation that answered, or the worker that
forwarded it to the activation's host) resolves it.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from nats.aio.msg import Msg

from wsgate.calls import CALL_KEY_PREFIX
from wsgate.v1 import envelope_pb2 as pb
from wsgate.worker.auth import Verified

#: The NATS header counting how often a message was forwarded between workers.
HOPS_HEADER = "Wsgate-Hops"

#: The turn of an HTTP request is recorded under this prefix and the request's id.
REQUEST_KEY_PREFIX = "request:"

#: Beyond this many forwards a request is given back (retried through the queue), so a
#: view of who holds an object that changes under the request can never make it loop.
MAX_HOPS = 4


class WorkKind(enum.Enum):
    """The kinds of request; the value is the token of the worker subject they go to."""

    CONNECT = "connect"
    EVENT = "events"
    ALARM = "alarm"
    CALL = "call"
    REQUEST = "request"


def _new_future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class Work:
    """A request for an object's activation."""

    kind: WorkKind
    msg: Msg
    #: The key its turn is recorded under: the connection id, ``alarm:<firing id>``,
    #: ``call:<call id>`` or ``request:<request id>``.
    key: str
    #: The event's sequence on its connection (0 for a connect or an alarm).
    sequence: int
    #: It may have been handled before (a redelivery, a retried alarm, a forward): look up
    #: the record of its turn before running it again.
    retried: bool
    hops: int
    #: The route's path parameters (empty for an alarm).
    params: Mapping[str, str] = field(default_factory=dict)
    connect: pb.ConnectRequest | None = None
    event: pb.ConnectionEvent | None = None
    alarm: pb.AlarmEvent | None = None
    call: pb.ObjectCall | None = None
    http_request: pb.HttpRequest | None = None
    #: A connect its route's authenticator passed (never carried by a forward: the host
    #: verifies again).
    verified: Verified | None = None
    done: asyncio.Future[None] = field(default_factory=_new_future)

    @classmethod
    def for_connect(
        cls,
        msg: Msg,
        request: pb.ConnectRequest,
        params: Mapping[str, str],
        verified: Verified | None = None,
    ) -> Work:
        """A connect request (a turn keyed by the connection id, sequence 0), with what
        its route's authenticator verified, if it has one."""
        hops = hops_of(msg)
        return cls(
            WorkKind.CONNECT,
            msg,
            request.connection_id,
            0,
            hops > 0,
            hops,
            params=params,
            connect=request,
            verified=verified,
        )

    @classmethod
    def for_event(cls, msg: Msg, event: pb.ConnectionEvent, params: Mapping[str, str]) -> Work:
        """A connection event (message or close)."""
        hops = hops_of(msg)
        return cls(
            WorkKind.EVENT,
            msg,
            event.connection_id,
            event.sequence,
            event.redelivered or hops > 0,
            hops,
            params=params,
            event=event,
        )

    @classmethod
    def for_alarm(cls, msg: Msg, alarm: pb.AlarmEvent) -> Work:
        """An alarm firing (keyed by its firing id, so a retry of a committed firing is
        answered from its record)."""
        hops = hops_of(msg)
        return cls(
            WorkKind.ALARM,
            msg,
            f"alarm:{alarm.firing_id}",
            0,
            alarm.retry_count > 0 or hops > 0,
            hops,
            alarm=alarm,
        )

    @classmethod
    def for_call(cls, msg: Msg, call: pb.ObjectCall) -> Work:
        """A call of one of the object's methods (keyed by its call id, so a retry of a
        call that committed is answered from its record)."""
        hops = hops_of(msg)
        return cls(
            WorkKind.CALL,
            msg,
            f"{CALL_KEY_PREFIX}{call.call_id}",
            0,
            call.retried or hops > 0,
            hops,
            call=call,
        )

    @classmethod
    def for_request(cls, msg: Msg, request: pb.HttpRequest, params: Mapping[str, str]) -> Work:
        """A plain HTTP request to one of the object's routes (keyed by its id)."""
        hops = hops_of(msg)
        return cls(
            WorkKind.REQUEST,
            msg,
            f"{REQUEST_KEY_PREFIX}{request.request_id}",
            0,
            request.retried or hops > 0,
            hops,
            params=params,
            http_request=request,
        )

    def finish(self) -> None:
        """Nothing more to do for it here. Idempotent."""
        if not self.done.done():
            self.done.set_result(None)


def hops_of(msg: Msg) -> int:
    """How many times ``msg`` was forwarded (0 when it came straight from its sender)."""
    headers = msg.headers
    if not headers:
        return 0
    try:
        return max(0, int(headers.get(HOPS_HEADER, "0")))
    except ValueError:
        return MAX_HOPS  # garbage: treat it as forwarded too often
