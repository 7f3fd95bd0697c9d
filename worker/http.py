"""Plain HTTP requests to a route (Cloudflare's ``fetch`` on a durable object).

A request without ``Upgrade: websocket`` goes from the gateway to the app; a route that
declares a request handler answers it::

    api = app.route("/status")

    @api.on_request
    async def status(request: HttpRequest) -> Response:
        return Response.json({"ok": True})

and a durable object class answers those of its routes in ``on_request(self, request)``,
as a turn of the object's activation (its storage, its output gate: the response leaves
once the turn's writes are durable). A route without one answers ``400 Expected
websocket``, as the guide's Worker does. Nothing here does I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from multidict import CIMultiDictProxy, MultiDictProxy

from wsgate.worker.app import ConnectRequest, headers_of, query_of
from wsgate.worker.errors import InvalidResponse

if TYPE_CHECKING:
    from wsgate.v1 import envelope_pb2 as pb


@dataclass(frozen=True)
class HttpRequest:
    """A plain HTTP request to a route."""

    method: str
    path: str
    #: Values of the route's ``{name}`` segments.
    params: Mapping[str, str]
    #: The query string's parameters (all values of a repeated name are kept).
    query: MultiDictProxy[str]
    #: The request headers, looked up case-insensitively.
    headers: CIMultiDictProxy[str]
    #: The body, as received (at most the gateway's message size limit).
    body: bytes
    #: The client's address, as in :class:`~wsgate.worker.app.ConnectRequest`.
    remote_address: str
    #: The claims the route's authenticator verified (``auth=``), read-only; empty on a
    #: route without one.
    claims: Mapping[str, object] = field(default_factory=dict)

    def text(self) -> str:
        """The body decoded as UTF-8 (undecodable bytes replaced)."""
        return self.body.decode("utf-8", "replace")

    def json(self) -> object:
        """The body parsed as JSON; raises ValueError if it is not JSON."""
        return json.loads(self.body)

    @classmethod
    def from_envelope(
        cls,
        envelope: pb.HttpRequest,
        params: Mapping[str, str],
        claims: Mapping[str, object] | None = None,
    ) -> HttpRequest:
        """Build from the NATS envelope (with the claims verified for it, if any)."""
        return cls(
            method=envelope.method,
            path=envelope.path,
            params=dict(params),
            query=query_of(envelope.query),
            headers=headers_of(envelope.headers),
            body=envelope.body,
            remote_address=envelope.remote_address,
            claims=claims or {},
        )


@dataclass(frozen=True)
class Response:
    """A request handler's answer: ``status`` (100-599), ``body`` (str is sent as UTF-8
    text), ``headers``. Raises InvalidResponse for a status out of range or a body that is
    neither str nor bytes."""

    status: int = 200
    body: str | bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.status, int) or not 100 <= self.status <= 599:
            raise InvalidResponse(f"an HTTP status is 100-599, not {self.status!r}")
        if not isinstance(self.body, (str, bytes)):
            raise InvalidResponse(f"a body is str or bytes, not {type(self.body).__name__}")

    @classmethod
    def json(
        cls, value: object, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> Response:
        """``value`` as a JSON body, with its content type."""
        return cls(
            status,
            json.dumps(value),
            {"Content-Type": "application/json", **(headers or {})},
        )

    def encoded_body(self) -> bytes:
        """The body as sent."""
        return self.body.encode() if isinstance(self.body, str) else self.body

    def to_envelope(self) -> pb.HttpResponse:
        """The envelope the worker answers with (a str body gets ``text/plain;
        charset=utf-8`` unless a Content-Type is given; the gateway drops hop-by-hop
        headers such as Connection and Content-Length)."""
        from wsgate.v1 import envelope_pb2 as pb

        headers = [pb.Header(name=name, value=value) for name, value in self.headers.items()]
        if isinstance(self.body, str) and not any(
            h.name.lower() == "content-type" for h in headers
        ):
            headers.append(pb.Header(name="Content-Type", value="text/plain; charset=utf-8"))
        return pb.HttpResponse(status=self.status, headers=headers, body=self.encoded_body())


def as_connect_request(request: pb.HttpRequest, params: Mapping[str, str]) -> ConnectRequest:
    """The request as a route's authenticator reads a connect: path, query, headers and
    the client's address (no connection, no subprotocols)."""
    return ConnectRequest(
        connection_id="",
        path=request.path,
        params=dict(params),
        query=query_of(request.query),
        headers=headers_of(request.headers),
        subprotocols=(),
        remote_address=request.remote_address,
    )


def plain_response(
    status: int, body: str | bytes, headers: Mapping[str, str] | None = None
) -> pb.HttpResponse:
    """An answer made by wsgate itself (no handler, a refusal, a failure)."""
    return Response(status, body, headers or {}).to_envelope()


def expected_websocket() -> pb.HttpResponse:
    """``400 Expected websocket``: what a route without a request handler answers (the
    guide's check)."""
    return plain_response(400, "Expected websocket")
