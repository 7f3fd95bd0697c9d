"""Connect decisions as they travel back to the gateway: what ``on_connect`` returned,
checked and turned into a ``ConnectDecision`` (shared by function routes and activations)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Iterable, Mapping
from typing import TYPE_CHECKING

from wsgate.v1 import envelope_pb2 as pb
from wsgate.worker.app import Accept, ConnectRequest, Reject
from wsgate.worker.errors import InvalidResponse, Unauthorized

if TYPE_CHECKING:
    from wsgate.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)


async def connect_handler_result(call: Awaitable[object], metrics: WorkerMetrics) -> object:
    """What ``on_connect`` returned, awaited; an Unauthorized it let through is its 401
    (:func:`refused`), as if it had returned that."""
    try:
        return await call
    except Unauthorized as exc:
        return refused(exc, metrics)


def refused(exc: Unauthorized, metrics: WorkerMetrics) -> Reject:
    """The 401 answering ``exc``, counted by reason."""
    metrics.auth_failures.labels(exc.reason.value).inc()
    log.debug("connect refused: %s", exc.description)
    return exc.reject()


def connect_outcome(outcome: object) -> Accept | Reject:
    """What ``on_connect`` returned, as Accept or Reject (None accepts); raises
    InvalidResponse for anything else."""
    if outcome is None:
        return Accept()
    if not isinstance(outcome, Accept | Reject):
        raise InvalidResponse(
            f"on_connect must return Accept, Reject or None, not {type(outcome).__name__}"
        )
    return outcome


def check_accept(outcome: Accept, request: ConnectRequest) -> None:
    """Raise InvalidResponse if ``outcome`` chose a subprotocol the client did not offer."""
    if outcome.subprotocol is not None and outcome.subprotocol not in request.subprotocols:
        raise InvalidResponse(
            f"subprotocol {outcome.subprotocol!r} was not offered "
            f"(offered: {list(request.subprotocols)})"
        )


def accept_decision(
    outcome: Accept, messages: Iterable[pb.Message], *, worker: str = ""
) -> pb.ConnectDecision:
    """The decision that completes the upgrade, with what ``on_connect`` sent; ``worker``
    names the host of the object's activation, where the connection's events go next."""
    return pb.ConnectDecision(
        accept=pb.Accept(subprotocol=outcome.subprotocol or "", messages=messages, worker=worker)
    )


def reject_decision(
    status: int, body: str | bytes, headers: Mapping[str, str] | None = None
) -> pb.ConnectDecision:
    """The decision that answers the upgrade with an HTTP response (the gateway makes it
    text/plain unless ``headers`` say otherwise)."""
    raw = body.encode() if isinstance(body, str) else body
    return pb.ConnectDecision(
        reject=pb.Reject(
            status=status,
            body=raw,
            headers=[pb.Header(name=name, value=value) for name, value in (headers or {}).items()],
        )
    )
