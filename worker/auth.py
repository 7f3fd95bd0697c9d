"""Authentication at connect: where a token comes from, and what a route that declares
``auth=`` does with it.

A route declared with an authenticator (``app.route("/chat", auth=verifier)``,
``app.durable("/room/{name}", auth=verifier)``) has every connect verified before its
``on_connect`` runs: a refusal answers the upgrade with 401 and never reaches user code
(nor, on a durable object route, the object: no activation starts for it); the verified
claims are ``request.claims`` in ``on_connect``. An app may instead call
``verifier.verify(request)`` in ``on_connect`` itself: :class:`~wsgate.worker.errors.Unauthorized`
left uncaught there is the same 401.

Where a client puts its token (:func:`find_token`, in this order):

- ``Authorization: Bearer <token>``: the standard place, and the safest (not in URLs, so
  not in access logs, proxies' logs or a browser's history). Browsers cannot set headers
  on a WebSocket, so it is for other clients.
- a subprotocol: the client offers the marker (``bearer`` by default) followed by the
  token, ``new WebSocket(url, ["bearer", token])``. A browser can do it, and headers are
  logged less often than URLs; but a browser requires the server to pick one of the
  offered subprotocols, so on a route that declares ``auth=`` the SDK picks the marker
  when ``on_connect`` picks none (never the token itself).
- a query parameter (``?token=...``), off unless the verifier names one: the simplest
  from a browser, but URLs end up in logs, so prefer short-lived tokens there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol, TypeAlias, runtime_checkable

from wsgate.values import Value
from wsgate.worker.errors import AuthFailure, Unauthorized

if TYPE_CHECKING:
    from wsgate.worker.app import Accept, ConnectRequest

#: The verified claims of a connect (a JWT's payload: JSON, so a :data:`~wsgate.Value`
#: each), read-only.
Claims: TypeAlias = Mapping[str, Value]


@runtime_checkable
class Authenticator(Protocol):
    """What ``auth=`` takes: ``JWTVerifier``, or anything with this method.

    It may also have ``subprotocol_for(request) -> str | None``: the subprotocol to select
    when ``on_connect`` selects none (the marker its token came with).
    """

    def verify(self, request: ConnectRequest) -> Claims:
        """The verified claims of ``request``; raises Unauthorized. Runs on the worker's
        event loop for every connect of the route: it must not block."""
        ...


@dataclass(frozen=True, slots=True)
class Verified:
    """A connect that passed its route's authenticator."""

    #: Read-only: the same mapping reaches ``request.claims``.
    claims: Claims
    #: The subprotocol to select if ``on_connect`` selects none.
    subprotocol: str | None = None


def authenticate(auth: Authenticator, request: ConnectRequest) -> Verified:
    """Run ``auth`` on ``request``; raises Unauthorized (and lets anything else it raises
    through: a broken authenticator is a 500, not a 401)."""
    claims = MappingProxyType(dict(auth.verify(request)))
    chooser = getattr(auth, "subprotocol_for", None)
    return Verified(claims, chooser(request) if chooser is not None else None)


def with_auth_subprotocol(outcome: Accept, verified: Verified | None) -> Accept:
    """``outcome`` with the authenticator's subprotocol when it selects none."""
    if verified is None or verified.subprotocol is None or outcome.subprotocol is not None:
        return outcome
    return replace(outcome, subprotocol=verified.subprotocol)


def find_token(
    request: ConnectRequest, *, subprotocol: str | None = "bearer", query_param: str | None = None
) -> str:
    """The bearer token of ``request``: from ``Authorization: Bearer``, else from the
    subprotocol after the marker ``subprotocol``, else from the query parameter
    ``query_param`` (None turns either of the last two off). The first place that has one
    wins, even if another has a different one. Raises Unauthorized(MISSING_TOKEN)."""
    for value in request.headers.getall("Authorization", ()):
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if subprotocol is not None and subprotocol in request.subprotocols:
        at = request.subprotocols.index(subprotocol)
        if at + 1 < len(request.subprotocols):
            return request.subprotocols[at + 1]
    if query_param is not None:
        token = request.query.get(query_param, "")
        if token:
            return token
    raise Unauthorized(AuthFailure.MISSING_TOKEN)
